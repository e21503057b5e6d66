"""A bento of your own around the paged engine: your resources and traffic settings, our routes.

    cd examples/bentoml_service
    bentoml serve service:LLMService                          # OpenAI-compatible on :3000
    bentoml serve service:LLMService --arg model=gemma-3-270m # override any engine argument
    bentoml build                                             # package it (bentofile.yaml)

It listens on 127.0.0.1 unless told otherwise: in a container, or to serve other machines, set
BENTOML_HOST=0.0.0.0 (or --host 0.0.0.0) and a key, PAGED_BACKEND_API_KEY=... (clients then send
`Authorization: Bearer <key>`, the `openai` client's api_key).
"""

from paged_backend.adapters.bentoml import make_service

LLMService = make_service(
    "LLMService",
    engine_args={"model": "smollm2-135m-instruct", "max_model_len": 2048},
    resources={"cpu": "2"},
    traffic={"timeout": 600, "concurrency": 64},
)

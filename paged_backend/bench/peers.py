"""Peers timed in the same run on the same dummy model and requests: HF transformers `generate`
with static batches (padded, sdpa), the same with a static KV cache and transformers' own
compilation of the decode step, and transformers' own continuous batching (`generate_batch`).

All use random weights at the same shape in the same dtype, greedy, and never stop at EOS (each
request makes exactly its output length), like our engine in the benchmark. Each peer's model is
built directly on the device (no minutes of CPU initialization for an 8B shape).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from paged_backend.bench.workload import Request

PEERS = ("hf-generate", "hf-generate-batch", "hf-generate-compiled")
_PAD = 2


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _load(model_dir: Path, dtype: torch.dtype, device: str):
    import transformers

    t0 = time.perf_counter()
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device(device):  # parameters are allocated and initialized on the device itself
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    _say(f"peer model built on {device} in {time.perf_counter() - t0:.1f} s")
    return model.eval()


def _batches(requests: list[Request], batch_size: int) -> list[list[Request]]:
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]


def _generate(model, batch: list[Request], device: str, width: int | None = None, **kw) -> None:
    """One static batch, left-padded to `width` (default: its longest prompt), all rows to the
    longest output length."""
    width = width or max(len(r.prompt) for r in batch)
    ids = torch.tensor([[_PAD] * (width - len(r.prompt)) + r.prompt for r in batch], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=device)
    new = max(r.output_len for r in batch)
    model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   pad_token_id=_PAD, **kw)


def _timed_batches(model, batches: list[list[Request]], device: str, label: str, **kw) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc=label, unit="batch"):
        _generate(model, batch, device, **kw)
    _sync(device)
    return time.perf_counter() - t0


def hf_generate(model_dir: Path, requests: list[Request], dtype: torch.dtype, device: str,
                batch_size: int = 64) -> dict:
    model = _load(model_dir, dtype, device)
    with torch.no_grad():
        _generate(model, [Request(requests[0].prompt[:8], 4)], device)  # warm-up (kernels, allocator)
        seconds = _timed_batches(model, _batches(requests, batch_size), device, "hf-generate")
    del model
    # tokens a static batch makes beyond each request's own length are waste, not output
    return dict(name=f"hf-generate (transformers generate, static batches of {batch_size}, sdpa)",
                seconds=seconds, output_tokens=sum(r.output_len for r in requests))


def hf_generate_compiled(model_dir: Path, requests: list[Request], dtype: torch.dtype, device: str,
                         batch_size: int = 64) -> dict:
    """`generate` with `cache_implementation="static"`, which makes transformers compile the decode
    step (torch.compile, mode reduce-overhead: CUDA graphs) on GPUs. Every batch is padded to the
    same width and rows (the last batch filled up with copies of its first request, not counted),
    so the timed batches reuse the one compiled shape; the warm-up runs the first batch in full,
    which compiles every shape the timed run uses."""
    model = _load(model_dir, dtype, device)
    compiles = device != "cpu"  # transformers' own rule: it auto-compiles on accelerators only
    width = max(len(r.prompt) for r in requests)
    batches = _batches(requests, batch_size)
    full = [b + [b[0]] * (batch_size - len(b)) if len(batches) > 1 else b for b in batches]
    kw = dict(width=width, cache_implementation="static")
    with torch.no_grad():
        _say(f"hf-generate-compiled: warm-up batch ({'torch.compile of the decode step' if compiles else 'no compile on CPU'})")
        _sync(device)
        t0 = time.perf_counter()
        _generate(model, full[0], device, **kw)
        _sync(device)
        warmup_s = time.perf_counter() - t0
        seconds = _timed_batches(model, full, device, "hf-generate-compiled", **kw)
    del model
    compile_s = max(0.0, warmup_s - seconds / len(full))  # warm-up minus what one batch takes once compiled
    _say(f"hf-generate-compiled: warm-up {warmup_s:.1f} s, of which compile ~{compile_s:.1f} s")
    return dict(name=f"hf-generate-compiled (static cache{' + compiled decode' if compiles else ', CPU: no compile'}, "
                     f"batches of {batch_size})",
                seconds=seconds, output_tokens=sum(r.output_len for r in requests), warmup_s=warmup_s,
                compile_s=compile_s, compiled=compiles)


def hf_generate_batch(model_dir: Path, requests: list[Request], dtype: torch.dtype, device: str) -> dict:
    from transformers import GenerationConfig

    model = _load(model_dir, dtype, device)
    new = max(r.output_len for r in requests)
    if any(r.output_len != new for r in requests):
        raise ValueError("hf-generate-batch takes one output length for all requests (generate_batch has one "
                         "max_new_tokens); give --output-len as a single number")
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=_PAD)
    prompts = [r.prompt for r in requests]
    _say("hf-generate-batch: warm-up")
    model.generate_batch(prompts[:2], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=_PAD))
    _say(f"hf-generate-batch: {len(prompts)} requests")
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
    _say(f"peer {name}: loading")
    runner = {"hf-generate": hf_generate, "hf-generate-batch": hf_generate_batch,
              "hf-generate-compiled": hf_generate_compiled}[name]
    result = runner(model_dir, requests, dtype, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    result.update(peer=name, requests=len(requests))
    _say(f"peer {name}: {result['seconds']:.2f} s")
    return result

"""Per-step diagnostics `bench throughput` measures itself, after the timed run, on the same engine:

- prefill: `batch` fresh prompts of `prompt_len` tokens, one output token each (so the phase is
  prefill only): wall time and engine steps, against the prefill's matmul floor;
- decode at full batch: the same prompts again (their prefixes are cached) with many output
  tokens; once every sequence decodes (a step makes `batch` tokens), the wall time of `steps`
  steps, then the GPU busy time of `steps` more under torch.profiler (CUDA activity only: the
  union of kernel intervals), against the step's bandwidth floor, and the kernels that take most of
  it (GPU time per step by kernel name: where a decode step's time goes, without another tool);
  the same by-kernel table for prefill steps, from a quarter of the batch's prompts prefilled again
  (new ones, so that nothing is cached) under the profiler.
"""

from __future__ import annotations

import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from paged_backend.bench.roofline import (ModelCost, Rates, decode_step_floor_seconds, decode_step_op_floor_seconds,
                                         prefill_floor_seconds)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _kernel_busy_us(prof) -> float:
    """Union of the GPU kernels' and copies' intervals (microseconds) in a profile."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


def _short_name(name: str) -> str:
    """A kernel's name without `void `, template arguments and parameters."""
    name = name.removeprefix("void ")
    return name.split("<", 1)[0].split("(", 1)[0][:60]


OTHER_KERNELS = "(all other kernels)"


def _kernel_times(prof, steps: int, top: int = 10) -> list[tuple[str, float]]:
    """The `top` kernel names by GPU seconds per step (time summed over every launch of the name),
    then the rest together as OTHER_KERNELS."""
    totals: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = _short_name(e.name)
            totals[name] = totals.get(name, 0.0) + (e.time_range.end - e.time_range.start)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    rest = sum(us for _, us in ranked[top:])
    return [(name, us / 1e6 / steps) for name, us in ranked[:top]] + [(OTHER_KERNELS, rest / 1e6 / steps)]


def _drain(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step(emit_unfinished=False)


def probe_steps(llm, batch: int, prompt_len: int, steps: int = 32, seed: int = 1) -> dict:
    from paged_backend import SamplingParams

    engine = llm.engine
    # Every probe sequence holds its prompt and up to 2 * steps + 64 tokens at once: a batch whose K/V
    # do not fit (a large shape's KV per token) would preempt and never decode all together.
    per_seq = -(-(prompt_len + 2 * steps + 64) // engine.block_manager.block_size)
    num_blocks = llm.stats().num_blocks_total
    fit = int(0.95 * num_blocks) // per_seq
    if fit < batch:
        print(f"[bench] step probe: {batch} sequences of {prompt_len} + {2 * steps + 64} tokens do not fit the KV "
              f"cache ({num_blocks} blocks): probing at batch {max(fit, 1)}", flush=True)
        batch = max(fit, 1)
    rng = random.Random(seed)

    def new_prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, engine.vocab_size) for _ in range(prompt_len)] for _ in range(n)]

    def prefill(ps) -> int:
        """Prefill ps (one output token each), run until done; returns the engine steps it took."""
        steps0 = engine.num_steps
        for p in ps:
            engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        _drain(engine)
        _sync()
        return engine.num_steps - steps0

    prompts = new_prompts(batch)
    print(f"[bench] step probe: prefill {batch} x {prompt_len} tokens, then decode at batch {batch}", flush=True)
    _sync()
    t0 = time.perf_counter()
    prefill_steps = prefill(prompts)
    out = dict(batch=batch, prompt_len=prompt_len, prefill_s=time.perf_counter() - t0, prefill_steps=prefill_steps)
    if engine.device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            profiled_steps = prefill(new_prompts(max(1, batch // 4)))
        out["prefill_kernels"] = _kernel_times(prof, max(profiled_steps, 1))

    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=2 * steps + 64, ignore_eos=True))
    last = engine.total_generated_tokens
    for _ in range(64):  # until a step makes one token for every sequence: all of them decode
        engine.step(emit_unfinished=False)
        made, last = engine.total_generated_tokens - last, engine.total_generated_tokens
        if made == batch:
            break
    else:
        raise RuntimeError(f"decode probe: never {batch} sequences decoding in one step (--max-num-seqs?)")
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(emit_unfinished=False)
    out["decode_wall_s"] = (time.perf_counter() - t0) / steps
    out["decode_gpu_s"] = None
    if engine.device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step(emit_unfinished=False)
            _sync()
        busy = _kernel_busy_us(prof)
        out["decode_gpu_s"] = busy / 1e6 / steps if busy else None
        out["decode_kernels"] = _kernel_times(prof, steps)
    out["decode_context"] = prompt_len + 64  # about where the measured steps sit
    _drain(engine)
    return out


def with_floors(probe: dict, cost: ModelCost, rates: Rates) -> dict:
    b, p = probe["batch"], probe["prompt_len"]
    probe["prefill_floor_s"] = prefill_floor_seconds(cost, [p] * b, rates)
    probe["decode_floor_s"] = decode_step_floor_seconds(cost, [probe["decode_context"]] * b, rates)
    probe["decode_op_floor_s"] = decode_step_op_floor_seconds(cost, [probe["decode_context"]] * b, rates)
    return probe


def describe(probe: dict) -> list[str]:
    gpu = probe["decode_gpu_s"]
    d = (f"decode step at batch {probe['batch']} (context ~{probe['decode_context']}): wall "
         f"{probe['decode_wall_s'] * 1e3:.2f} ms")
    d += (f", GPU busy {gpu * 1e3:.2f} ms (wall / GPU = {probe['decode_wall_s'] / gpu:.2f}x)" if gpu
          else ", GPU time: not measured (no CUDA)")
    d += (f", bandwidth floor {probe['decode_floor_s'] * 1e3:.2f} ms (per operation "
          f"{probe['decode_op_floor_s'] * 1e3:.2f} ms)")
    per = probe["prefill_s"] / max(probe["prefill_steps"], 1)
    f = (f"prefill {probe['batch']} x {probe['prompt_len']} tokens: {probe['prefill_s']:.3f} s in "
         f"{probe['prefill_steps']} steps ({per * 1e3:.1f} ms a step), matmul floor {probe['prefill_floor_s']:.3f} s "
         f"(time / floor = {probe['prefill_s'] / probe['prefill_floor_s']:.2f}x)")
    lines = [d, f]
    if probe.get("decode_kernels") and gpu:
        lines.append("decode step GPU time by kernel: " + ", ".join(
            f"{name} {sec * 1e3:.3f} ms ({sec / gpu:.0%})" for name, sec in probe["decode_kernels"]))
    if probe.get("prefill_kernels"):
        lines.append("prefill step GPU time by kernel: " + ", ".join(
            f"{name} {sec * 1e3:.2f} ms ({sec / per:.0%})" for name, sec in probe["prefill_kernels"]))
    return lines

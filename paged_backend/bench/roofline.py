"""The hardware floor of a workload, from rates measured on this machine in the same run.

Prefill is compute-bound: its floor is its FLOPs over the measured matmul rate. Each decode step
must read every weight once and the K/V of every running sequence's context: its floor is those
bytes over the measured copy bandwidth (or its FLOPs over the matmul rate, whichever is longer).
The decode steps are those of an ideal schedule in which every request runs from the first step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Rates:
    copy_bytes_per_s: float  # bytes read + written by a large device-to-device copy
    matmul_flops_per_s: float  # a large square matmul in the model's dtype (fp8 _scaled_mm for fp8 weights)

    def as_dict(self) -> dict:
        return asdict(self)


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_rates(device: torch.device, dtype: torch.dtype, fp8_matmul: bool = False) -> Rates:
    cuda = device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (64 << 20)
    src = torch.rand(n_bytes // 4, device=device)  # random data, never zeros
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device, 10)
    n = 8192 if cuda else 512
    mm_dtype = dtype if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm = lambda: a @ b  # noqa: E731
    if fp8_matmul and cuda:  # what fp8 linears run: rowwise-scaled float8_e4m3fn GEMM, bf16 out
        a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
        mm = lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
    mm_s = _median_seconds(mm, device, 10)
    del src, dst, a, b
    return Rates(copy_bytes_per_s=2 * n_bytes / copy_s, matmul_flops_per_s=2 * n**3 / mm_s)


@dataclass
class ModelCost:
    weight_bytes: int  # every parameter, read once per forward pass
    matmul_params: int  # parameters in the per-token matmuls (the embedding lookup excluded)
    lm_head_params: int
    kv_bytes_per_token: int
    attn_flops_per_pair: int  # per (query token, context token) pair, all layers: QK^T and PV

    @classmethod
    def of(cls, config, dtype_bytes: int, weight_bytes: int | None = None,
           kv_bytes_per_token: int | None = None) -> "ModelCost":
        """From the config's shapes at dtype_bytes per element, unless the engine reports the bytes it
        actually stores (fp8 weights / KV cache)."""
        h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
        hq = config.num_attention_heads
        hkv = getattr(config, "num_key_value_heads", None) or hq
        d = getattr(config, "head_dim", None) or h // hq
        per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * config.intermediate_size
        lm_head = vocab * h
        tied = getattr(config, "tie_word_embeddings", False)
        total = layers * per_layer + lm_head * (1 if tied else 2)
        return cls(
            weight_bytes=weight_bytes or total * dtype_bytes,
            matmul_params=layers * per_layer,
            lm_head_params=lm_head,
            kv_bytes_per_token=kv_bytes_per_token or layers * 2 * hkv * d * dtype_bytes,
            attn_flops_per_pair=layers * 4 * hq * d,
        )


def floor_seconds(cost: ModelCost, prompt_lens: list[int], output_lens: list[int], rates: Rates) -> dict:
    """The workload's floor: prefill (compute) + decode steps (memory or compute, per step)."""
    prefill_flops = sum(2 * cost.matmul_params * p + cost.attn_flops_per_pair * p * (p + 1) // 2
                        + 2 * cost.lm_head_params for p in prompt_lens)
    prefill_s = prefill_flops / rates.matmul_flops_per_s
    decode_s = 0.0
    for step in range(1, max(output_lens)):  # the first output token comes out of the prefill
        ctx = [p + step for p, o in zip(prompt_lens, output_lens) if o > step]
        step_bytes = cost.weight_bytes + cost.kv_bytes_per_token * sum(ctx)
        step_flops = len(ctx) * 2 * (cost.matmul_params + cost.lm_head_params) + cost.attn_flops_per_pair * sum(ctx)
        decode_s += max(step_bytes / rates.copy_bytes_per_s, step_flops / rates.matmul_flops_per_s)
    return dict(prefill_s=prefill_s, decode_s=decode_s, total_s=prefill_s + decode_s)

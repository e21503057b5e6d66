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
    copy_bytes_per_s: float  # bytes read + written by a large device-to-device copy (copy_bandwidth)
    matmul_flops_per_s: float  # a large square matmul in the model's dtype (fp8 _scaled_mm for fp8 weights)
    copy_method: str = ""

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


COPY_METHOD_CUDA = ("2 GiB bf16 device-to-device copy, 8 per CUDA graph, median of 10 graph replays; the faster of "
                    "copy_ (a memcpy node in a graph) and an elementwise kernel (an SM copy, as our kernels read)")


def copy_bandwidth(device: torch.device | str = "cuda") -> float:
    """Bytes read + written per second by a large device-to-device copy: the one bandwidth every
    roofline in the project uses (the engine bench, the kernel benches). On CUDA the copies are
    replayed from a CUDA graph, so no launch gap between them is counted, and the faster of two ways
    to copy counts: `copy_` becomes a memcpy node inside a graph (copy engines; measured 2.44 TB/s on
    an H100 where an elementwise kernel moves ~3 TB/s), and a roofline must use the rate the GPU can
    reach (the strict one), not the slower path."""
    device = torch.device(device)
    if device.type != "cuda":
        src = torch.rand((64 << 20) // 4, device=device)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), device, 10)
    src = torch.rand(1 << 30, device=device, dtype=torch.bfloat16)  # 2 GiB of random data, never zeros
    dst = torch.empty_like(src)
    rates = [2 * (1 << 30) * 2 / _graph_seconds(fn, device) for fn in (lambda: dst.copy_(src), lambda: torch.neg(src, out=dst))]
    del src, dst
    torch.cuda.empty_cache()
    return max(rates)


def _graph_seconds(fn, device: torch.device, per_graph: int = 8) -> float:
    """Seconds per call of fn, replayed per_graph times from one CUDA graph (median of 10 replays)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    seconds = _median_seconds(graph.replay, device, 10) / per_graph
    del graph
    return seconds


def measure_rates(device: torch.device, dtype: torch.dtype, fp8_matmul: bool = False) -> Rates:
    cuda = device.type == "cuda"
    copy = copy_bandwidth(device)
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
    del a, b
    return Rates(copy_bytes_per_s=copy, matmul_flops_per_s=2 * n**3 / mm_s,
                 copy_method=COPY_METHOD_CUDA if cuda else "64 MiB fp32 copy_ on the CPU, median of 10")


def prefill_floor_seconds(cost: "ModelCost", prompt_lens: list[int], rates: Rates) -> float:
    """Prefill is compute-bound: its FLOPs (matmuls, attention, one lm_head row per prompt) over the matmul rate."""
    flops = sum(2 * cost.matmul_params * p + cost.attn_flops_per_pair * p * (p + 1) // 2 + 2 * cost.lm_head_params
                for p in prompt_lens)
    return flops / rates.matmul_flops_per_s


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
    """The workload's floor: prefill (compute) + decode steps (memory or compute, per step). Also the
    per-operation floor (`decode_step_op_floor_seconds`) of the same decode steps, as `*_per_op_s`."""
    prefill_s = prefill_floor_seconds(cost, prompt_lens, rates)
    # the decode steps' context lengths; the first output token comes out of the prefill
    steps = [[p + step for p, o in zip(prompt_lens, output_lens) if o > step] for step in range(1, max(output_lens))]
    decode_s = sum(decode_step_floor_seconds(cost, ctx, rates) for ctx in steps)
    decode_per_op_s = sum(decode_step_op_floor_seconds(cost, ctx, rates) for ctx in steps)
    return dict(prefill_s=prefill_s, decode_s=decode_s, total_s=prefill_s + decode_s,
                decode_per_op_s=decode_per_op_s, total_per_op_s=prefill_s + decode_per_op_s)


def _decode_step_parts(cost: ModelCost, context_lens: list[int], rates: Rates) -> tuple[float, float, float, float]:
    """Seconds of one decode step's linears (bytes, FLOPs) and attention (bytes, FLOPs) at the measured rates."""
    n, ctx = len(context_lens), sum(context_lens)
    return (cost.weight_bytes / rates.copy_bytes_per_s,
            n * 2 * (cost.matmul_params + cost.lm_head_params) / rates.matmul_flops_per_s,
            cost.kv_bytes_per_token * ctx / rates.copy_bytes_per_s,
            cost.attn_flops_per_pair * ctx / rates.matmul_flops_per_s)


def decode_step_floor_seconds(cost: ModelCost, context_lens: list[int], rates: Rates) -> float:
    """One decode step of these sequences: all weights and their K/V read once, or its FLOPs."""
    lin_bytes, lin_flops, attn_bytes, attn_flops = _decode_step_parts(cost, context_lens, rates)
    return max(lin_bytes + attn_bytes, lin_flops + attn_flops)


def decode_step_op_floor_seconds(cost: ModelCost, context_lens: list[int], rates: Rates) -> float:
    """One decode step operation by operation: the linears (every weight read once, or their FLOPs) plus attention
    (the K/V read once, or its FLOPs), each at the longer of its two. A step's linears and its attention run one
    after the other, so a batch whose linears are compute-bound (Llama-3-8B at 256 sequences on an H200) cannot
    hide the attention's bytes under them, as the whole-step floor above assumes."""
    lin_bytes, lin_flops, attn_bytes, attn_flops = _decode_step_parts(cost, context_lens, rates)
    return max(lin_bytes, lin_flops) + max(attn_bytes, attn_flops)

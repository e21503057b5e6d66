"""Paged-attention kernels: Triton on CUDA tensors, the plain-torch twin (reference.py) on CPU tensors.

Public entry points (the contract in DESIGN.md):
    store_kv(key, value, kv_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0)
    paged_attention(q, kv_cache, block_tables, seq_lens, query_start_loc, scale,
                    sliding_window=None, softcap=None, out=None, *, max_query_len=None, max_seq_len=None,
                    k_scale=1.0, v_scale=1.0, num_decodes=0)
    copy_blocks(kv_caches, src, dst)
and the element-wise ops the models run around them, and the sampler's greedy choice (triton_fused.py,
one kernel each on CUDA):
    quantize_fp8_rows(x)                          # fp8 activations of quantization="fp8"
    fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype)   # the fp8 linear's GEMM (triton_gemm.py / cuBLAS)
    for_cuda_graph()                              # context: the passes run inside are captured into CUDA graphs
    rms_norm(x, weight, eps, residual=None, *, gemma=False, fp8_out=False)
    gated_activation(x, activation, *, fp8_out=False)   # fp8_out: quantized as quantize_fp8_rows does, fused
    rotary(x, cos, sin)
    greedy_sample(logits)                         # argmax per row and its log-probability
and the linears' matmul:
    linear(x, weight, bias=None)                  # F.linear; the few rows of a CPU decode step: cpu_ext.py
    load_cpu_kernels()                            # builds / loads the CPU kernels (engine start-up on the CPU)
On the CPU, fp32 rms_norm / gated_activation / rotary / linear / greedy_sample run the project's C++ kernels
(cpu_ext.py) unless impl names one; the reference stays the plain-torch twin (and the GPU tests' oracle).

`impl="triton"` / `impl="reference"` forces an implementation. Triton on CPU tensors runs through
Triton's interpreter: the kernels module is then loaded a second time with TRITON_INTERPRET=1 set
while its decorators run (Triton decides interpreted-or-compiled when `@triton.jit` is applied), so
this works whatever was imported before and never changes how the GPU kernels are built.

FP8 KV cache: a kv_cache of dtype float8_e4m3fn holds key / k_scale and value / v_scale (per-layer
float scales, saturated at +-448); attention reads K and V back exactly (every e4m3 value is an fp16 value:
the Triton kernel runs its dots in fp16 for a 16-bit q, the reference in q's dtype) and applies the scales
(K's to the softmax scale, V's to the output). Other cache dtypes ignore the scales.
An fp8 cache is contiguous and keeps each block's V half transposed: kv_cache[b, 1] holds V as
[Hkv, D, block_size] in the bytes the shape names [block_size, Hkv, D] (`reference._fp8_v_blocks` is that
view). Attention's P.V contracts over keys, so the kernels read V^T along its contiguous dimension, as K is
read: the fp8 bytes then reach the tensor cores through one shared-memory pass and convert in registers
(at workload-A contexts 1.4-1.6x the decode speed of the [block_size, Hkv, D] layout, BENCHMARKS.md).
copy_blocks moves whole blocks and is layout-blind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import threading

import torch
import torch.nn.functional as F

from . import cpu_ext, reference

__all__ = ["store_kv", "paged_attention", "copy_blocks", "rms_norm", "gated_activation", "rotary",
           "quantize_fp8_rows", "fp8_matmul", "for_cuda_graph", "greedy_sample", "plan_step", "reference",
           "linear", "load_cpu_kernels"]

_IMPLS = ("triton", "reference")
_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, reference.FP8_KV_DTYPE)
_lock = threading.RLock()  # triton_decode loads triton_impl while it is itself being loaded
_triton_modules: dict[tuple[str, bool], object] = {}


def _triton_module(interpret: bool, name: str = "triton_impl"):
    """A Triton module (triton_impl: attention; triton_decode: fp8 decode attention; triton_kv: the KV
    store and the fp8 cache's V tiles; triton_fused: element-wise ops), compiled (interpret=False) or
    interpreted (True); loaded once each."""
    mod = _triton_modules.get((name, interpret))
    if mod is not None:
        return mod
    with _lock:
        if (name, interpret) not in _triton_modules:
            if not interpret and os.environ.get("TRITON_INTERPRET") != "1":
                mod = importlib.import_module(f"{__name__}.{name}")
            else:
                # Import triton (and the gluon package it pulls in lazily at the first launch) in its
                # normal mode first, so only our kernels' decorators see the interpreter flag.
                import triton  # noqa: F401

                try:
                    import triton.experimental.gluon  # noqa: F401
                except ImportError:
                    pass
                qualified = f"{__name__}._{name}_interpreted"
                path = os.path.join(os.path.dirname(__file__), f"{name}.py")
                spec = importlib.util.spec_from_file_location(qualified, path)
                mod = importlib.util.module_from_spec(spec)
                old = os.environ.get("TRITON_INTERPRET")
                os.environ["TRITON_INTERPRET"] = "1"
                try:
                    spec.loader.exec_module(mod)
                finally:
                    if old is None:
                        del os.environ["TRITON_INTERPRET"]
                    else:
                        os.environ["TRITON_INTERPRET"] = old
                sys.modules[qualified] = mod
            _triton_modules[(name, interpret)] = mod
    return _triton_modules[(name, interpret)]


def _pick(impl: str | None, t: torch.Tensor, name: str = "triton_impl"):
    """The module implementing the kernels for tensor t: a Triton module (compiled or interpreted) or reference."""
    if impl is None:
        impl = "triton" if t.is_cuda else "reference"
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {_IMPLS} or None (CUDA -> triton, CPU -> reference)")
    if impl == "reference":
        return reference
    return _triton_module(not t.is_cuda, name)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    plan=None,
    impl: str | None = None,
) -> None:
    """Write key/value [T, Hkv, D] into kv_cache [num_blocks, 2, block_size, Hkv, D] at slot_mapping [T]; -1 skips.
    An fp8 cache stores key / k_scale and value / v_scale. plan: this step's `plan_step` (used on the CPU)."""
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be [T, Hkv, D]")
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or tuple(kv_cache.shape[3:]) != tuple(key.shape[1:]):
        raise ValueError(
            f"kv_cache {tuple(kv_cache.shape)} must be [num_blocks, 2, block_size, Hkv, D] with "
            f"Hkv, D = {tuple(key.shape[1:])} from key"
        )
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [T] with T = {key.shape[0]}")
    _check_cache(kv_cache, k_scale, v_scale)
    mod = _pick(impl, kv_cache, "triton_kv")
    extra = {"plan": plan} if mod is reference else {}
    mod.store_kv(key, value, kv_cache, slot_mapping, k_scale, v_scale, **extra)


def _check_cache(kv_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    if kv_cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype}: expected one of {_CACHE_DTYPES}")
    if not (k_scale > 0 and v_scale > 0 and math.isfinite(k_scale) and math.isfinite(v_scale)):
        raise ValueError(f"k_scale={k_scale}, v_scale={v_scale}: KV scales must be positive finite floats")
    if kv_cache.dtype == reference.FP8_KV_DTYPE and not kv_cache.is_contiguous():
        raise ValueError("an fp8 kv_cache must be contiguous (its V halves are stored transposed per block)")


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    plan=None,
    num_decodes: int = 0,
    impl: str | None = None,
) -> torch.Tensor:
    """Causal varlen attention of q [T, Hq, D] over the paged cache -> [T, Hq, D] (written into `out` if given).

    max_query_len / max_seq_len are host ints the caller already knows; passing them keeps the
    launch free of device->host syncs. When None they are computed from the tensors. Both must be
    upper bounds (>=) of the true maxima; max_query_len == 1 selects the decode path (and, with few
    sequences, the split-K path, whose chunking is sized from max_seq_len). A CUDA graph captured for
    decode bakes the split count in: capture it with max_seq_len = the largest context it will replay
    with (e.g. max_model_len). k_scale / v_scale: an fp8 cache's scales (module docstring).
    num_decodes: a host int, how many sequences at the front of a mixed batch have exactly one new
    token; the Triton path runs them as a decode batch and the rest as prompts (two launches, each
    with its own tiles: in one prompt-tiled launch the decode rows were ~4x slower). 0: one launch.
    """
    if q.dim() != 3 or kv_cache.dim() != 5 or q.shape[2] != kv_cache.shape[4]:
        raise ValueError(
            f"q {tuple(q.shape)} must be [T, Hq, D] and kv_cache {tuple(kv_cache.shape)} "
            "[num_blocks, 2, block_size, Hkv, D] with the same D"
        )
    if q.shape[1] % kv_cache.shape[3]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={kv_cache.shape[3]}")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} must be [B+1] and block_tables "
            f"{tuple(block_tables.shape)} [B, max_blocks] for seq_lens {tuple(seq_lens.shape)}"
        )
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match q {tuple(q.shape)} {q.dtype}")
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    if softcap is not None and softcap <= 0:
        softcap = None
    if not 0 <= num_decodes <= seq_lens.shape[0]:
        raise ValueError(f"num_decodes={num_decodes} must be in [0, B={seq_lens.shape[0]}]")
    _check_cache(kv_cache, k_scale, v_scale)
    mod = _pick(impl, q)
    extra = {"plan": plan} if mod is reference else {"num_decodes": num_decodes}
    return mod.paged_attention(
        q,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        sliding_window,
        softcap,
        out,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        k_scale=k_scale,
        v_scale=v_scale,
        **extra,
    )


def plan_step(slot_mapping, block_tables, seq_lens, query_start_loc, block_size: int):
    """The per-step index work of the CPU twin (slot -> cache rows, each sequence's block rows and
    lengths), built once per step and passed to every layer's store_kv / paged_attention as `plan`.
    None for CUDA tensors: the Triton kernels index the tables themselves."""
    if slot_mapping.is_cuda:
        return None
    return reference.plan_step(slot_mapping, block_tables, seq_lens, query_start_loc, block_size)


def quantize_fp8_rows(x: torch.Tensor, *, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) fp8 quantization of x [M, K]: (x / scale as float8_e4m3fn saturated at
    +-448, scale [M, 1] fp32 = max(amax of the row / 448, 1e-12)). One kernel on CUDA."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} must be a 2-D float tensor [M, K]")
    return _pick(impl, x, "triton_fused").quantize_fp8_rows(x)


_graph = threading.local()  # .on: the current thread is building CUDA graphs (`for_cuda_graph`)


@contextlib.contextmanager
def for_cuda_graph():
    """Inside this context the forward passes being run are captured into CUDA graphs (the warm-up pass
    right before a capture included) and replayed many times, so kernels are picked for their GPU time
    rather than their launch cost: the fp8 GEMM up to 256 rows is then our Triton kernel, faster on the GPU
    but about twice cuBLAS's host time to launch (BENCHMARKS.md), which eager steps of a few rows, bound
    by the host, would pay."""
    before = getattr(_graph, "on", False)
    _graph.on = True
    try:
        yield
    finally:
        _graph.on = before


def fp8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               out_dtype: torch.dtype, *, impl: str | None = None) -> torch.Tensor:
    """(x_q [M, K] @ w_q [N, K]^T) * x_scale [M, 1] * w_scale [1, N] -> [M, N] out_dtype, with fp8 (e4m3)
    x_q and w_q, fp32 scales and fp32 accumulation: an fp8 linear with per-token and per-channel scales.

    On CUDA: inside `for_cuda_graph` and up to 256 rows (decode batches) our Triton GEMM (triton_gemm.py:
    tiles sized for the short problem, 1.1-2.4x cuBLAS there); otherwise `torch._scaled_mm` (cuBLAS,
    rowwise scales: bf16 output, K and N multiples of 16; other cases the reference); impl="triton"
    forces ours. On CPU the fp8 values widened to fp32 (reference), or ours through the interpreter.
    PAGED_BACKEND_FP8_GEMM=cublas in the environment sends every CUDA product to cuBLAS (for comparison)."""
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"x_q {tuple(x_q.shape)} and w_q {tuple(w_q.shape)} must be [M, K] and [N, K]")
    if x_q.dtype != reference.FP8_KV_DTYPE or w_q.dtype != reference.FP8_KV_DTYPE:
        raise ValueError(f"x_q and w_q must be {reference.FP8_KV_DTYPE}, got {x_q.dtype} and {w_q.dtype}")
    (m, k), n = x_q.shape, w_q.shape[0]
    if x_scale.shape != (m, 1) or w_scale.shape != (1, n):
        raise ValueError(f"x_scale {tuple(x_scale.shape)} must be [{m}, 1] and w_scale {tuple(w_scale.shape)} [1, {n}]")
    mod = _pick(impl, x_q, "triton_gemm")
    if impl is None and mod is not reference:  # CUDA
        in_graph = getattr(_graph, "on", False) and os.environ.get("PAGED_BACKEND_FP8_GEMM") != "cublas"
        if not (in_graph and m <= mod.MAX_ROWS):
            if out_dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0:
                return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
            if m > mod.MAX_ROWS:  # a shape cuBLAS cannot take: ours up to 256 rows, else the fp32 reference
                mod = reference
    return mod.fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype)


def copy_blocks(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole block src[i] to dst[i] in every layer's cache (copy-on-write). Same torch code on every device."""
    if src.shape != dst.shape:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must have the same length")
    if kv_caches:
        reference.copy_blocks(kv_caches, src, dst)


# ---- element-wise ops around attention and the MLP (triton_fused.py) ---------------------------
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    gemma: bool = False,
    fp8_out: bool = False,
    impl: str | None = None,
):
    """RMSNorm over the last dim. With residual: (norm(x + residual), x + residual), the sum in x's
    dtype. Llama style scales by weight after casting back to x's dtype; gemma=True scales by
    (1 + weight) in fp32. fp8_out: the norm, in x's dtype, comes back as `quantize_fp8_rows` of it
    ([rows, N] fp8 and [rows, 1] scales), computed in the same pass (for an fp8 linear after it)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} must be [{x.shape[-1]}] for x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if fp8_out and not gemma and torch.promote_types(weight.dtype, x.dtype) != x.dtype:
        raise ValueError(f"fp8_out needs the norm's output in x's dtype {x.dtype}, but weight is {weight.dtype}")
    if impl is None and x.device.type == "cpu":  # (fp8_out: quantized from the same norm as without it)
        out = cpu_ext.rms_norm(x, weight, eps, residual, gemma)
        if out is not None:
            return reference.fp8_rows_of(out) if fp8_out else out
    return _pick(impl, x, "triton_fused").rms_norm(x, weight, eps, residual, gemma, fp8_out)


def gated_activation(x: torch.Tensor, activation: str, *, fp8_out: bool = False, impl: str | None = None):
    """act(gate) * up for x = cat(gate, up) on the last dim; activation "silu", "gelu_tanh" or "gelu".
    fp8_out: the result comes back as `quantize_fp8_rows` of it, computed in the same pass."""
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: expected one of {sorted(reference.ACTIVATIONS)}")
    if x.shape[-1] % 2:
        raise ValueError(f"the last dim of x {tuple(x.shape)} must be even: cat(gate, up)")
    if impl is None and x.device.type == "cpu":
        out = cpu_ext.gated_activation(x, activation)
        if out is not None:
            return reference.fp8_rows_of(out) if fp8_out else out
    return _pick(impl, x, "triton_fused").gated_activation(x, activation, fp8_out)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """Neox-style rotation of x [T, H, D] by cos/sin [T, D/2] (fp32), computed in x's dtype as
    transformers does; returns a new contiguous tensor."""
    if x.dim() != 3 or cos.shape != (x.shape[0], x.shape[2] // 2) or sin.shape != cos.shape:
        raise ValueError(f"x {tuple(x.shape)} must be [T, H, D] and cos/sin [T, D/2]; got {tuple(cos.shape)}")
    if impl is None and x.device.type == "cpu":
        out = cpu_ext.rotary(x, cos, sin)
        if out is not None:
            return out
    return _pick(impl, x, "triton_fused").rotary(x, cos, sin)


def greedy_sample(logits: torch.Tensor, *, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy choice of each row of logits [N, V]: (argmax [N] int64, the first index among ties;
    its log-probability under softmax(logits), [N] fp32, computed in fp32). On CUDA one pass over
    the logits instead of separate argmax and logsumexp reductions; on the CPU (fp32) two (cpu_ext.py)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point [N, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    if impl is None and logits.device.type == "cpu":
        out = cpu_ext.greedy_sample(logits)
        if out is not None:
            return out
    return _pick(impl, logits, "triton_fused").greedy_sample(logits)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias: F.linear, except at most cpu_ext.MAX_ROWS fp32 rows on the CPU, which
    the project's own kernel computes (it reads the weights once however many rows there are)."""
    if cpu_ext.fits_linear(x, weight):
        return cpu_ext.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def load_cpu_kernels() -> bool:
    """Build (first time on a machine) or load the CPU kernels now rather than in the first step;
    False when they are unavailable (F.linear and the reference ops then run instead)."""
    return cpu_ext.load() is not None

"""The fp8 linear at decode batch sizes: y = (x_q @ w_q^T) * x_scale[m] * w_scale[n] in one Triton GEMM.

At a few hundred rows a linear layer's GEMM is a short, wide problem, and cuBLAS's fp8 kernels cover it
with 128 x 128 tiles: a 2048-wide projection of 256 rows is 32 programs on a 132-SM GPU, so most of the
machine waits while they stream the weight. Here the tiles are chosen for the shape (`config`): narrow
tiles along the output features and, when that still leaves SMs idle, the reduction dimension split
over programs (split-K). Split-K programs write fp32 partial sums, which a second kernel adds in a
fixed order and scales (no atomics: the result does not depend on scheduling).

Both operands are read along K (x_q [M, K] and w_q [N, K], row-major), the layout fp8 tensor-core
products take. The kernels call only Triton builtins (tl.full, not tl.zeros or tl.cdiv: those are jit
helpers, which an interpreted kernel cannot call; see triton_impl.py). Under Triton's interpreter (CPU
tests) the fp8 tiles are widened to fp16 before the dot: every e4m3 value is an fp16 value and the
products are exact in fp32 either way.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 256  # kernels.fp8_matmul in CUDA-graph passes: this GEMM up to here, cuBLAS's above (BENCHMARKS.md)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


# Output tiles from the widest down: the first that gives at least ~0.7 programs per SM is taken.
_TILES = ((128, 128), (64, 128), (64, 64))


@functools.lru_cache(maxsize=4096)
def config(m: int, n: int, k: int, num_sms: int = 132, max_smem: int = 227 * 1024) -> GemmConfig:
    """Tiles for an [m, k] x [n, k]^T product (m up to a few hundred rows): the widest output tile that
    keeps ~0.7 programs per SM, then, if the grid is still short of that, K split over programs (each
    split at least 1024 deep). Chosen from a sweep of 60 configs at the Llama-3.2-1B and Llama-3-8B
    projections on an H200 (paged_backend/bench/fp8_gemm.py --sweep, BENCHMARKS.md): 128 x 128 tiles
    run 128-deep K steps on 8 warps, narrower ones 256-deep steps on 4, with a deeper pipeline for long K
    loops. Tiles never have more rows than max(m, 64). On a GPU with less shared memory than an H100's
    (max_smem bytes a program; Ada: 99 KB) the pipeline gets shallower, then the K steps shorter."""
    want = 0.7 * num_sms
    for block_m, block_n in _TILES:
        if block_m > max(m, 64):
            continue
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        if programs >= want:
            break
    block_k = 128 if block_n * block_m == 128 * 128 else 256
    split_k = 1
    while programs * split_k < want and k // (split_k * 2) >= 1024:
        split_k *= 2
    stages = 4 if k // split_k >= 8192 else 3
    while (block_m + block_n) * block_k * stages > max_smem and (stages > 2 or block_k > 64):
        if stages > 2:
            stages -= 1
        else:
            block_k //= 2
    return GemmConfig(block_m, block_n, block_k, split_k, 8 if block_k == 128 else 4, stages)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, WIDEN: tl.constexpr,
):
    # Programs that share a weight tile are adjacent (pid_m runs fastest), so the tile is read from
    # memory once and from L2 by the rest.
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_m = pid % tiles_m
    pid_n = pid // tiles_m
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k0 + offs_k) < k_hi
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if WIDEN:
            x = x.to(tl.float16)
            w = w.to(tl.float16)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SPLIT_K == 1:
        xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
        ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
        y = acc * xs[:, None] * ws[None, :]
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        part_ptrs = part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_k_sum_kernel(part_ptr, xs_ptr, ws_ptr, out_ptr, M, N, stride_om,
                        SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # One program per BLOCK outputs of one row: the partial sums added in split order, then scaled.
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + row).to(tl.int64) * N + cols, mask=ok, other=0.0)
    y = acc * tl.load(xs_ptr + row) * tl.load(ws_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> tuple[int, int]:
    """(SMs, shared memory a program may use in bytes) of a CUDA device; an H100's on the CPU (interpreter)."""
    if device.type != "cuda":
        return 132, 227 * 1024
    index = device.index if device.index is not None else torch.cuda.current_device()
    limits = triton.runtime.driver.active.utils.get_device_properties(index)
    return limits["multiprocessor_count"], limits["max_shared_mem"]


def fp8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               out_dtype: torch.dtype, cfg: GemmConfig | None = None) -> torch.Tensor:
    """(x_q [M, K] @ w_q [N, K]^T) * x_scale [M, 1] * w_scale [1, N] -> [M, N] out_dtype (fp32 accumulation).
    cfg: the launch's tiles (default `config(M, N, K)` for this GPU)."""
    m, k = x_q.shape
    n = w_q.shape[0]
    if x_q.stride(1) != 1 or w_q.stride(1) != 1:
        raise ValueError("x_q and w_q must be contiguous along K")
    if cfg is None:
        cfg = config(m, n, k, *_device_limits(x_q.device))
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    xs = x_scale.reshape(-1)
    ws = w_scale.reshape(-1)
    # Each split is a whole number of BLOCK_K steps, so only the last one can end inside a step.
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)
    part = torch.empty(split_k, m, n, dtype=torch.float32, device=x_q.device) if split_k > 1 else out
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    _fp8_gemm_kernel[grid](
        x_q, w_q, xs, ws, out, part, m, n, k, x_q.stride(0), w_q.stride(0), out.stride(0), k_per_split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split_k, WIDEN=_INTERPRET,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split_k > 1:
        block = 1024
        _split_k_sum_kernel[(m, triton.cdiv(n, block))](part, xs, ws, out, m, n, out.stride(0),
                                                        SPLIT_K=split_k, BLOCK=block, num_warps=4)
    return out

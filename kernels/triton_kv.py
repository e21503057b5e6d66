"""Triton kernels of the KV cache's layout: store_kv, and the reader of an fp8 cache's transposed V tiles
that the attention kernels (triton_impl, triton_decode) share.

Layout (DESIGN.md): kv_cache [num_blocks, 2, block_size, Hkv, D]. An fp8 cache keeps each block's V half
transposed, [Hkv, D, block_size] (kernels/__init__): attention's P.V contracts over keys, so its fp8
operand is then read along its contiguous dimension, as K is.

Like the other kernel modules it imports only torch and triton, and is loaded through kernels/__init__'s
`_triton_module` (compiled, or a second time interpreted for CPU tensors).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Decided when this module is executed, like Triton's own choice between compiled and interpreted kernels.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _fp8_bits(x):
    """float32 x (already saturated to +-448) -> its float8_e4m3fn bit pattern (uint8), rounded to nearest
    even, by integer arithmetic. Only the interpreter uses it: its own float8 cast truncates instead of
    rounding when the mantissa carries into the exponent and mangles results below 2**-6 (Triton 3.x)."""
    a = tl.abs(x)
    u = a.to(tl.uint32, bitcast=True)
    # Normal range (>= 2**-6): round the fp32 pattern to 3 mantissa bits, rebias the exponent 127 -> 7.
    normal = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) - (120 << 3)
    # Below it the e4m3 grid is 2**-9: round a * 512 half-to-even (the 1.5 * 2**23 trick).
    sub = ((a * 512.0 + 12582912.0) - 12582912.0).to(tl.uint32)
    bits = tl.where(a >= 0.015625, normal, sub)
    bits = bits | ((x.to(tl.uint32, bitcast=True) >> 24) & 0x80)  # the sign bit, -0.0 included
    return bits.to(tl.uint8)


@triton.jit
def _to_cache(x, inv_scale, cache_ptr, FP8: tl.constexpr, SOFT_FP8: tl.constexpr):
    """A K or V row in the cache's dtype: for an fp8 cache x * inv_scale, saturated to +-448."""
    if FP8:
        y = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -448.0), 448.0)
        if SOFT_FP8:
            return _fp8_bits(y).to(cache_ptr.dtype.element_ty, bitcast=True)
        else:
            return y.to(cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # as torch rounds
    else:
        return x.to(cache_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["T"])
def _store_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, inv_k_scale, inv_v_scale, T,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_cs, stride_ch,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr, SOFT_FP8: tl.constexpr,
):
    """Program (i, h): tokens [i * BLOCK_T, (i + 1) * BLOCK_T) of KV head h."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + offs_t, mask=offs_t < T, other=-1).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_d = tl.arange(0, BLOCK_D)
    mask = (slot >= 0)[:, None] & (offs_d < D)[None, :]
    row = offs_t.to(tl.int64)[:, None]
    k = tl.load(k_ptr + row * stride_kt + h * stride_kh + offs_d[None, :], mask=mask)
    v = _to_cache(tl.load(v_ptr + row * stride_vt + h * stride_vh + offs_d[None, :], mask=mask), inv_v_scale,
                  cache_ptr, FP8, SOFT_FP8)
    dst = cache_ptr + blk[:, None] * stride_cb + off[:, None] * stride_cs + h * stride_ch + offs_d[None, :]
    tl.store(dst, _to_cache(k, inv_k_scale, cache_ptr, FP8, SOFT_FP8), mask=mask)
    if FP8:  # V transposed inside its block ([Hkv, D, block_size], see _fp8_v_tile), stored as V^T [D, tokens]:
        # neighbouring lanes take neighbouring tokens, whose slots are neighbours within a block in a prompt
        dst = (cache_ptr + blk[None, :] * stride_cb + stride_ckv + h * (D * BLOCK_SIZE) + offs_d[:, None] * BLOCK_SIZE
               + off[None, :])
        tl.store(dst, tl.trans(v), mask=tl.trans(mask))
    else:
        tl.store(dst + stride_ckv, v, mask=mask)


def store_kv(key, value, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    t, h, d = key.shape
    if t == 0:
        return
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    if kv_cache.stride(4) != 1:
        raise ValueError("kv_cache must be contiguous in its last (head_dim) dimension")
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    block_t = 16
    _store_kv_kernel[(triton.cdiv(t, block_t), h)](
        key, value, kv_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale, t,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        D=d, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d), BLOCK_SIZE=kv_cache.shape[2],
        FP8=fp8, SOFT_FP8=fp8 and _INTERPRETED,
    )


@triton.jit
def _fp8_v_tile(kv_ptr, bt_row_ptr, start, hi, kvh, offs_d, d_mask, stride_cb, stride_ckv,
                HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, V_RUN: tl.constexpr,
                MASKED: tl.constexpr):
    """V^T [BLOCK_D, BLOCK_N], raw fp8, of keys [start, start + BLOCK_N) (start a multiple of BLOCK_N); with
    MASKED, keys >= hi read 0 (slots past a sequence's end may hold anything, NaN bytes included).
    An fp8 cache keeps V transposed inside each block ([Hkv, D, block_size], kernels/__init__): the dot
    P.V contracts over keys, so its fp8 operand is read along its contiguous dimension, as K's is, and
    converts to fp16 after the shared-memory load instead of through a second round trip.
    V_RUN (`v_run`): keys per contiguous run, a power of two dividing BLOCK_N and block_size, so the loads
    are runs of V_RUN bytes; 0 for other block sizes (one gather per key)."""
    if V_RUN > 0:
        start = tl.multiple_of(start, BLOCK_N)
        NUM_RUNS: tl.constexpr = BLOCK_N // V_RUN
        first = start + tl.arange(0, NUM_RUNS) * V_RUN  # each run's first key, all in one block
        phys = tl.load(bt_row_ptr + first // BLOCK_SIZE, mask=first < hi, other=0).to(tl.int64)
        base = phys * stride_cb + stride_ckv + kvh * (HEAD_DIM * BLOCK_SIZE)
        if BLOCK_SIZE > BLOCK_N:  # the whole tile is one run inside a block
            base += tl.multiple_of(start % BLOCK_SIZE, BLOCK_N)
        offs_s = tl.arange(0, V_RUN)
        ptr = kv_ptr + base[None, :, None] + offs_d[:, None, None] * BLOCK_SIZE + offs_s[None, None, :]
        if MASKED:  # whole runs (vector loads), then the keys past hi zeroed as bytes
            v = tl.load(ptr, mask=d_mask[:, None, None] & (first < hi)[None, :, None], other=0.0)
            key_ok = (first[None, :, None] + offs_s[None, None, :]) < hi
            v = tl.where(key_ok, v.to(tl.uint8, bitcast=True), 0).to(v.dtype, bitcast=True)
        else:
            v = tl.load(ptr, mask=d_mask[:, None, None], other=0.0)
        v = tl.reshape(v, [offs_d.shape[0], BLOCK_N])
    else:
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        phys = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        base = phys * stride_cb + stride_ckv + kvh * (HEAD_DIM * BLOCK_SIZE) + offs_n % BLOCK_SIZE
        v = tl.load(kv_ptr + base[None, :] + offs_d[:, None] * BLOCK_SIZE, mask=n_ok[None, :] & d_mask[:, None],
                    other=0.0)
    return v


def v_run(block_size: int, block_n: int) -> int:
    """_fp8_v_tile's V_RUN for a kernel's BLOCK_N (a power of two)."""
    return min(block_size, block_n) if block_size & (block_size - 1) == 0 else 0

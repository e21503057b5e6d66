"""Triton kernels: one varlen paged-attention kernel (prefill, chunked prefill and decode mixed),
an optional split-K (flash-decoding) mode of that kernel for decode-only batches, and its reduce kernel.

Layout (DESIGN.md): kv_cache [num_blocks, 2, block_size, Hkv, D], an fp8 cache's V halves transposed
([Hkv, D, block_size], triton_kv, which also holds store_kv). Attention program (i, kvh, split)
handles BLOCK_Q query tokens of one sequence times the G = Hq / Hkv query heads that share KV head
kvh, packed as BLOCK_M = BLOCK_Q * G rows (row r: token r // G, head kvh * G + r % G), so each K/V
tile read from the cache serves all G heads. Programs are numbered over the flat token axis: seq b
owns the ids [qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q + b + 1), which needs no host-side
knowledge of the per-sequence lengths (no device->host sync; a fixed grid of T // BLOCK_Q + B).

Decode-only batches over an fp8 cache go to triton_decode.py's kernel instead (see there).

This module imports only torch, triton and, through kernels/__init__'s loader in this module's own mode,
triton_kv (triton_decode at call time) because kernels/__init__.py loads it a second time under
TRITON_INTERPRET=1 for CPU tensors. For the same reason the kernels call only Triton builtins (tl.reduce
with our own combine functions instead of tl.max / tl.sum / tl.sigmoid / tl.cdiv): those library helpers are jit
functions of Triton's own, compiled-mode when triton was imported without the interpreter, and an
interpreted kernel cannot call them.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import _triton_module

LOG2E = 1.4426950408889634
# Decided when this module is executed, like Triton's own choice between compiled and interpreted kernels.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_kv = _triton_module(_INTERPRETED, "triton_kv")
_fp8_v_tile, v_run = _kv._fp8_v_tile, _kv.v_run


@triton.jit
def _own_max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _own_sum(a, b):
    return a + b


# Triton's own combine functions where present: the interpreter recognises them and reduces with numpy
# (with any other combine function it loops over elements in Python); compiled code is the same.
_max_combine = getattr(tl.standard, "_elementwise_max", _own_max)
_sum_combine = getattr(tl.standard, "_sum_combine", _own_sum)


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's interpreter multiplies bf16 as raw integers (numpy has no bf16), so there the
    # operands go through fp32 first; compiled kernels never set it.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _fp8_to_f16(x, SOFT_FP8: tl.constexpr):
    """float8_e4m3fn -> float16 (exact: every e4m3 value is an fp16 value), one cvt per 2 values.
    Inline PTX, not x.to(tl.float16), and deliberately not pure, so Triton keeps it where it is: on the
    16-byte vectors the load produced, before the shared-memory round trip. This kernel's prefill dots are
    wgmma, which read fp16 operands from shared memory anyway (a plain conversion compiled to more
    instructions there, offline sm_90 SASS); triton_decode's mma dots convert after the round trip instead."""
    if SOFT_FP8:  # the interpreter runs no PTX
        return x.to(tl.float16)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _fp16_rows(q, qk_scale):
    """q [BLOCK_M, D] -> (q * 2**e_r in fp16, qk_scale * 2**-e_r as [BLOCK_M, 1]) with a power of two per row
    that puts the row's largest |q| in [2**14, 2**15): exact scaling, so fp16's range cannot overflow
    or flush a row whatever q's magnitude, and fp16 keeps all of bf16's 8 mantissa bits."""
    qf = q.to(tl.float32)
    amax = tl.reduce(tl.abs(qf), 1, _max_combine)
    expo = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of the row max (0 for a zero row)
    sh = tl.minimum(tl.maximum(141 - expo, -126), 126)  # 2**sh and 2**-sh are normal fp32 numbers
    up = ((sh + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - sh) << 23).to(tl.float32, bitcast=True)
    return (qf * up[:, None]).to(tl.float16), (qk_scale * down)[:, None]


@triton.jit
def _log2_logits(s, qk_scale, softcap, USE_SOFTCAP: tl.constexpr):
    """Raw q.k products -> scaled logits in the log2 domain (qk_scale = scale * log2(e), a scalar or per
    row). With softcap: softcap * tanh(x * scale / softcap) first, tanh(y) = 2 * sigmoid(2y) - 1, whose
    argument s * scale / softcap is s * qk_scale / (log2(e) * softcap)."""
    if USE_SOFTCAP:
        out = softcap * (2.0 / (1.0 + tl.exp(s * (-2.0 * qk_scale / (1.4426950408889634 * softcap)))) - 1.0)
        out = out * 1.4426950408889634
    else:
        out = s * qk_scale
    return out


@triton.jit
def _online_softmax(s, m_i, l_i, AXIS: tl.constexpr):
    """One tile of the online softmax over keys along AXIS of the log2-domain logits s: (p, alpha, m_new,
    l_new), where the running output is rescaled by alpha and gains p's product with V. Rows with
    nothing visible yet (all -inf) stay at zero."""
    m_new = tl.maximum(m_i, tl.reduce(s, AXIS, _max_combine))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - tl.expand_dims(m_safe, AXIS))
    alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.reduce(p, AXIS, _sum_combine)


@triton.jit
def _find_seq(qsl_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """Largest b with qsl[b] // BLOCK_Q + b <= pid (binary search; those starts strictly increase)."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if start <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, start, kv_ptr, bt_row_ptr, kvh, q_pos, hi, offs_d, d_mask,
    qk_scale, softcap, window,
    stride_cb, stride_ckv, stride_cs, stride_ch,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, FP8_KV: tl.constexpr,
    SOFT_FP8: tl.constexpr, HEAD_DIM: tl.constexpr, V_RUN: tl.constexpr,
):
    """One BLOCK_N tile of keys [start, start + BLOCK_N): online-softmax update in the log2 domain.
    qk_scale: a scalar, or per row [BLOCK_M, 1] (fp8 cache, _fp16_rows)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        n_ok = offs_n < hi
        phys = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        base = phys * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        k = tl.load(kv_ptr + base[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_mask[:, None], other=0.0)
    else:
        phys = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE).to(tl.int64)
        base = phys * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        k = tl.load(kv_ptr + base[None, :] + offs_d[:, None], mask=d_mask[:, None], other=0.0)
    # An fp8 cache's values are exact in fp16 (q's dtype here unless fp32); its K scale is folded into
    # qk_scale, its V scale into the output.
    if FP8_KV:
        k = _fp8_to_f16(k, SOFT_FP8)
    s = _dot(q, k.to(q.dtype), DOT_PREC, UPCAST)
    s = _log2_logits(s, qk_scale, softcap, USE_SOFTCAP)
    if MASKED:
        keep = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            keep = keep & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
    p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i, 1)
    if FP8_KV:
        v = tl.trans(_fp8_to_f16(_fp8_v_tile(kv_ptr, bt_row_ptr, start, hi, kvh, offs_d, d_mask, stride_cb,
                                             stride_ckv, HEAD_DIM, BLOCK_SIZE, BLOCK_N, V_RUN, MASKED), SOFT_FP8))
    elif MASKED:
        v = tl.load(kv_ptr + stride_ckv + base[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_mask[None, :],
                    other=0.0)
    else:
        v = tl.load(kv_ptr + stride_ckv + base[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), DOT_PREC, UPCAST)
    return acc, m_new, l_i


# Integers that change from step to step are not specialised on (Triton would otherwise compile a variant
# for each value that is 1 or a multiple of 16, on first use, in the middle of serving).
@triton.jit(do_not_specialize=["num_seqs", "first_seq", "chunk_len", "window", "stride_bt"])
def _paged_attn_kernel(
    q_ptr, kv_ptr, out_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, v_scale, softcap, window, num_seqs, first_seq, chunk_len,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_cs, stride_ch, stride_bt,
    stride_pt, stride_ph, stride_ps,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, DIRECT: tl.constexpr, FP8_KV: tl.constexpr, SOFT_FP8: tl.constexpr, V_RUN: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DIRECT:  # every sequence has exactly one new token: program i is sequence i, no search
        b = pid
        q_start = pid
        q_len = 1
        qb = 0
    else:  # sequences first_seq.. (a mixed batch's prompts after its decodes, which another launch runs)
        qsl_part = qsl_ptr + first_seq
        pid += tl.load(qsl_part) // BLOCK_Q
        rel = _find_seq(qsl_part, num_seqs - first_seq, pid, BLOCK_Q)
        b = first_seq + rel
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        qb = pid - (q_start // BLOCK_Q + rel)
    if qb * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + b)
        first_pos = seq_len - q_len  # position of the sequence's first new token
        offs_m = tl.arange(0, BLOCK_M)
        tok = qb * BLOCK_Q + offs_m // G
        head = kvh * G + offs_m % G
        row_ok = (offs_m < BLOCK_Q * G) & (tok < q_len)
        q_pos = first_pos + tok
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        row = (q_start + tok).to(tl.int64)
        q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_mask[None, :], other=0.0)
        qk = qk_scale
        if FP8_KV and q.dtype != tl.float32:
            # An fp8 cache's K/V tiles convert to fp16 in one instruction per pair (to bf16 in three, which
            # made the fp8 kernel slower per byte than the bf16 one); the dots run in fp16.
            q, qk = _fp16_rows(q, qk_scale)

        # Keys this tile needs: [lo, hi). min_pos / max_pos: positions of its first and last query token.
        min_pos = first_pos + qb * BLOCK_Q
        max_pos = first_pos + tl.minimum(q_len, (qb + 1) * BLOCK_Q) - 1
        hi = max_pos + 1
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(min_pos - window + 1, 0)
        split_hi = hi
        if SPLIT:
            lo = tl.maximum(lo, split * chunk_len)
            split_hi = (split + 1) * chunk_len  # chunk_len is a multiple of BLOCK_N
            hi = tl.minimum(hi, split_hi)
        lo = (lo // BLOCK_N) * BLOCK_N
        # Tiles that need no mask: every key visible to every row (below the diagonal, inside the window).
        full_hi = tl.minimum(((min_pos + 1) // BLOCK_N) * BLOCK_N, split_hi)
        full_lo = lo
        if USE_WINDOW:
            full_lo = tl.maximum(lo, ((max_pos - window + BLOCK_N) // BLOCK_N) * BLOCK_N)
        if full_lo >= full_hi:
            full_lo = hi
            full_hi = hi

        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        for start in range(lo, full_lo, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, start, kv_ptr, bt_row, kvh, q_pos, hi, offs_d, d_mask, qk, softcap, window,
                stride_cb, stride_ckv, stride_cs, stride_ch,
                BLOCK_N, BLOCK_SIZE, True, USE_WINDOW, USE_SOFTCAP, DOT_PREC, UPCAST, FP8_KV, SOFT_FP8,
                HEAD_DIM, V_RUN)
        for start in range(full_lo, full_hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, start, kv_ptr, bt_row, kvh, q_pos, hi, offs_d, d_mask, qk, softcap, window,
                stride_cb, stride_ckv, stride_cs, stride_ch,
                BLOCK_N, BLOCK_SIZE, False, USE_WINDOW, USE_SOFTCAP, DOT_PREC, UPCAST, FP8_KV, SOFT_FP8,
                HEAD_DIM, V_RUN)
        for start in range(full_hi, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, start, kv_ptr, bt_row, kvh, q_pos, hi, offs_d, d_mask, qk, softcap, window,
                stride_cb, stride_ckv, stride_cs, stride_ch,
                BLOCK_N, BLOCK_SIZE, True, USE_WINDOW, USE_SOFTCAP, DOT_PREC, UPCAST, FP8_KV, SOFT_FP8,
                HEAD_DIM, V_RUN)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        res = acc * (v_scale / l_safe)[:, None]
        st_mask = row_ok[:, None] & d_mask[None, :]
        if SPLIT:
            # Partial result of this split, normalised, plus its log2-sum-exp for the reduce kernel.
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
            p_off = row * stride_pt + head * stride_ph + split * stride_ps
            tl.store(part_out_ptr + p_off[:, None] + offs_d[None, :], res, mask=st_mask)
            # part_lse is part_out without its last (BLOCK_D) dimension: same strides divided by BLOCK_D.
            tl.store(part_lse_ptr + (row * stride_pt + head * stride_ph) // BLOCK_D + split, lse, mask=row_ok)
        else:
            tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     res.to(out_ptr.dtype.element_ty), mask=st_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _split_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits,
    stride_pt, stride_ph, stride_ps, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    base = t * stride_pt + h * stride_ph
    lse = tl.load(part_lse_ptr + base // BLOCK_D + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.reduce(lse, 0, _max_combine)
    w = tl.math.exp2(lse - m)  # empty splits have lse -inf: weight 0
    w = w / tl.reduce(w, 0, _sum_combine)
    o = tl.load(part_out_ptr + base + offs_s[:, None] * stride_ps + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    res = tl.reduce(o * w[:, None], 0, _sum_combine)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device, off_cuda: int) -> int:
    """The SM count of a CUDA device; off_cuda for the interpreter (CPU tensors), as the caller's
    heuristics want it tested there."""
    if device.type != "cuda":
        return off_cuda
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def _launch_config(max_query_len: int, g: int, d: int, decode: bool, fp8: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), from sweeps on an H100 and an H200 (BENCHMARKS.md)."""
    if decode:  # memory-bound: few warps, deep cp.async pipeline
        block_m = max(16, triton.next_power_of_2(g))
        if fp8:  # twice the keys per tile: the bytes of a 2-byte tile (at head_dim 128 2 warps spill)
            return (block_m, 128, 2, 4) if d <= 64 else (block_m, 128, 4, 3) if d <= 128 else (block_m, 64, 4, 3)
        # (five stages at head_dim <= 64, on an H200: 1.04x at workload-A contexts, 1.18x split-K at 16 x 4k,
        # 0.99x at 256 x 4k)
        return (block_m, 64, 2, 5 if d <= 64 else 4) if d <= 128 else (block_m, 32, 4, 3)
    big = 128 if d <= 128 else 64
    block_m = min(big, max(16, triton.next_power_of_2(max_query_len * g)))
    block_m = max(block_m, triton.next_power_of_2(g))
    if d <= 64 and block_m == 128 and not fp8:  # H200: 1.25x at 16 x 512 tokens, 1.30x at 1 x 8192 (BENCHMARKS.md)
        return block_m, 64, 8, 2
    if d <= 128:
        return block_m, 32, 4, 3
    return block_m, 32, 8 if block_m >= 64 else 4, 2


def _choose_splits(batch: int, hkv: int, max_seq_len: int, device: torch.device, kv_bytes: int = 2) -> int:
    """Split the context only when batch x KV heads leaves the GPU under-filled and contexts are long.
    Counted in bytes: a split reads at least what 128 keys of a 2-byte cache hold (256 fp8 keys)."""
    sms = num_sms(device, off_cuda=8)
    progs = batch * hkv
    min_keys = 128 * max(1, 2 // kv_bytes)
    if progs >= 2 * sms or max_seq_len < 2 * min_keys:
        return 1
    want = triton.cdiv(2 * sms, progs)
    return max(1, min(want, max_seq_len // min_keys, 64))


def split_plan(q, num_splits, max_seq_len, block_n):
    """Split-K of a decode batch into num_splits chunks of the context (each a multiple of block_n keys):
    (num_splits, chunk_len, part_out, part_lse, part_out's first three strides). The count can shrink (chunks
    that would start past max_seq_len); with 1 there is no split: chunk_len 0 and q stands in for the
    (unused) partial buffers."""
    if num_splits > 1:
        chunk_len = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
        num_splits = triton.cdiv(max_seq_len, chunk_len)
    if num_splits <= 1:
        return 1, 0, q, q, (0, 0, 0)
    t, hq, d = q.shape
    part_out = torch.empty(t, hq, num_splits, triton.next_power_of_2(d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty(t, hq, num_splits, dtype=torch.float32, device=q.device)
    return num_splits, chunk_len, part_out, part_lse, part_out.stride()[:3]


def reduce_splits(part_out, part_lse, out, num_splits, p_strides):
    """out [T, Hq, D] <- the splits' partial results weighted by their log-sum-exps."""
    t, hq, d = out.shape
    _split_reduce_kernel[(t, hq)](
        part_out, part_lse, out, num_splits, *p_strides, out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), SPLITS_PAD=triton.next_power_of_2(num_splits),
    )


def _fp8_decode_module():
    from . import _triton_module  # at call time: kernels/__init__ is what loads this module

    return _triton_module(_INTERPRETED, "triton_decode")


def paged_attention(
    q, kv_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, softcap, out,
    *, max_query_len=None, max_seq_len=None, k_scale=1.0, v_scale=1.0, num_splits=None, config=None, num_decodes=0,
):
    """See paged_backend.kernels.paged_attention. num_splits / config override the heuristics (tests, bench)."""
    if kv_cache.dtype != torch.float8_e4m3fn:
        k_scale = v_scale = 1.0
    t = q.shape[0]
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if t == 0 or num_seqs == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    dst = out if out.stride(2) == 1 else torch.empty_like(q)
    if kv_cache.stride(4) != 1:
        raise ValueError("kv_cache must be contiguous in its last (head_dim) dimension")
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len > 1 and 0 < num_decodes < num_seqs and num_splits is None and config is None:
        # A mixed batch: its leading one-token sequences as a decode batch (unsplit: the decode kernel variant
        # that start-up compiles, ModelRunner.warm_up), then the prompts. Slices share their tensors' first
        # element, and the prompts' launch takes whole tensors and first_seq, so no launch meets a pointer
        # alignment that Triton would compile another variant for in the middle of serving.
        n = num_decodes
        _attend(q[:n], kv_cache, block_tables[:n], seq_lens[:n], query_start_loc[: n + 1], scale, sliding_window,
                softcap, dst[:n], 1, max_seq_len, k_scale, v_scale, 1, None)
        _attend(q, kv_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, softcap, dst,
                max_query_len, max_seq_len, k_scale, v_scale, 1, None, first_seq=n)
    else:
        _attend(q, kv_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, softcap, dst,
                max_query_len, max_seq_len, k_scale, v_scale, num_splits, config)
    if dst is not out:
        out.copy_(dst)
    return out


def _attend(q, kv_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, softcap, dst,
            max_query_len, max_seq_len, k_scale, v_scale, num_splits, config, first_seq=0):
    """One launch over sequences first_seq.. (first_seq > 0: those after a mixed batch's first_seq decodes,
    one query row each)."""
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    t, hq, d = q.shape
    t -= first_seq
    _, _, block_size, hkv, _ = kv_cache.shape
    g = hq // hkv
    num_seqs = seq_lens.shape[0]
    decode = max_query_len == 1
    block_m, block_n, warps, stages = config or _launch_config(max_query_len, g, d, decode, fp8)
    block_q = block_m // g
    if num_splits is None:
        num_splits = 1
        if decode:
            if max_seq_len is None:
                max_seq_len = int(seq_lens.max())
            num_splits = _choose_splits(num_seqs, hkv, max_seq_len, q.device, kv_cache.element_size())
    elif num_splits > 1 and max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if num_splits > 1 and not decode:
        raise ValueError("split-K runs only on decode-only batches (every query length 1)")
    if fp8 and config is None and decode and t == num_seqs and d <= 128:
        # one token per sequence over an fp8 cache: triton_decode's kernel (keys on the dots' M dimension)
        _fp8_decode_module().fp8_decode(q, kv_cache, block_tables, seq_lens, scale * k_scale * LOG2E, float(v_scale),
                                        sliding_window, softcap, dst, num_splits, max_seq_len)
        return
    num_splits, chunk_len, part_out, part_lse, p_strides = split_plan(q, num_splits, max_seq_len, block_n)
    direct = decode and t == num_seqs  # one token per sequence: one program per sequence
    # (programs count from query_start_loc[first_seq] // block_q: one more when that is not a whole tile)
    grid = (num_seqs if direct else t // block_q + num_seqs - first_seq + (first_seq > 0), hkv, num_splits)
    _paged_attn_kernel[grid](
        q, kv_cache, dst, block_tables, seq_lens, query_start_loc, part_out, part_lse,
        scale * k_scale * LOG2E, float(v_scale), float(softcap or 0.0), int(sliding_window or 0), num_seqs,
        first_seq, chunk_len, q.stride(0), q.stride(1), dst.stride(0), dst.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        *p_strides,
        G=g, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None, SPLIT=num_splits > 1,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=_INTERPRETED and q.dtype == torch.bfloat16 and not fp8, DIRECT=direct, FP8_KV=fp8,
        SOFT_FP8=fp8 and _INTERPRETED, V_RUN=v_run(block_size, block_n),
        num_warps=warps, num_stages=stages,
    )
    if num_splits > 1:
        reduce_splits(part_out, part_lse, dst, num_splits, p_strides)

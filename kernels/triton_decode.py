"""Decode attention over an fp8 KV cache with the keys on the tensor cores' M dimension.

triton_impl's kernel puts a program's G query heads on the rows (M) of its dots: S = q K^T is
[16, keys] with G = 4 of the 16 rows real (the MMA's smallest M), and the online softmax runs over
all 16. Over an fp8 cache a 16 KB tile holds twice the keys of a bf16 one, so that per-key work
doubles per byte. Here the product is transposed: S^T = K q^T is [keys, G] (keys fill M; the G heads
sit on N, which Triton pads to the MMA's 8) and out^T = V^T P^T, so the dots and the softmax do half
the work per key, and one or two warps per program give more programs per SM.

Both dots read their fp8 operand along the contracted dimension (K's rows; V^T's rows, which is why an
fp8 cache stores V transposed per block, see triton_kv._fp8_v_tile), and the conversion to fp16 is a
plain one: Triton then converts after the shared-memory load into the dot operand (ldmatrix of the fp8
bytes, cvt in registers), with no second round trip of the converted tile through shared memory.
Measured on an H200 at workload-A contexts (BENCHMARKS.md, tenth session): 80 % of the copy rate at
head_dim 128, 70 % at 64 (53 % and 52 % before the transposed V; over a bf16 cache the transposed
product was no faster, so bf16 stays in triton_impl). At head_dim 64 a program of a full batch takes
two KV heads (`heads_per_program`): their keys share 128-byte lines (twelfth session: 74 % at
workload-A contexts, 99 % at 256 x 4k).

Decode-only batches (one new token per sequence), split-K, sliding windows and softcapping as in
triton_impl (its helpers and split reduce kernel are shared). Loaded through kernels/__init__'s
`_triton_module` in the same mode as this module (compiled, or interpreted for CPU tensors).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _triton_module

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_impl = _triton_module(_INTERPRETED, "triton_impl")
_kv = _triton_module(_INTERPRETED, "triton_kv")
_fp16_rows, _fp8_v_tile = _impl._fp16_rows, _kv._fp8_v_tile
_log2_logits, _online_softmax = _impl._log2_logits, _impl._online_softmax


@triton.jit
def _widen(x, WIDE: tl.constexpr):
    """Raw fp8 -> the dots' dtype: fp16 (exact), or fp32 (WIDE: an fp32 q, or the interpreter, which
    multiplies fp16 no better). A plain (pure) conversion, so Triton converts after the shared-memory load
    into the dot operand's layout: both operands are read along their contracted dimension (K rows, V^T
    rows), and the fp8 bytes go through shared memory once (cp.async in, ldmatrix out)."""
    if WIDE:
        return x.to(tl.float32)
    else:
        return x.to(tl.float16)


@triton.jit
def _decode_tile(acc, m_i, l_i, qt, qk, start, hi, seq_len, window, softcap, kv_ptr, bt_row, kvh, offs_d, d_mask,
                 stride_cb, stride_ckv, stride_cs, stride_ch,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, V_RUN: tl.constexpr,
                 USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, WIDE: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Keys [start, start + BLOCK_N): one online-softmax update of out^T. MASKED: the tile reaches past hi
    (K rows past it are masked, V's runs read whole with those keys zeroed); other tiles load unmasked."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hi
    if MASKED:
        phys = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        kmask = n_ok[:, None] & d_mask[None, :]
    else:
        phys = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
        kmask = d_mask[None, :]
    base = phys * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
    k = _widen(tl.load(kv_ptr + base[:, None] + offs_d[None, :], mask=kmask, other=0.0), WIDE)
    s = tl.dot(k, qt.to(k.dtype), input_precision=DOT_PREC)  # S^T [BLOCK_N, GP]
    s = _log2_logits(s, qk, softcap, USE_SOFTCAP)
    keep = n_ok
    if USE_WINDOW:
        keep = keep & (offs_n > seq_len - 1 - window)
    s = tl.where(keep[:, None], s, float("-inf"))
    p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i, 0)  # over keys: S^T's rows
    vt = _widen(_fp8_v_tile(kv_ptr, bt_row, start, hi, kvh, offs_d, d_mask, stride_cb, stride_ckv,
                            HEAD_DIM, BLOCK_SIZE, BLOCK_N, V_RUN, MASKED), WIDE)
    acc = acc * alpha[None, :] + tl.dot(vt, p.to(vt.dtype), input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["chunk_len", "window", "stride_bt"])
def _fp8_decode_kernel(
    q_ptr, kv_ptr, out_ptr, bt_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, v_scale, softcap, window, chunk_len,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_cs, stride_ch, stride_bt,
    stride_pt, stride_ph, stride_ps,
    G: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, V_RUN: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr, WIDE: tl.constexpr, DOT_PREC: tl.constexpr, HP: tl.constexpr,
):
    """Program (b, pair, split): sequence b's one new token, the HP * G query heads of KV heads
    [pair * HP, pair * HP + HP), keys of split.

    HP = 2 (head_dim 64, adjacent heads in the cache): a key's two heads are one 128-byte line, read
    whole by one program instead of half by each of two. Column c of the K and V^T tiles is head
    c // BLOCK_D's dimension c % BLOCK_D; q^T is block-diagonal (head g's row is zero outside its
    KV head's columns), so S^T = K q^T is each head's own scores, and of out^T = V^T P^T only the
    diagonal blocks are stored."""
    b = tl.program_id(0)
    kvh = tl.program_id(1) * HP
    split = tl.program_id(2)
    row = b.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    offs_g = tl.arange(0, GP)
    g_ok = offs_g < HP * G
    head = kvh * G + offs_g
    offs_d = tl.arange(0, HP * BLOCK_D)  # the tiles' columns (both heads' with HP = 2)
    dim = offs_d % BLOCK_D
    d_mask = dim < HEAD_DIM
    col_kv = offs_d // BLOCK_D  # each column's KV head in the program, and each query head's
    head_kv = offs_g // G
    q = tl.load(q_ptr + row * stride_qt + head[:, None] * stride_qh + dim[None, :],
                mask=g_ok[:, None] & d_mask[None, :] & (head_kv[:, None] == col_kv[None, :]), other=0.0)
    if q.dtype == tl.float32:
        qk = qk_scale
    else:  # fp16 dots on power-of-two scaled rows, as in triton_impl (the K scale is in qk_scale)
        q, qk = _fp16_rows(q, qk_scale)
        qk = tl.reshape(qk, [GP])[None, :]
    qt = tl.trans(q)  # [HP * BLOCK_D, GP]: the dots' N operand

    lo = 0
    hi = seq_len
    if USE_WINDOW:  # the new token (position seq_len - 1) sees keys > seq_len - 1 - window
        lo = tl.maximum(seq_len - window, 0)
    if SPLIT:
        lo = tl.maximum(lo, split * chunk_len)
        hi = tl.minimum(hi, (split + 1) * chunk_len)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(lo, (hi // BLOCK_N) * BLOCK_N)  # tiles below it hold written keys only
    acc = tl.full([HP * BLOCK_D, GP], 0.0, tl.float32)  # out^T
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.full([GP], 0.0, tl.float32)
    bt_row = bt_ptr + row * stride_bt
    for start in range(lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _decode_tile(
            acc, m_i, l_i, qt, qk, start, hi, seq_len, window, softcap, kv_ptr, bt_row, kvh, offs_d, d_mask,
            stride_cb, stride_ckv, stride_cs, stride_ch,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, V_RUN, USE_WINDOW, USE_SOFTCAP, False, WIDE, DOT_PREC)
    if full_hi < hi:
        acc, m_i, l_i = _decode_tile(
            acc, m_i, l_i, qt, qk, full_hi, hi, seq_len, window, softcap, kv_ptr, bt_row, kvh, offs_d, d_mask,
            stride_cb, stride_ckv, stride_cs, stride_ch,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, V_RUN, USE_WINDOW, USE_SOFTCAP, True, WIDE, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    res = acc * (v_scale / l_safe)[None, :]
    st_mask = d_mask[:, None] & g_ok[None, :] & (col_kv[:, None] == head_kv[None, :])  # out^T's diagonal blocks
    if SPLIT:  # the split's normalised partial result and its log2-sum-exp, for triton_impl's reduce kernel
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        p_off = row * stride_pt + head * stride_ph + split * stride_ps
        tl.store(part_out_ptr + p_off[None, :] + dim[:, None], res, mask=st_mask)
        tl.store(part_lse_ptr + (row * stride_pt + head * stride_ph) // BLOCK_D + split, lse, mask=g_ok)
    else:
        tl.store(out_ptr + row * stride_ot + head[None, :] * stride_oh + dim[:, None],
                 res.to(out_ptr.dtype.element_ty), mask=st_mask)


def heads_per_program(d: int, hkv: int, g: int, head_stride: int, batch: int, sms: int) -> int:
    """2 where a key's two adjacent heads fill one 128-byte line (head_dim 64, heads contiguous in the
    cache, an even number of them, their 2 G query heads within the dots' N of 16) and the batch still
    gives every SM two programs without split-K; else 1. On an H200 at batch 256 (BENCHMARKS.md, twelfth
    session) 2 reads 74-99 % of the copy rate against 68-81 % with 1; at batches of 16 and 64 it was slower."""
    pairs_fill = batch * (hkv // 2) >= 2 * sms
    return 2 if d == 64 and head_stride == d and hkv % 2 == 0 and 2 * g <= 16 and pairs_fill else 1


def launch_config(d: int) -> tuple[int, int, int]:
    """(BLOCK_N keys, num_warps, num_stages) for head_dim d (also with two heads of 64 per program), from
    sweeps on an H200 (BENCHMARKS.md)."""
    return (64, 1, 2) if d <= 64 else (64, 2, 3)


def fp8_decode(q, kv_cache, block_tables, seq_lens, qk_scale, v_scale, sliding_window, softcap, out, num_splits,
               max_seq_len):
    """out [B, Hq, D] <- attention of q [B, Hq, D] (one token per sequence) over the fp8 cache.
    qk_scale: softmax scale * K scale * log2(e); v_scale as the kernel multiplies it in (triton_impl)."""
    t, hq, d = q.shape
    _, _, block_size, hkv, _ = kv_cache.shape
    g = hq // hkv
    # (the interpreter counts as one SM, so that the CPU tests' small batches take two heads a program)
    hp = heads_per_program(d, hkv, g, kv_cache.stride(3), t, _impl.num_sms(q.device, off_cuda=1))
    block_n, warps, stages = launch_config(d)
    wide = _INTERPRETED or q.dtype == torch.float32
    num_splits, chunk_len, part_out, part_lse, p_strides = _impl.split_plan(q, num_splits, max_seq_len, block_n)
    _fp8_decode_kernel[(t, hkv // hp, num_splits)](
        q, kv_cache, out, block_tables, seq_lens, part_out, part_lse,
        qk_scale, v_scale, float(softcap or 0.0), int(sliding_window or 0), chunk_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        *p_strides,
        G=g, GP=triton.next_power_of_2(hp * g), HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_SIZE=block_size,
        BLOCK_N=block_n, V_RUN=_kv.v_run(block_size, block_n),
        USE_WINDOW=sliding_window is not None, USE_SOFTCAP=softcap is not None, SPLIT=num_splits > 1,
        WIDE=wide, DOT_PREC="ieee" if wide else "tf32", HP=hp,
        num_warps=warps, num_stages=stages,
    )
    if num_splits > 1:
        _impl.reduce_splits(part_out, part_lse, out, num_splits, p_strides)
    return out

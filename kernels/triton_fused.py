"""Triton kernels for the element-wise work around attention and the MLP: RMSNorm with the residual
add folded in, the gated activations (act(gate) * up), the rotary embedding and the per-row fp8
quantization of activations (quantization="fp8"; RMSNorm and the gated activations can quantize
their own output in the same pass, for a consumer that is an fp8 linear); and the greedy choice
over the logits (argmax and its log-probability in one pass). Each is one kernel where the
plain-torch twins in reference.py run a chain of small ops; in a decode step, at a few hundred
tokens, those chains were hundreds of tiny launches per forward pass.

Same numerics as the twins: wherever a twin rounds an intermediate to the model dtype (torch ops on
bf16 tensors round after each op), the kernel rounds it too; the rest is computed in fp32. Like
triton_impl.py this module is self-contained and calls only Triton builtins, because
kernels/__init__.py loads it a second time under TRITON_INTERPRET=1 for CPU tensors (the one helper it
takes from triton_kv, the interpreter's fp8 rounding, comes through `_triton_module` in the same mode).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _triton_module

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_fp8_bits = _triton_module(_INTERPRETED, "triton_kv")._fp8_bits


@triton.jit
def _own_sum(a, b):
    return a + b


@triton.jit
def _own_max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _own_min(a, b):
    return tl.minimum(a, b)


# Triton's own combine functions where present: the interpreter reduces them with numpy.
_sum_combine = getattr(tl.standard, "_sum_combine", _own_sum)
_max_combine = getattr(tl.standard, "_elementwise_max", _own_max)


@triton.jit
def _fp8_row(x, offs, mask, q_ptr, s_ptr, row, N, SOFT_FP8: tl.constexpr):
    """Store one row of x (fp32, whole, 0 where masked) as float8_e4m3fn x / scale at q_ptr's row and
    scale = max(amax(|x|) / 448, 1e-12) at s_ptr[row]: the per-token activation scale of fp8 linears."""
    scale = tl.maximum(tl.reduce(tl.abs(x), 0, _max_combine) / 448.0, 1e-12)
    y = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    if SOFT_FP8:
        q = _fp8_bits(y).to(q_ptr.dtype.element_ty, bitcast=True)
    else:
        q = y.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(q_ptr + row * N + offs, q, mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, stride_x, N, BLOCK: tl.constexpr, SOFT_FP8: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    _fp8_row(x, offs, mask, q_ptr, s_ptr, row, N, SOFT_FP8)


def _fp8_rows_out(m, n, device):
    return (torch.empty(m, n, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(m, 1, dtype=torch.float32, device=device))


def _row_warps(block):
    """Warps for one program holding a whole row of `block` values (a few dozen registers a thread)."""
    return max(4, min(32, block // 512))


def quantize_fp8_rows(x):
    m, n = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q, scale = _fp8_rows_out(m, n, x.device)
    if m:
        block = triton.next_power_of_2(n)
        _quantize_rows_kernel[(m,)](x, q, scale, x.stride(0), n, BLOCK=block, SOFT_FP8=_INTERPRETED,
                                    num_warps=8 if block >= 4096 else 4)
    return q, scale


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr,
    stride_x, stride_r, N, eps,
    HAS_RES: tl.constexpr, GEMMA: tl.constexpr, FP8_OUT: tl.constexpr, SOFT_FP8: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # torch's add, rounded
        tl.store(res_out_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.reduce(xf * xf, 0, _sum_combine) / N
    h = xf * tl.math.rsqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        out = h * (1.0 + w)
    else:
        out = h.to(x_ptr.dtype.element_ty).to(tl.float32) * w  # weight * x.to(dtype)
    if FP8_OUT:  # the output rounded to x's dtype (what the unfused path stores), then quantized per row
        _fp8_row(out.to(x_ptr.dtype.element_ty).to(tl.float32), offs, mask, out_ptr, scale_ptr, row, N, SOFT_FP8)
    else:
        tl.store(out_ptr + row * N + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x, weight, eps, residual=None, gemma=False, fp8_out=False):
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if fp8_out:
        out, scale = _fp8_rows_out(rows, n, x.device)
    else:
        out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
        out = scale = torch.empty((rows, n), dtype=out_dtype, device=x.device)  # (scale_ptr unused: out stands in)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    else:
        r2 = res_out = x2
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, res_out, scale, x2.stride(0), r2.stride(0), n, eps,
            HAS_RES=residual is not None, GEMMA=gemma, FP8_OUT=fp8_out, SOFT_FP8=fp8_out and _INTERPRETED,
            BLOCK=block, num_warps=_row_warps(block) if fp8_out else 4,
        )
    out = (out, scale) if fp8_out else out.view(shape)
    return out if residual is None else (out, res_out.view(shape))


ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@triton.jit
def _gated(x_ptr, row, stride_x, I, cols, mask, ACT: tl.constexpr):
    """act(gate) * up at `cols` of one row, in fp32, rounded as torch's ops on x's dtype round it."""
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 / (1.0 + tl.exp(-2.0 * inner)))  # 1 + tanh(y) = 2 / (1 + e^-2y)
    else:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    a = a.to(x_ptr.dtype.element_ty).to(tl.float32)  # torch rounds the activation before the product
    return (a * u).to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _gated_kernel(x_ptr, out_ptr, stride_x, I, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    tl.store(out_ptr + row * I + cols, _gated(x_ptr, row, stride_x, I, cols, mask, ACT).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _gated_fp8_kernel(x_ptr, q_ptr, s_ptr, stride_x, I, ACT: tl.constexpr, BLOCK: tl.constexpr,
                      SOFT_FP8: tl.constexpr):
    # One program per row, the whole row at once: its amax is the fp8 scale.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < I
    _fp8_row(_gated(x_ptr, row, stride_x, I, cols, mask, ACT), cols, mask, q_ptr, s_ptr, row, I, SOFT_FP8)


def gated_activation(x, activation, fp8_out=False):
    i = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * i)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if fp8_out:
        q, scale = _fp8_rows_out(rows, i, x.device)
        if rows:
            block = triton.next_power_of_2(i)
            _gated_fp8_kernel[(rows,)](x2, q, scale, x2.stride(0), i, ACT=ACTIVATIONS[activation], BLOCK=block,
                                       SOFT_FP8=_INTERPRETED, num_warps=_row_warps(block))
        return q, scale
    out = torch.empty((rows, i), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(i))
    if rows:
        _gated_kernel[(rows, triton.cdiv(i, block))](
            x2, out, x2.stride(0), i, ACT=ACTIVATIONS[activation], BLOCK=block
        )
    return out.view(*x.shape[:-1], i)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_ct, H,
    HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # One program per token and BLOCK_H heads (all of them, at the models' sizes): the token's cos/sin
    # are loaded once, and a prefill step's programs each move kilobytes instead of one head's 128 bytes.
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK)
    d_ok = offs < HALF
    mask = (heads < H)[:, None] & d_ok[None, :]
    dt = out_ptr.dtype.element_ty
    c = tl.load(cos_ptr + t * stride_ct + offs, mask=d_ok, other=0.0).to(dt).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * stride_ct + offs, mask=d_ok, other=0.0).to(dt).to(tl.float32)[None, :]
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    dst = out_ptr + (t * H + heads[:, None]) * (2 * HALF) + offs[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


def rotary(x, cos, sin):
    t, h, d = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    if t:
        block = triton.next_power_of_2(d // 2)
        block_h = min(triton.next_power_of_2(h), max(1, 4096 // block))
        _rotary_kernel[(t, triton.cdiv(h, block_h))](
            x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), h,
            HALF=d // 2, BLOCK=block, BLOCK_H=block_h, num_warps=4,
        )
    return out


# ---- greedy choice: argmax and its log-probability in one pass over each logits row ------------
@triton.jit
def _greedy_kernel(x_ptr, ids_ptr, lp_ptr, stride_x, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    base = x_ptr + row * stride_x
    m = tl.full((), -3.0e38, tl.float32)  # running max (finite: exp(m - new_m) stays defined)
    s = tl.full((), 0.0, tl.float32)  # sum of exp(x - m) so far
    best = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        bm = tl.reduce(x, 0, _max_combine)
        bi = tl.reduce(tl.where(x == bm, offs, BLOCK), 0, _own_min)  # the first index of the block's max
        new_m = tl.maximum(m, bm)
        s = s * tl.exp(m - new_m) + tl.reduce(tl.exp(x - new_m), 0, _sum_combine)
        best = tl.where(bm > m, start + bi, best)  # strictly: an earlier block keeps a tie
        m = new_m
    tl.store(ids_ptr + row, best.to(tl.int64))
    tl.store(lp_ptr + row, -tl.log(s))  # x[best] - logsumexp(x) = m - (m + log s)


def greedy_sample(logits):
    n, v = logits.shape
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    ids = torch.empty(n, dtype=torch.int64, device=x.device)
    lp = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        _greedy_kernel[(n,)](x, ids, lp, x.stride(0), v, BLOCK=4096, num_warps=8)
    return ids, lp

"""Plain-torch twins of the Triton kernels: the CPU engine path and the test oracle for Triton.

Semantics (shared with triton_impl.py, see DESIGN.md "The KV cache and the kernel interface"):
kv_cache is [num_blocks, 2, block_size, Hkv, D]; query token i of sequence b sits at position
seq_lens[b] - q_len_b + i and attends to keys at positions <= its own (and > pos - sliding_window).

Every CPU user runs this code, so it is written for speed as well as clarity. The sequences of a
step that add one token each (decode) are attended as one padded batch: one gather of all their
blocks and one masked `scaled_dot_product_attention` call per layer, whose mask and block rows the
step's plan builds once for every layer. On the 2-core dev box that is 1.6-2.3x faster than one
call per sequence at 1 to 64 sequences of ~300 tokens (fp32, 9/3 heads of 64: 172 -> 105 us at one
sequence, 2.5 -> 1.4 ms at 16). The query heads that share a KV head go in as rows of that head, so
each KV head is read once (SDPA 101 -> 47 us at 4 sequences); a lone sequence's keys are sliced to
its context instead of masked. On the CPU, while the same sequences keep decoding, each layer keeps
that padded batch from step to step and only appends the new tokens (kernels/decode_mirror.py), and
fp32 decode attention without a window or soft-cap runs in the CPU kernel cpu_attention.cpp (cpu_ext.py)
instead of SDPA: the same arithmetic in another order.
Prompt chunks (several query tokens) get one gather and one causal SDPA call each, unmasked wherever every
gathered key is visible; fp32 chunks without a window or soft-cap on the CPU go to cpu_prefill.cpp instead
(the triangle below the diagonal only: 30 % faster than SDPA for a 256-token prompt on the dev box).
Without soft-capping the math is what transformers' sdpa attention does in fp32, so greedy ids match it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_ext, decode_mirror

# An FP8 KV cache stores float8_e4m3fn values x / scale (one K and one V scale per layer), saturated
# at the format's largest finite value; attention reads them back as value * scale.
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

# Gathered K/V go into reused per-thread CPU buffers up to this size: a fresh large allocation costs more
# in first-touch page faults than the copy itself (measured ~4x on the 2-core dev box).
_WORKSPACE_MAX_BYTES = 512 << 20
_workspace = threading.local()


def _buffer(slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat scratch tensor of numel elements for `slot` (0: K, 1: V), reused across calls on CPU."""
    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or nbytes > _WORKSPACE_MAX_BYTES:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    bufs = _workspace.__dict__.setdefault("bufs", {})
    # Buffers made under torch.inference_mode() cannot be written outside it (and vice versa): one set each.
    key = (slot, like.dtype, torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel]


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as float8_e4m3fn, saturated to +-448 (a plain cast would turn overflow into NaN)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x / scale as float8_e4m3fn, scale [M, 1] fp32), scale = max(amax of the row / 448, 1e-12)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE), scale


def fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype):
    """(x_q @ w_q^T) * x_scale * w_scale with the fp8 values widened to fp32: the products the GPU's fp8
    GEMMs compute (exact in fp32), accumulated in fp32."""
    return ((x_q.float() @ w_q.float().t()) * x_scale * w_scale).to(out_dtype)


@dataclass(frozen=True)
class DecodeBatch:
    """The sequences of a step that add one token each, attended as one padded batch of B rows."""

    tokens: torch.Tensor | None  # [B] their rows in q; None when they are all of q's rows, in order
    k_rows: torch.Tensor  # [B * W] K rows (`_block_rows`) of their first W blocks, W = the widest one
    v_rows: torch.Tensor
    ctx: torch.Tensor  # [B, 1, 1, 1] context lengths (int64)
    bias: torch.Tensor  # [B, 1, 1, W * block_size] fp32: 0 for keys inside the context, -inf past it
    # [P] the padded key positions (past a context) of the flat [B * W * block_size] gathered keys; None
    # if none. They are zeroed after each gather: a masked key must still be finite (-inf + NaN is NaN),
    # and what a block holds past its sequence's context is whatever was there (empty memory, an old
    # sequence's values).
    pad: torch.Tensor | None
    lone: int | None = None  # the context length when there is one sequence (keys sliced to it, not masked)
    mirror: decode_mirror.MirrorPlan | None = None  # how the layers' decode mirrors extend or refill

    def mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (the bias, or with a window also -inf at keys older than it), in dtype."""
        bias = self.bias
        if sliding_window is not None:  # the new token sits at ctx - 1 and sees keys > ctx - 1 - window
            kpos = torch.arange(bias.shape[-1], device=bias.device).view(1, 1, 1, -1)
            bias = bias.masked_fill(kpos <= self.ctx - 1 - sliding_window, float("-inf"))
        return bias.to(dtype)


@dataclass(frozen=True)
class StepPlan:
    """The index arithmetic of one step, shared by every layer: what store_kv and paged_attention
    would otherwise redo in each of the model's layers (slot -> cache row, the block rows of each
    sequence, the lengths read back from tensors). Built once per step by `plan_step`."""

    block_size: int
    # [T'] K and V row of each stored token in the [num_blocks * 2 * block_size, Hkv * D] view
    store_rows: tuple[torch.Tensor, torch.Tensor]
    keep: torch.Tensor | None  # [T'] indices of the tokens with a slot; None: every token
    # per sequence with several query tokens: (query start, query end, context length, K rows, V rows
    # of its blocks (`_block_rows`))
    seqs: tuple[tuple[int, int, int, torch.Tensor, torch.Tensor], ...]
    decode: DecodeBatch | None  # the sequences with one query token; None when there are none


def plan_step(slot_mapping, block_tables, seq_lens, query_start_loc, block_size: int) -> StepPlan:
    store_rows, keep = _store_rows(slot_mapping, block_size)
    seqs, decode = _seq_rows(block_tables, seq_lens, query_start_loc, block_size)
    return StepPlan(block_size, store_rows, keep, seqs, decode)


def _store_rows(slot_mapping, block_size: int):
    """((K rows, V rows) of the tokens with a slot in a cache's [num_blocks * 2 * block_size, Hkv * D]
    row view, indices of those tokens or None when every token has one)."""
    slots = slot_mapping.to(torch.long)
    keep = None
    if not bool((slots >= 0).all()):
        keep = torch.nonzero(slots >= 0).flatten()
        slots = slots[keep]
    k_rows = (slots // block_size) * (2 * block_size) + slots % block_size
    return (k_rows, k_rows + block_size), keep


def _seq_rows(block_tables, seq_lens, query_start_loc, block_size: int):
    """(per sequence with several query tokens: (query start, query end, context length, K rows, V rows
    of its blocks), the `DecodeBatch` of those with one query token or None)."""
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    seqs, dec = [], []
    for b, ctx in enumerate(lens):
        start, end = qsl[b], qsl[b + 1]
        if end - start == 1:
            dec.append(b)
        elif end > start:
            k_rows, v_rows = _block_rows(block_tables[b, : -(-ctx // block_size)])
            seqs.append((start, end, ctx, k_rows, v_rows))
    return tuple(seqs), _decode_batch(dec, qsl, lens, block_tables, block_size)


def _decode_batch(dec: list[int], qsl: list[int], lens: list[int], block_tables, block_size: int):
    if not dec:
        return None
    dev = block_tables.device
    ctx = torch.tensor([lens[b] for b in dec], dtype=torch.long, device=dev).view(-1, 1)
    width = -(-max(lens[b] for b in dec) // block_size)
    tokens = [qsl[b] for b in dec]
    table = block_tables[:, :width] if len(dec) == block_tables.shape[0] else block_tables[dec, :width]
    # table entries past a sequence's own blocks (padding: 0, -1, anything) read block 0, masked out
    valid = torch.arange(width, device=dev) < (ctx + block_size - 1) // block_size
    table = table.long().masked_fill(~valid, 0)
    k_rows, v_rows = _block_rows(table.reshape(-1))
    past = torch.arange(width * block_size, device=dev) >= ctx  # [B, W * block_size]
    bias = torch.zeros(past.shape, device=dev).masked_fill_(past, float("-inf")).view(len(dec), 1, 1, -1)
    pad = torch.nonzero(past.view(-1)).flatten()
    every_row = tokens == list(range(qsl[-1]))
    mirror = None
    if dev.type == "cpu":  # the new tokens' cache rows, for the layers' decode mirrors to append
        new_slots = table.gather(1, (ctx - 1) // block_size) * block_size + (ctx - 1) % block_size
        (new_k, new_v), _ = _store_rows(new_slots.view(-1), block_size)
        mirror = decode_mirror.plan(table, valid, ctx, torch.cat((new_k, new_v)), block_size)
    return DecodeBatch(
        None if every_row else torch.tensor(tokens, device=dev), k_rows, v_rows, ctx.view(-1, 1, 1, 1), bias,
        pad if pad.numel() else None, lens[dec[0]] if len(dec) == 1 else None, mirror,
    )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    plan: StepPlan | None = None,
) -> None:
    """Write key/value [T, Hkv, D] into kv_cache at slot_mapping [T] (slot = block * block_size + offset); -1 skips.
    An fp8 cache stores key / k_scale and value / v_scale. plan: this step's `plan_step` (optional)."""
    block_size = kv_cache.shape[2]
    if plan is not None and plan.block_size == block_size:
        (k_rows, v_rows), keep = plan.store_rows, plan.keep
    else:
        (k_rows, v_rows), keep = _store_rows(slot_mapping, block_size)
    if keep is not None:
        if keep.numel() == 0:  # no token has a slot
            return
        key, value = key[keep], value[keep]
    fp8 = kv_cache.dtype == FP8_KV_DTYPE
    if fp8:  # torch has no CPU index_copy_ for float8: the bytes are copied as uint8
        key, value = quantize_fp8(key, k_scale).view(torch.uint8), quantize_fp8(value, v_scale).view(torch.uint8)
        kv_cache = kv_cache.view(torch.uint8)
    # row copies into [num_blocks * 2 * block_size, Hkv * D]: no advanced-index put (an fp8 cache is contiguous)
    if kv_cache.is_contiguous() or fp8:
        rows = kv_cache.view(-1, key.shape[1] * key.shape[2])
        rows.index_copy_(0, k_rows, key.reshape(key.shape[0], -1).to(kv_cache.dtype))
        if fp8:  # V goes transposed into its block ([Hkv, D, block_size], kernels/__init__): one strided put
            _fp8_v_blocks(kv_cache)[k_rows // (2 * block_size), :, :, k_rows % (2 * block_size)] = value
        else:
            rows.index_copy_(0, v_rows, value.reshape(value.shape[0], -1).to(kv_cache.dtype))
        return
    blocks, offsets = k_rows // (2 * block_size), k_rows % (2 * block_size)
    kv_cache[blocks, 0, offsets] = key.to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = value.to(kv_cache.dtype)


def _fp8_v_blocks(kv_cache):
    """The V halves of an fp8 cache's blocks as they are stored: [num_blocks, Hkv, D, block_size]."""
    nblk, _, bs, hkv, d = kv_cache.shape
    return kv_cache.view(nblk, 2, hkv, d, bs)[:, 1]


def copy_blocks(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole block src[i] to dst[i] in every layer's cache (copy-on-write of shared blocks)."""
    if src.numel() == 0:
        return
    src = src.to(device=kv_caches[0].device, dtype=torch.long)
    dst = dst.to(device=kv_caches[0].device, dtype=torch.long)
    for cache in kv_caches:
        if cache.dtype == FP8_KV_DTYPE:
            cache = cache.view(torch.uint8)  # no CPU index_copy_ for float8
        # index_select copies first, so a block that is both a source and a destination is read intact.
        cache.index_copy_(0, dst, cache.index_select(0, src))


def _sdpa(q, k, v, mask, scale, is_causal=False):
    """q [N, Hq, M, D], k/v [N, Hkv, S, D] -> [N, Hq, M, D] through torch's SDPA (GQA without a copy when possible)."""
    if q.shape[1] != k.shape[1]:
        try:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
            )
        except TypeError:  # torch < 2.5 has no enable_gqa
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def _softcap_attention(q, k, v, mask, scale, softcap):
    """Gemma-2 style eager attention: scores * scale, softcap * tanh(scores / softcap), mask (bool:
    visible keys, or additive), fp32 softmax."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)


def _attend(q, k, v, mask, scale, softcap, is_causal=False):
    if softcap is not None:
        if mask is None:  # causal with no prefix: build it, the eager path needs an explicit mask
            m, s = q.shape[-2], k.shape[-2]
            mask = torch.ones(m, s, dtype=torch.bool, device=q.device).tril(s - m)
        return _softcap_attention(q, k, v, mask, scale, softcap)
    return _sdpa(q, k, v, mask, scale, is_causal=is_causal)


def _block_rows(block_ids):
    """(K rows, V rows) of the given blocks in a cache's [num_blocks * 2, block_size * Hkv * D] row view."""
    k_rows = block_ids.long() * 2
    return k_rows, k_rows + 1


def _gather(kv_cache, rows, slot):
    """Rows (from `_block_rows`) of the cache, contiguous: [len(rows) * block_size, Hkv, D]."""
    nblk, _, bs, hkv, d = kv_cache.shape
    row = bs * hkv * d
    out = _buffer(slot, rows.numel() * row, kv_cache).view(-1, row)
    if kv_cache.is_contiguous():  # whole-row copies
        torch.index_select(kv_cache.view(nblk * 2, row), 0, rows, out=out)
    else:
        torch.index_select(kv_cache[:, slot], 0, rows // 2, out=out.view(-1, bs, hkv, d))
    if slot == 1 and kv_cache.dtype == FP8_KV_DTYPE:  # stored transposed: back to [block_size, Hkv, D] rows
        return out.view(torch.uint8).view(-1, hkv, d, bs).permute(0, 3, 1, 2).reshape(-1, hkv, d).view(kv_cache.dtype)
    return out.view(-1, hkv, d)


def _widen(x, dtype):
    """Gathered K or V in the query's dtype: an fp8 cache's values are exact in every wider float.
    Their scales are applied outside (K's to the softmax scale, V's to the output), as the kernel does."""
    return x.to(dtype) if x.dtype == FP8_KV_DTYPE else x


def _attend_decode(q, kv_cache, dec: DecodeBatch, scale, sliding_window, softcap):
    """q [B, Hq, D]: the one new token of each sequence of `dec` -> [B, Hq, D], one padded batch.

    The G query heads that share a KV head attend as G query rows of that head ([B, Hkv, G, D]): one
    token each, nothing causal between them, so each head's K and V are read once instead of G times
    (SDPA 2x faster at 4-64 sequences on the dev box). A lone sequence's keys are sliced to its context
    instead of masked."""
    b, hq, d = q.shape
    hkv = kv_cache.shape[3]
    k, v = _decode_kv(kv_cache, dec)
    if sliding_window is None and softcap is None and q.device.type == "cpu":  # fp32: the C++ kernel's
        out = cpu_ext.decode_attention(q.reshape(b, hkv, hq // hkv, d), k, v, dec.ctx, scale)
        if out is not None:
            return out.reshape(b, hq, d)
    mask = None
    if dec.lone is not None and sliding_window is None and softcap is None:
        k, v = k[:, : dec.lone], v[:, : dec.lone]
    else:
        mask = dec.mask(sliding_window, q.dtype)  # [B, 1, 1, S]: the same for every head and query row
    k, v = _widen(k, q.dtype).transpose(1, 2), _widen(v, q.dtype).transpose(1, 2)
    qg = q.view(b, hkv, hq // hkv, d)
    return _attend(qg, k, v, mask, scale, softcap).reshape(b, hq, d)


def _decode_kv(kv_cache, dec: DecodeBatch):
    """K and V of the decode batch, [B, W * block_size, Hkv, D] each, finite past every context: this
    layer's decode mirror when it extends the previous step's (kernels/decode_mirror.py), else gathered
    from the blocks (and the mirror refilled from them)."""
    b = dec.ctx.shape[0]
    _, _, _, hkv, d = kv_cache.shape
    mirror = None
    if dec.mirror is not None and kv_cache.device.type == "cpu" and kv_cache.is_contiguous() \
            and kv_cache.dtype != FP8_KV_DTYPE:
        mirror = decode_mirror.lookup(kv_cache, dec.mirror)
        if mirror is not None and mirror.current:
            return mirror.k, mirror.v
    k, v = _gather(kv_cache, dec.k_rows, 0), _gather(kv_cache, dec.v_rows, 1)
    if dec.pad is not None:
        for x in (k, v):  # (as bytes for an fp8 cache: no CPU index_fill_ for float8; zero bytes are 0.0)
            (x.view(torch.uint8) if x.dtype == FP8_KV_DTYPE else x).view(x.shape[0], -1).index_fill_(0, dec.pad, 0)
    k, v = k.view(b, -1, hkv, d), v.view(b, -1, hkv, d)
    if mirror is not None:
        mirror.fill(k, v)
    return k, v


def _gather_kv(kv_cache, k_rows, v_rows, ctx, dtype):
    """K and V of one sequence as [1, Hkv, ctx, D] views (one gather each; SDPA takes the strides as they are)."""
    k = _widen(_gather(kv_cache, k_rows, 0)[:ctx], dtype)
    v = _widen(_gather(kv_cache, v_rows, 1)[:ctx], dtype)
    return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)


def _attend_one(q, kv_cache, k_rows, v_rows, ctx, scale, sliding_window, softcap):
    """q [M, Hq, D] of one sequence whose keys are positions [0, ctx) in the blocks of k_rows / v_rows
    -> [M, Hq, D]: a prompt (chunk), with no padding and, for a whole prompt without a window, no mask."""
    m = q.shape[0]
    bs = kv_cache.shape[2]
    first = 0  # first block any query can see: with a window, older blocks are never gathered
    if sliding_window is not None:
        first = max(0, ctx - m - sliding_window + 1) // bs
        k_rows, v_rows = k_rows[first:], v_rows[first:]
    k, v = _gather_kv(kv_cache, k_rows, v_rows, ctx - first * bs, q.dtype)
    if sliding_window is None and softcap is None and q.device.type == "cpu":  # fp32: the C++ kernel's
        out = cpu_ext.prefill_attention(q, k[0].transpose(0, 1), v[0].transpose(0, 1), scale)
        if out is not None:
            return out
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, M, D]
    if sliding_window is None and m == ctx:  # causal from 0: no mask
        out = _attend(qh, k, v, None, scale, softcap, is_causal=m > 1)
    else:
        qpos = torch.arange(ctx - m, ctx, device=q.device).unsqueeze(1)
        kpos = torch.arange(first * bs, ctx, device=q.device).unsqueeze(0)
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        out = _attend(qh, k, v, mask, scale, softcap)
    return out[0].transpose(0, 1)


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
    plan: StepPlan | None = None,
) -> torch.Tensor:
    """Varlen causal attention of q [T, Hq, D] over the paged cache; see the module docstring.
    max_query_len / max_seq_len are accepted for the Triton entry point's signature and unused:
    this twin reads the lengths from the tensors (or from `plan`, this step's `plan_step`, built
    once for all layers). k_scale / v_scale: the fp8 cache's dequantization scales (ignored for
    other cache dtypes)."""
    if out is None:
        out = torch.empty_like(q)
    if kv_cache.dtype == FP8_KV_DTYPE:
        scale = scale * k_scale  # q . (k * k_scale) == (q . k) * k_scale
    else:
        v_scale = 1.0
    bs = kv_cache.shape[2]
    if plan is not None and plan.block_size == bs:
        seqs, dec = plan.seqs, plan.decode
    else:
        seqs, dec = _seq_rows(block_tables, seq_lens, query_start_loc, bs)
    if dec is not None:
        qd = q if dec.tokens is None else q.index_select(0, dec.tokens)
        res = _scaled(_attend_decode(qd, kv_cache, dec, scale, sliding_window, softcap), v_scale).to(out.dtype)
        if dec.tokens is None:
            out.copy_(res)
        else:
            out.index_copy_(0, dec.tokens, res)
    for start, end, ctx, k_rows, v_rows in seqs:
        res = _attend_one(q[start:end], kv_cache, k_rows, v_rows, ctx, scale, sliding_window, softcap)
        out[start:end] = _scaled(res, v_scale).to(out.dtype)
    return out


def _scaled(x, s):
    return x if s == 1.0 else x.float() * s


def dense_attention_oracle(q, k, v, q_pos, k_pos, scale, sliding_window=None, softcap=None):
    """Naive masked softmax in float64 for one sequence: q [M, Hq, D], k/v [S, Hkv, D] -> [M, Hq, D]."""
    rep = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = torch.einsum("mhd,shd->hms", qd, kd) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    mask = k_pos.view(1, -1) <= q_pos.view(-1, 1)
    if sliding_window is not None:
        mask &= k_pos.view(1, -1) > q_pos.view(-1, 1) - sliding_window
    s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hms,shd->mhd", p, vd)


# ---- element-wise ops: the models' own torch code, identical to transformers' -------------------
def rms_norm(x, weight, eps, residual=None, gemma=False, fp8_out=False):
    if fp8_out:  # the unfused arithmetic: the norm in x's dtype, then per-row fp8
        return fp8_rows_of(rms_norm(x, weight, eps, residual, gemma))
    if residual is not None:
        x = x + residual
        residual = x
    # torch's fused F.rms_norm is bitwise equal to transformers' eager arithmetic wherever that runs
    # wholly in fp32 (checked on every shape the models use) and is one op instead of five.
    if gemma:  # the whole computation, the (1 + weight) scale included, in fp32
        out = F.rms_norm(x.float(), (x.shape[-1],), 1.0 + weight.float(), eps).type_as(x)
    elif x.dtype == weight.dtype == torch.float32:
        out = F.rms_norm(x, (x.shape[-1],), weight, eps)
    else:  # normalise in fp32, cast back to x's dtype *before* the weight multiply (HF's LlamaRMSNorm)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
    "gelu": F.gelu,
}


def gated_activation(x, activation, fp8_out=False):
    gate, up = x.chunk(2, dim=-1)
    out = ACTIVATIONS[activation](gate) * up
    return fp8_rows_of(out) if fp8_out else out


def fp8_rows_of(out):
    """The fp8_out form of an rms_norm / gated_activation result (`out`, or `(out, residual)`): `out`'s rows
    quantized by quantize_fp8_rows, the residual as it is."""
    if isinstance(out, tuple):
        return fp8_rows_of(out[0]), out[1]
    return quantize_fp8_rows(out.reshape(-1, out.shape[-1]))


def rotary(x, cos, sin):
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---- all-reduce: what kernels/peer_all_reduce.py returns on every rank ----------------------------
def all_reduce_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of every rank's tensor (list index = rank), accumulated in fp32 from zero in rank order
    and rounded once to their dtype: the peer-memory kernel's result, bit for bit, on every rank."""
    acc = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for part in parts:
        acc += part.float()
    return acc.to(parts[0].dtype)


def greedy_sample(logits):
    ids = logits.argmax(dim=1)
    return ids, logits.gather(1, ids.unsqueeze(1)).squeeze(1).float() - logits.float().logsumexp(dim=1)

"""Kernel tests: the torch reference against a dense float64 oracle, and every Triton kernel against the
reference through Triton's interpreter (CPU tensors, impl="triton"), plus GPU checks marked `gpu`.

The interpreter is selected per call by `paged_backend.kernels` itself (it loads an interpreted copy
of the kernel module for CPU tensors), so these tests need no environment variable and work in any
test order, whatever imported triton first.
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from paged_backend import kernels
from paged_backend.kernels import reference

TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "output has NaN: some element was not written (or read garbage)"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_batch(
    q_lens,
    ctx_lens,
    hq,
    hkv,
    d,
    block_size=16,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    spare_blocks=3,
):
    """A random varlen batch over a NaN-poisoned paged cache with shuffled block ids.

    Returns dict with q, kv_cache, block_tables, seq_lens, query_start_loc and the dense per-sequence
    k/v ([ctx, Hkv, D]) for the oracle. Unused slots and padding block-table entries stay poisoned.
    """
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    nbs = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(nbs) + spare_blocks
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    max_blocks = max(nbs) + 1
    block_tables = torch.full((len(ctx_lens), max_blocks), -1, dtype=torch.int32)
    kv_cache = torch.full((num_blocks, 2, block_size, hkv, d), float("nan"), dtype=dtype)
    dense_k, dense_v, pos = [], [], 0
    for b, (c, nb) in enumerate(zip(ctx_lens, nbs)):
        block_tables[b, :nb] = torch.tensor(ids[pos : pos + nb], dtype=torch.int32)
        pos += nb
        k = torch.randn(c, hkv, d, generator=g).to(dtype)
        v = torch.randn(c, hkv, d, generator=g).to(dtype)
        p = torch.arange(c)
        slots = block_tables[b, p // block_size].long() * block_size + p % block_size
        reference.store_kv(k, v, kv_cache, slots)
        dense_k.append(k)
        dense_v.append(v)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    qsl = torch.tensor([0] + list(q_lens), dtype=torch.int32).cumsum(0).to(torch.int32)
    to = dict(device=device)
    return dict(
        q=q.to(**to),
        kv_cache=kv_cache.to(**to),
        block_tables=block_tables.to(**to),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        query_start_loc=qsl.to(**to),
        dense_k=dense_k,
        dense_v=dense_v,
        q_lens=list(q_lens),
        ctx_lens=list(ctx_lens),
    )


def oracle(batch, scale, sliding_window=None, softcap=None):
    outs, start = [], 0
    q = batch["q"].cpu()
    for ql, c, k, v in zip(batch["q_lens"], batch["ctx_lens"], batch["dense_k"], batch["dense_v"]):
        qp = torch.arange(c - ql, c)
        outs.append(reference.dense_attention_oracle(q[start : start + ql], k, v, qp, torch.arange(c), scale,
                                                     sliding_window, softcap))
        start += ql
    return torch.cat(outs)


def run_attention(batch, scale, impl, sliding_window=None, softcap=None, pass_max=True, **kw):
    out = torch.full_like(batch["q"], float("nan"))  # poisoned: every element must be written
    if pass_max:
        kw.update(max_query_len=max(batch["q_lens"]), max_seq_len=max(batch["ctx_lens"]))
    res = kernels.paged_attention(
        batch["q"], batch["kv_cache"], batch["block_tables"], batch["seq_lens"], batch["query_start_loc"],
        scale, sliding_window=sliding_window, softcap=softcap, out=out, impl=impl, **kw,
    )
    assert res.data_ptr() == out.data_ptr()
    return res


# A decode-and-prefill mix: decode (q_len 1), prefill on top of a cached prefix, a fresh prefill,
# chunked prefill, lengths that are not multiples of the block size.
MIXED = ([1, 7, 1, 20, 1, 3], [37, 29, 1, 20, 64, 50])


# ---------------------------------------------------------------- reference vs dense oracle


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("window,softcap", [(None, None), (9, None), (None, 5.0), (13, 20.0)])
def test_reference_matches_dense_oracle(hq, hkv, window, softcap):
    d = 32
    batch = make_batch(*MIXED, hq, hkv, d, seed=hq * 7 + hkv + (window or 0))
    scale = d**-0.5
    out = run_attention(batch, scale, "reference", window, softcap)
    assert rel_err(out, oracle(batch, scale, window, softcap)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision(dtype):
    batch = make_batch(*MIXED, 8, 2, 64, dtype=dtype, seed=3)
    out = run_attention(batch, 0.125, "reference")
    assert out.dtype == dtype
    assert rel_err(out, oracle(batch, 0.125)) < TOL[dtype]


def test_reference_many_decodes():
    """Decode tokens over contexts of many lengths (block-size multiples, partial blocks, one token) in one batch."""
    lens = [5, 300, 17, 64, 1, 129, 33, 250, 16]
    batch = make_batch([1] * len(lens), lens, 8, 2, 64, seed=5)
    assert rel_err(run_attention(batch, 0.125, "reference"), oracle(batch, 0.125)) < 1e-5


def test_reference_lone_decode_is_unmasked_sdpa():
    """A decode token sees its whole context: bitwise the unmasked sdpa call transformers makes for it."""
    batch = make_batch([1], [45], 8, 2, 64, seed=12)
    out = run_attention(batch, 0.125, "reference")
    torch.testing.assert_close(out, _one_sequence_sdpa(batch, is_causal=False), rtol=1e-6, atol=1e-6)


def test_reference_matches_sdpa_exactly_for_plain_prefill():
    """No prefix, no window, no softcap: bitwise what transformers' sdpa path computes in fp32."""
    batch = make_batch([19], [19], 8, 2, 64, seed=11)
    out = run_attention(batch, 0.125, "reference")
    torch.testing.assert_close(out, _one_sequence_sdpa(batch, is_causal=True), rtol=1e-6, atol=1e-6)


def _one_sequence_sdpa(batch, is_causal: bool) -> torch.Tensor:
    """The sdpa call transformers makes for a batch's one sequence (8 q / 2 kv heads, scale 0.125), [T, H, D]."""
    q = batch["q"].transpose(0, 1).unsqueeze(0)
    k = batch["dense_k"][0].repeat_interleave(4, 1).transpose(0, 1).unsqueeze(0)
    v = batch["dense_v"][0].repeat_interleave(4, 1).transpose(0, 1).unsqueeze(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.125)
    return sdpa[0].transpose(0, 1)


# ---------------------------------------------------------------- store_kv / copy_blocks


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(impl, dtype):
    g = torch.Generator().manual_seed(1)
    nb, bs, hkv, d, t = 6, 16, 2, 64, 11
    cache = torch.randn(nb, 2, bs, hkv, d, generator=g).to(dtype)
    before = cache.clone()
    # key/value as strided views of a fused qkv-like tensor, as the attention layer passes them
    fused = torch.randn(t, 3 * hkv * d, generator=g).to(dtype)
    key = fused[:, : hkv * d].view(t, hkv, d)
    value = fused[:, hkv * d : 2 * hkv * d].view(t, hkv, d)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[3] = -1
    slots[7] = -1
    kernels.store_kv(key, value, cache, slots, impl=impl)
    expect = before.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expect[s // bs, 0, s % bs] = key[i]
            expect[s // bs, 1, s % bs] = value[i]
    assert torch.equal(cache, expect)


def test_copy_blocks():
    caches = [torch.randn(8, 2, 4, 2, 8) for _ in range(3)]
    before = [c.clone() for c in caches]
    src, dst = torch.tensor([1, 5, 2]), torch.tensor([5, 0, 7])  # block 5 is both read and written
    kernels.copy_blocks(caches, src, dst)
    for c, b in zip(caches, before):
        expect = b.clone()
        expect[[5, 0, 7]] = b[[1, 5, 2]]
        assert torch.equal(c, expect)


def test_bad_shapes_raise_clear_errors():
    batch = make_batch([1], [5], 4, 2, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kernels.paged_attention(batch["q"][:, :3], batch["kv_cache"], batch["block_tables"], batch["seq_lens"],
                                batch["query_start_loc"], 1.0)
    with pytest.raises(ValueError, match="impl"):
        kernels.paged_attention(batch["q"], batch["kv_cache"], batch["block_tables"], batch["seq_lens"],
                                batch["query_start_loc"], 1.0, impl="cuda")


# ---------------------------------------------------------------- Triton (interpreter on CPU) vs reference


def _triton_vs_reference(batch, scale, window=None, softcap=None, **kw):
    got = run_attention(batch, scale, "triton", window, softcap, **kw)
    ref = run_attention(batch, scale, "reference", window, softcap)
    err = rel_err(got, ref)
    assert err <= TOL[batch["q"].dtype], f"relative error {err:.2e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2)])
def test_triton_mixed_batch(dtype, hq, hkv):
    """Decode + prefill-with-prefix + fresh prefill + chunked prefill in one batch, GQA 1/4/8."""
    seed = zlib.crc32(f"{dtype}{hq}{hkv}".encode())
    batch = make_batch(*MIXED, hq, hkv, 64, dtype=dtype, seed=seed)
    _triton_vs_reference(batch, 64**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,softcap", [(23, None), (None, 30.0), (40, 10.0)])
def test_triton_window_softcap(dtype, window, softcap):
    # contexts over several 64-key tiles so the unmasked-tile loop and the window's lower edge both run
    batch = make_batch([1, 30, 1, 5], [150, 130, 70, 200], 8, 2, 64, dtype=dtype, seed=17)
    _triton_vs_reference(batch, 0.1, window, softcap)


@pytest.mark.parametrize("d,hq,hkv", [(128, 4, 1), (256, 2, 2), (80, 6, 3)])
def test_triton_head_dims(d, hq, hkv):
    batch = make_batch([1, 9, 1], [33, 40, 70], hq, hkv, d, seed=d)
    _triton_vs_reference(batch, d**-0.5)


@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_triton_block_sizes(block_size):
    batch = make_batch([3, 1, 12], [45, 90, 12], 8, 2, 64, block_size=block_size, seed=block_size)
    _triton_vs_reference(batch, 0.125, pass_max=False)


@pytest.mark.parametrize("num_splits,window", [(3, None), (5, 50), (None, None)])
def test_triton_split_k_decode(num_splits, window):
    """Decode-only batch through the flash-decoding path: split partials + reduce kernel.

    num_splits=None: the heuristic itself picks a split for a small batch with a 1.1k context."""
    lens = [300, 17, 129] if num_splits else [1100]
    batch = make_batch([1] * len(lens), lens, 8, 2, 64, seed=len(lens) + (window or 0))
    mod = kernels._triton_module(interpret=True)
    if num_splits is None:
        assert mod._choose_splits(1, 2, 1100, batch["q"].device) > 1
    kw = {} if num_splits is None else {"num_splits": num_splits}
    out = torch.full_like(batch["q"], float("nan"))
    mod.paged_attention(batch["q"], batch["kv_cache"], batch["block_tables"], batch["seq_lens"],
                        batch["query_start_loc"], 0.125, window, None, out, max_query_len=1,
                        max_seq_len=max(lens), **kw)
    ref = run_attention(batch, 0.125, "reference", window)
    assert rel_err(out, ref) <= 1e-3


# A mixed step as the scheduler orders it: its decodes first (num_decodes=3), then prompt chunks, and a
# one-token prompt admitted after them (run with the prompts).
DECODES_FIRST = ([1, 1, 1, 7, 20, 3, 1], [37, 300, 1, 29, 20, 50, 64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(None, None), (23, 10.0)])
def test_triton_decodes_first_in_their_own_launch(dtype, window, softcap):
    """num_decodes: the leading one-token sequences run as a decode batch, the rest as prompts; the
    rows keep their places in q and out, and every row matches the reference."""
    batch = make_batch(*DECODES_FIRST, 8, 2, 64, dtype=dtype, seed=41)
    for n in (3, 1, 0):
        _triton_vs_reference(batch, 0.125, window, softcap, num_decodes=n)
    fp8 = to_fp8_cache(batch, 0.05, 0.02)
    got = run_fp8(fp8, 0.125, "triton", window, softcap, num_decodes=3)
    assert rel_err(got, run_fp8(fp8, 0.125, "reference", window, softcap)) <= TOL[dtype]


def test_num_decodes_out_of_range_is_a_clear_error():
    batch = make_batch(*DECODES_FIRST, 8, 2, 64, seed=42)
    with pytest.raises(ValueError, match="num_decodes=8 must be in"):
        run_attention(batch, 0.125, "triton", num_decodes=8)


def test_triton_strided_q_and_empty_sequence():
    """q as a view into a fused projection; a sequence with no new tokens this step is skipped."""
    batch = make_batch([2, 0, 4], [10, 7, 20], 4, 2, 32, seed=9)
    fused = torch.randn(6, 3 * 4 * 32)
    batch["q"] = fused[:, : 4 * 32].view(6, 4, 32)
    batch["q_lens"] = [2, 4]
    batch["ctx_lens"] = [10, 20]
    got = run_attention(batch, 0.2, "triton")
    batch["dense_k"].pop(1)
    batch["dense_v"].pop(1)
    assert rel_err(got, oracle(batch, 0.2)) < 1e-5


# ---------------------------------------------------------------- GPU (real Triton compile)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_decodes_first_in_their_own_launch(d, fp8):
    """A mixed step as the scheduler orders it (decodes, then prompt chunks) with num_decodes: the decode
    launch and the prompt launch together match the reference and the one-launch result."""
    q_lens = [1] * 40 + [512, 300, 1, 77]
    ctx = [600 + 13 * i for i in range(40)] + [512, 1400, 90, 2000]
    batch = make_batch(q_lens, ctx, 32, 8, d, dtype=torch.bfloat16, device="cuda", seed=d + fp8)
    if fp8:
        batch = to_fp8_cache(batch, 0.05, 0.03)
        split, one = (run_fp8(batch, d**-0.5, "triton", num_decodes=n) for n in (40, 0))
        ref = run_fp8(batch, d**-0.5, "reference")
    else:
        split, one = (run_attention(batch, d**-0.5, "triton", num_decodes=n) for n in (40, 0))
        ref = run_attention(batch, d**-0.5, "reference")
    assert rel_err(split, ref) <= 1e-2 and rel_err(one, ref) <= 1e-2
    assert rel_err(split, one) <= 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_triton_matches_reference(dtype, d):
    q_lens = [1, 200, 1, 37, 1, 512]
    ctx = [3000, 700, 17, 37, 1500, 1000]
    batch = make_batch(q_lens, ctx, 32, 8, d, dtype=dtype, device="cuda", seed=d)
    for window, softcap in [(None, None), (256, None), (None, 50.0)]:
        got = run_attention(batch, d**-0.5, "triton", window, softcap)
        ref = run_attention(batch, d**-0.5, "reference", window, softcap)
        assert rel_err(got, ref) <= TOL[dtype]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_split_k_decode(dtype, d):
    lens = [5000, 31, 2048, 777]
    batch = make_batch([1] * 4, lens, 32, 8, d, dtype=dtype, device="cuda", seed=4)
    got = run_attention(batch, d**-0.5, "triton")  # 4 seqs x 8 heads: the heuristic splits
    ref = run_attention(batch, d**-0.5, "reference")
    assert rel_err(got, ref) <= TOL[dtype]


@gpu
@needs_cuda
def test_gpu_store_kv():
    cache = torch.randn(64, 2, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    expect = cache.clone()
    k = torch.randn(100, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(64 * 16, device="cuda")[:100]
    slots[::7] = -1
    kernels.store_kv(k, v, cache, slots)
    reference.store_kv(k, v, expect, slots)
    assert torch.equal(cache, expect)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_non_contiguous_cache(impl):
    """A cache laid out [num_blocks, block_size, 2, Hkv, D] in memory and viewed in the interface's order."""
    batch = make_batch([1, 6, 1], [40, 21, 3], 8, 2, 32, seed=21)
    cache = batch["kv_cache"]
    strided = torch.empty(cache.shape[0], cache.shape[2], 2, *cache.shape[3:]).transpose(1, 2)
    strided.copy_(cache)
    assert not strided.is_contiguous()
    batch["kv_cache"] = strided
    got = run_attention(batch, 0.17, impl)
    assert rel_err(got, oracle(batch, 0.17)) < 1e-5


# ---------------------------------------------------------------- FP8 (e4m3) KV cache

FP8 = torch.float8_e4m3fn


def to_fp8_cache(batch, k_scale, v_scale):
    """The same batch over a NaN-poisoned float8_e4m3fn cache holding K / k_scale and V / v_scale; the
    oracle's dense K/V become what the cache holds, dequantized (so it checks the arithmetic exactly)."""
    dev = batch["kv_cache"].device
    cache = torch.full(batch["kv_cache"].shape, float("nan"), dtype=FP8)
    bs = cache.shape[2]
    for b, (k, v) in enumerate(zip(batch["dense_k"], batch["dense_v"])):
        p = torch.arange(k.shape[0])
        slots = batch["block_tables"][b].cpu()[p // bs].long() * bs + p % bs
        reference.store_kv(k, v, cache, slots, k_scale, v_scale)
    out = dict(batch, kv_cache=cache.to(dev), k_scale=k_scale, v_scale=v_scale)
    out["exact_k"], out["exact_v"] = batch["dense_k"], batch["dense_v"]
    out["dense_k"] = [reference.quantize_fp8(k, k_scale).float() * k_scale for k in batch["dense_k"]]
    out["dense_v"] = [reference.quantize_fp8(v, v_scale).float() * v_scale for v in batch["dense_v"]]
    return out


def run_fp8(batch, scale, impl, window=None, softcap=None, **kw):
    out = torch.full_like(batch["q"], float("nan"))
    return kernels.paged_attention(
        batch["q"], batch["kv_cache"], batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], scale,
        sliding_window=window, softcap=softcap, out=out, impl=impl, k_scale=batch["k_scale"],
        v_scale=batch["v_scale"], max_query_len=max(batch["q_lens"]), max_seq_len=max(batch["ctx_lens"]), **kw,
    )


def test_fp8_store_kv_saturates_and_rounds_like_torch():
    """Both implementations write torch's own e4m3 rounding of x / scale (bit-exact; the interpreted
    kernel encodes in software), saturating at +-448 instead of producing NaN."""
    g = torch.Generator().manual_seed(2)
    t, hkv, d, bs = 9, 2, 32, 16
    key = torch.randn(t, hkv, d, generator=g) * 4
    key[0, 0, :8] = torch.tensor([1e4, -1e4, 1.969, 2.0 ** -7, -3e-3, 1e-5, 0.0, 447.9 * 0.5])
    value = torch.randn(t, hkv, d, generator=g).to(torch.bfloat16)
    slots = torch.randperm(4 * bs, generator=g)[:t]
    slots[4] = -1
    caches = {}
    for impl in ("reference", "triton"):
        caches[impl] = torch.zeros(4, 2, bs, hkv, d, dtype=FP8)
        kernels.store_kv(key, value, caches[impl], slots, k_scale=0.5, v_scale=0.25, impl=impl)
    assert torch.equal(caches["reference"].view(torch.uint8), caches["triton"].view(torch.uint8))
    cache = caches["reference"]
    s = slots[0].item()
    assert cache[s // bs, 0, s % bs, 0, :8].float().tolist() == [448.0, -448.0, 4.0, 2.0 ** -6, -0.005859375,
                                                                   0.0, 0.0, 448.0]
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want = (value[i].float() / 0.25).clamp(-448, 448).to(FP8)
            # V sits transposed in its block: [Hkv, D, block_size]
            got = reference._fp8_v_blocks(cache.view(torch.uint8))[s // bs, :, :, s % bs]
            assert torch.equal(got, want.view(torch.uint8))


@pytest.mark.parametrize("window,softcap", [(None, None), (9, 5.0)])
def test_fp8_reference_matches_dense_oracle(window, softcap):
    batch = to_fp8_cache(make_batch(*MIXED, 8, 2, 32, seed=31), 0.05, 0.02)
    out = run_fp8(batch, 32**-0.5, "reference", window, softcap)
    assert rel_err(out, oracle(batch, 32**-0.5, window, softcap)) < 1e-5


def test_fp8_kv_error_against_unquantized():
    """The stated tolerance of an fp8 KV cache: e4m3 keeps 3 mantissa bits (relative step 2**-4), so with
    per-layer scales attention outputs stay within 5 % (relative L2) of the unquantized ones."""
    batch = to_fp8_cache(make_batch(*MIXED, 8, 2, 64, seed=32), 1.0, 1.0)
    out = run_fp8(batch, 64**-0.5, "reference")
    exact = oracle(dict(batch, dense_k=batch["exact_k"], dense_v=batch["exact_v"]), 64**-0.5)
    err = rel_err(out, exact)
    assert 1e-3 < err < 0.05, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(None, None), (23, 10.0)])
def test_fp8_triton_matches_reference(dtype, window, softcap):
    """Mixed decode/prefill/chunked batch over an fp8 cache, interpreted Triton against the reference."""
    batch = to_fp8_cache(make_batch(*MIXED, 8, 2, 64, dtype=dtype, seed=33), 0.03, 0.07)
    got = run_fp8(batch, 0.125, "triton", window, softcap)
    assert rel_err(got, run_fp8(batch, 0.125, "reference", window, softcap)) <= TOL[dtype]


def test_fp8_triton_split_k_decode():
    batch = to_fp8_cache(make_batch([1, 1, 1], [300, 17, 129], 8, 2, 64, seed=34), 0.5, 2.0)
    mod = kernels._triton_module(interpret=True)
    out = torch.full_like(batch["q"], float("nan"))
    mod.paged_attention(batch["q"], batch["kv_cache"], batch["block_tables"], batch["seq_lens"],
                        batch["query_start_loc"], 0.125, None, None, out, max_query_len=1, max_seq_len=300,
                        k_scale=0.5, v_scale=2.0, num_splits=3)
    assert rel_err(out, run_fp8(batch, 0.125, "reference")) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_triton_decode_default_config(dtype):
    """Decode-only batch, the entry point's own fp8 choice: triton_decode's kernel, 64-key tiles (full and
    masked), fp16 dots, no split."""
    batch = to_fp8_cache(make_batch([1] * 8, [300, 1, 129, 256, 17, 400, 128, 77], 8, 2, 64, dtype=dtype, seed=35),
                         0.04, 0.03)
    mod = kernels._triton_module(interpret=True)
    assert kernels._triton_module(True, "triton_decode").launch_config(64)[0] == 64
    assert mod._choose_splits(8, 2, 400, batch["q"].device, kv_bytes=1) == 1
    assert rel_err(run_fp8(batch, 0.125, "triton"), oracle(batch, 0.125)) <= 1e-2


@pytest.mark.parametrize("hq, hkv, d, dtype, window, softcap, splits", [
    (4, 4, 32, torch.bfloat16, None, None, 1),  # one query head per KV head (MHA): N = 1
    (12, 2, 64, torch.float16, 100, None, 1),  # G = 6, padded to 8 on N
    (16, 2, 128, torch.bfloat16, None, 30.0, 2),  # G = 8, 64-key tiles, softcap, split-K
    (8, 2, 64, torch.float32, 64, 20.0, 3),  # fp32 q (ieee dots), window and softcap, split-K
    (8, 4, 64, torch.bfloat16, None, None, 2),  # two KV heads per program (G = 2), split-K
    (6, 3, 64, torch.bfloat16, None, None, 1),  # an odd number of KV heads: one per program
])
def test_fp8_triton_decode_kernel_shapes(hq, hkv, d, dtype, window, softcap, splits):
    """triton_decode's kernel (keys on the dots' M dimension) against the oracle across head groupings,
    head sizes, q dtypes, windows, softcapping and split-K."""
    batch = to_fp8_cache(make_batch([1] * 5, [300, 1, 129, 64, 77], hq, hkv, d, dtype=dtype, seed=hq + d), 0.05, 0.02)
    out = torch.full_like(batch["q"], float("nan"))
    kernels._triton_module(interpret=True).paged_attention(
        batch["q"], batch["kv_cache"], batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], d**-0.5,
        window, softcap, out, max_query_len=1, max_seq_len=300, k_scale=0.05, v_scale=0.02, num_splits=splits)
    assert rel_err(out, oracle(batch, d**-0.5, window, softcap)) <= TOL[dtype]


def test_fp8_decode_heads_per_program_rule():
    """Two KV heads per program only where their keys share 128-byte lines and the batch fills the GPU."""
    hpp = kernels._triton_module(True, "triton_decode").heads_per_program
    assert hpp(64, 8, 4, 64, batch=256, sms=132) == 2  # Llama-3.2-1B at batch 256
    assert hpp(64, 8, 4, 64, batch=16, sms=132) == 1  # too few programs: split-K's job
    assert hpp(128, 8, 4, 128, batch=256, sms=132) == 1  # a head's key is a whole line already
    assert hpp(64, 3, 4, 64, batch=256, sms=132) == 1  # an odd number of KV heads
    assert hpp(64, 8, 4, 128, batch=256, sms=132) == 1  # heads not adjacent in the cache
    assert hpp(64, 2, 16, 64, batch=256, sms=132) == 1  # 32 query heads per program: past N = 16


@pytest.mark.parametrize("block_size", [8, 24, 128])
def test_fp8_block_sizes(block_size):
    """The transposed V of an fp8 cache at block sizes below a tile's keys (runs of 8), not a power of two
    (one gather per key) and above a tile's keys (the tile inside one block): the decode kernel (with
    split-K) and the varlen kernel against the oracle, over a NaN-poisoned cache."""
    ctx = [300, 1, 129, 64, 77]
    dec = to_fp8_cache(make_batch([1] * 5, ctx, 8, 2, 64, block_size=block_size, seed=block_size), 0.05, 0.02)
    for splits in (1, 2):
        out = torch.full_like(dec["q"], float("nan"))
        kernels._triton_module(interpret=True).paged_attention(
            dec["q"], dec["kv_cache"], dec["block_tables"], dec["seq_lens"], dec["query_start_loc"], 0.125,
            None, None, out, max_query_len=1, max_seq_len=300, k_scale=0.05, v_scale=0.02, num_splits=splits)
        assert rel_err(out, oracle(dec, 0.125)) <= 1e-3
    mixed = to_fp8_cache(make_batch(*MIXED, 8, 2, 32, block_size=block_size, seed=block_size + 1), 0.05, 0.02)
    assert rel_err(run_fp8(mixed, 32**-0.5, "triton"), oracle(mixed, 32**-0.5)) <= 1e-3
    assert rel_err(run_fp8(mixed, 32**-0.5, "reference"), oracle(mixed, 32**-0.5)) < 1e-5


@pytest.mark.parametrize("mag", [1e6, 1e-7])
def test_fp8_triton_q_outside_fp16_range(mag):
    """A bf16 q outside fp16's range (1e6 overflows it, 1e-7 is subnormal): fp16 dots on power-of-two scaled rows."""
    batch = to_fp8_cache(make_batch(*MIXED, 8, 2, 64, dtype=torch.bfloat16, seed=36), 0.02, 0.05)
    batch["q"] = (batch["q"].float() * mag).to(torch.bfloat16)
    got = run_fp8(batch, 0.125 / mag, "triton")
    assert rel_err(got, oracle(batch, 0.125 / mag)) <= 1e-2


def test_fp8_copy_blocks_and_bad_scales():
    cache = torch.randn(6, 2, 4, 2, 8).to(FP8)
    before = cache.clone()
    kernels.copy_blocks([cache], torch.tensor([1]), torch.tensor([4]))
    assert torch.equal(cache[4].view(torch.uint8), before[1].view(torch.uint8))
    with pytest.raises(ValueError, match="positive finite"):
        kernels.store_kv(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), cache, torch.tensor([0]), k_scale=0.0)
    with pytest.raises(ValueError, match="kv_cache dtype"):
        kernels.store_kv(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), cache.to(torch.float8_e5m2),
                         torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_quantize_rows(dtype):
    """Per-token fp8 activations: interpreted Triton and the reference write the same bytes and scales."""
    x = (torch.randn(5, 200, generator=torch.Generator().manual_seed(3)) * torch.tensor([1e-3, 1, 30, 1e4, 0])[:, None])
    x = x.to(dtype)
    (q_ref, s_ref), (q_tri, s_tri) = (kernels.quantize_fp8_rows(x, impl=i) for i in ("reference", "triton"))
    assert q_ref.dtype == FP8 and s_ref.shape == (5, 1)
    assert torch.equal(s_ref, s_tri) and torch.equal(q_ref.view(torch.uint8), q_tri.view(torch.uint8))
    assert q_ref.float().abs().amax(-1)[:4].eq(448).all() and q_ref[4].float().eq(0).all()  # zero row: scale 1e-12
    assert rel_err(q_ref.float() * s_ref, x.float()) < 0.04


@gpu
@needs_cuda
def test_gpu_fp8_quantize_rows():
    x = torch.randn(300, 14336, device="cuda", dtype=torch.bfloat16) * 3
    (q_ref, s_ref), (q, s) = kernels.quantize_fp8_rows(x, impl="reference"), kernels.quantize_fp8_rows(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 1e-4  # ties at most


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [8, 24, 128])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_fp8_block_sizes(block_size, d):
    """Compiled kernels over an fp8 cache's transposed V at block sizes other than 16: runs of 8 keys, one gather
    per key (24), a tile inside one block (128); a prompt's consecutive slots through store_kv; decode (split-K
    included) and mixed batches against the reference."""
    nblk = 4096 // block_size + 8
    k = torch.randn(1000, 8, d, device="cuda", dtype=torch.bfloat16) * 3
    v = torch.randn_like(k)
    cache = torch.zeros(nblk, 2, block_size, 8, d, device="cuda", dtype=FP8)
    expect = cache.clone()
    slots = torch.arange(1000, device="cuda") + 3 * block_size + 5  # one prompt's slots, across block boundaries
    slots[::97] = -1
    kernels.store_kv(k, v, cache, slots, k_scale=0.02, v_scale=0.01)
    reference.store_kv(k, v, expect, slots, 0.02, 0.01)
    assert torch.equal(cache.view(torch.uint8), expect.view(torch.uint8))
    for q_lens, ctx in [([1] * 6, [3000, 700, 17, 37, 1500, 1000]), ([1] * 4, [5000, 31, 2048, 777]),
                        ([1, 200, 1, 37], [3000, 700, 17, 37])]:
        batch = make_batch(q_lens, ctx, 32, 8, d, block_size=block_size, dtype=torch.bfloat16, seed=d + block_size)
        batch = to_fp8_cache(batch, 0.01, 0.005)
        batch = dict(batch, **{n: batch[n].cuda() for n in ("q", "kv_cache", "block_tables", "seq_lens",
                                                            "query_start_loc")})
        got = run_fp8(batch, d**-0.5, "triton")
        assert rel_err(got, run_fp8(batch, d**-0.5, "reference")) <= 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_fp8_kv_matches_reference(d):
    """Compiled kernels over an fp8 cache (hardware e4m3 conversion) at real shapes, split-K included."""
    k = torch.randn(100, 8, d, device="cuda", dtype=torch.bfloat16) * 3
    v = torch.randn_like(k)
    cache = torch.zeros(64, 2, 16, 8, d, device="cuda", dtype=FP8)
    expect = cache.clone()
    slots = torch.randperm(64 * 16, device="cuda")[:100]
    slots[::7] = -1
    kernels.store_kv(k, v, cache, slots, k_scale=0.02, v_scale=0.01)
    reference.store_kv(k, v, expect, slots, 0.02, 0.01)
    assert torch.equal(cache.view(torch.uint8), expect.view(torch.uint8))
    for q_lens, ctx in [([1, 200, 1, 37, 1, 512], [3000, 700, 17, 37, 1500, 1000]), ([1] * 4, [5000, 31, 2048, 777])]:
        batch = make_batch(q_lens, ctx, 32, 8, d, dtype=torch.bfloat16, seed=d)
        batch = to_fp8_cache(batch, 0.01, 0.005)
        batch = dict(batch, **{n: batch[n].cuda() for n in ("q", "kv_cache", "block_tables", "seq_lens",
                                                            "query_start_loc")})
        for window, softcap in [(None, None), (256, None), (None, 50.0)]:
            got = run_fp8(batch, d**-0.5, "triton", window, softcap)
            assert rel_err(got, run_fp8(batch, d**-0.5, "reference", window, softcap)) <= 1e-2
        for mag in (1e6, 1e-7):  # outside fp16's range: the kernel's per-row power-of-two scaling of q
            big = dict(batch, q=(batch["q"].float() * mag).to(torch.bfloat16))
            got = run_fp8(big, d**-0.5 / mag, "triton")
            assert rel_err(got, run_fp8(big, d**-0.5 / mag, "reference")) <= 1e-2

"""The CPU kernels (kernels/cpu_ext.py: the small-batch linear, the fused element-wise ops) against F.linear
and the reference ops, and their dispatch."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from paged_backend import kernels
from paged_backend.kernels import cpu_ext, reference
from paged_backend.layers.linear import Linear, MergedLinear, use_input_major_weights


def _has_compiler() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.skipif(not _has_compiler(), reason="no C++ compiler: the kernel cannot be built here")
def test_the_kernel_builds_where_there_is_a_compiler():
    assert kernels.load_cpu_kernels(), "a machine with a C++ compiler must get the kernel, not the F.linear fallback"


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 12, 13, 16, 31, 64])
@pytest.mark.parametrize("n,k", [(1, 16), (4, 64), (67, 37), (130, 577), (96, 1536)])
def test_matches_f_linear(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    assert cpu_ext.fits_linear(x, w)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_keeps_leading_dims_and_reads_strided_inputs():
    x = torch.randn(2, 3, 80)[:, :, ::2]  # [2, 3, 40], not contiguous
    w = torch.randn(24, 40)
    out = kernels.linear(x, w)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_what_it_does_not_take_goes_to_f_linear():
    w = torch.randn(24, 40)
    many = torch.randn(cpu_ext.MAX_ROWS + 1, 40)
    assert not cpu_ext.fits_linear(many, w) and torch.equal(kernels.linear(many, w), F.linear(many, w))
    x16, w16 = torch.randn(3, 40, dtype=torch.bfloat16), w.bfloat16()
    assert not cpu_ext.fits_linear(x16, w16) and torch.equal(kernels.linear(x16, w16), F.linear(x16, w16))
    strided_w = torch.randn(40, 24).t()  # an input-major weight
    assert not cpu_ext.fits_linear(torch.randn(3, 40), strided_w)
    empty = torch.randn(0, 40)
    assert not cpu_ext.fits_linear(empty, w) and kernels.linear(empty, w).shape == (0, 24)


def test_autograd_goes_to_f_linear():
    lin = Linear(40, 24)
    x = torch.randn(3, 40)
    assert not cpu_ext.fits_linear(x, lin.weight)  # the weight is a parameter that requires grad
    lin(x).sum().backward()
    assert lin.weight.grad is not None
    with torch.inference_mode():
        assert cpu_ext.fits_linear(x, lin.weight)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PAGED_BACKEND_CPU_KERNELS", "0")
    assert cpu_ext._build() is False


def test_the_project_linears_keep_their_layout_for_the_kernel():
    """Input-major storage (MKL's faster small-M layout) is only for plain nn.Linear modules (transformers'
    own); the project's Linear keeps [out, in] row-major, which the kernel reads."""
    model = torch.nn.Sequential(Linear(40, 24), MergedLinear(40, {"a": 8, "b": 16}), torch.nn.Linear(40, 24))
    assert use_input_major_weights(model) == 1
    assert model[0].weight.is_contiguous() and model[1].weight.is_contiguous()
    assert not model[2].weight.is_contiguous() and model[2].weight.t().is_contiguous()


# ---- the fused element-wise ops against the reference (the same arithmetic, in another order) ----
def _close(got, ref):
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n", [576, 37, 8])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(n, gemma, with_residual):
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(2, 5, n, generator=g) * 3, torch.randn(n, generator=g)
    res = torch.randn(2, 5, n, generator=g) if with_residual else None
    got = cpu_ext.rms_norm(x, w, 1e-6, res, gemma)
    assert got is not None
    ref = reference.rms_norm(x, w, 1e-6, res, gemma)
    if with_residual:
        _close(got[0], ref[0])
        assert torch.equal(got[1], ref[1])  # the sum is one fp32 add either way
    else:
        _close(got, ref)
    assert kernels.rms_norm(x, w, 1e-6, res, gemma=gemma) is not None  # the CPU dispatch takes it


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("f", [1536, 40, 3])
def test_gated_activation_matches_the_reference(activation, f):
    g = torch.Generator().manual_seed(f)
    x = torch.randn(7, 2 * f, generator=g) * 4
    ends = torch.tensor([-200.0, -90.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 200.0])  # exp's range ends
    x[0, : min(8, f)] = ends[: min(8, f)]
    got = cpu_ext.gated_activation(x, activation)
    _close(got, reference.gated_activation(x, activation))
    assert torch.isfinite(got).all()


def test_rotary_matches_the_reference_on_strided_heads():
    t, hq, hkv, d = 9, 6, 2, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    q = qkv[:, : hq * d].view(t, hq, d)  # how the attention layer splits its fused projection
    pos = torch.arange(t, dtype=torch.float32)[:, None] * torch.rand(d // 2)
    cos, sin = pos.cos(), pos.sin()
    got = cpu_ext.rotary(q, cos, sin)
    assert got.is_contiguous()
    _close(got, reference.rotary(q, cos, sin))


def test_the_fused_ops_leave_other_inputs_to_the_reference():
    x16 = torch.randn(3, 8, dtype=torch.bfloat16)
    assert cpu_ext.rms_norm(x16, torch.ones(8, dtype=torch.bfloat16), 1e-6, None, False) is None
    assert cpu_ext.gated_activation(torch.randn(3, 8), "gelu") is None  # erf: the reference's
    assert cpu_ext.rms_norm(torch.randn(8, 3).t(), torch.ones(8), 1e-6, None, False) is None  # strided rows
    assert cpu_ext.rotary(torch.randn(4, 2, 8)[..., ::2], torch.ones(4, 2), torch.ones(4, 2)) is None


_OTHER_ARCH_CHECK = """
import torch, torch.nn.functional as F
from paged_backend.kernels import cpu_ext, reference
assert cpu_ext.load() is not None
g = torch.Generator().manual_seed(0)
for m in (1, 2, 3, 7, 16, 33):
    for n, k in ((4, 64), (67, 37), (130, 577)):
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
        torch.testing.assert_close(cpu_ext.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
x, r, w = torch.randn(5, 37, generator=g), torch.randn(5, 37, generator=g), torch.randn(37, generator=g)
out, total = cpu_ext.rms_norm(x, w, 1e-6, r, True)
ref = reference.rms_norm(x, w, 1e-6, r, True)
torch.testing.assert_close(out, ref[0], rtol=2e-6, atol=2e-6)
for act in ("silu", "gelu_tanh"):
    h = torch.randn(3, 2 * 45, generator=g) * 4
    torch.testing.assert_close(cpu_ext.gated_activation(h, act), reference.gated_activation(h, act), rtol=2e-6, atol=2e-6)
q = torch.randn(4, 3, 2 * 40, generator=g)
cos, sin = torch.randn(4, 40, generator=g), torch.randn(4, 40, generator=g)
torch.testing.assert_close(cpu_ext.rotary(q, cos, sin), reference.rotary(q, cos, sin), rtol=2e-6, atol=2e-6)
qa, kv = torch.randn(3, 2, 3, 64, generator=g), torch.randn(3, 21, 2, 2, 64, generator=g)
ctx = torch.tensor([1, 21, 6])
mask = (torch.arange(21)[None, :] < ctx[:, None])[:, None, None, :]
ref = F.scaled_dot_product_attention(qa, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), attn_mask=mask)
torch.testing.assert_close(cpu_ext.decode_attention(qa, kv[:, :, 0], kv[:, :, 1], ctx, 0.125), ref, rtol=2e-6, atol=2e-6)
qp, kvp = torch.randn(9, 4, 64, generator=g), torch.randn(21, 2, 2, 64, generator=g)
mask = torch.arange(21)[None, :] <= torch.arange(12, 21)[:, None]
ref = F.scaled_dot_product_attention(qp.transpose(0, 1), kvp[:, 0].transpose(0, 1), kvp[:, 1].transpose(0, 1),
                                     attn_mask=mask, scale=0.125, enable_gqa=True).transpose(0, 1)
torch.testing.assert_close(cpu_ext.prefill_attention(qp, kvp[:, 0], kvp[:, 1], 0.125), ref, rtol=2e-6, atol=2e-6)
logits = torch.randn(3, 1001, generator=g)
ids, lp = cpu_ext.greedy_sample(logits)
assert torch.equal(ids, logits.argmax(1))
torch.testing.assert_close(lp, reference.greedy_sample(logits)[1], rtol=2e-6, atol=2e-6)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or not _has_compiler(), reason="x86-64 targets, a C++ compiler")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_the_avx2_and_4_lane_builds_compute_the_same(arch):
    """Laptops without AVX-512 get the 8-lane (AVX2) or 4-lane (NEON-like) code paths: build them here, in a
    fresh process, and check them against F.linear and the reference ops."""
    env = dict(os.environ, PAGED_BACKEND_CPU_ARCH=arch)
    done = subprocess.run([sys.executable, "-c", _OTHER_ARCH_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]



@pytest.mark.parametrize("g,d", [(3, 64), (1, 128), (8, 64), (2, 256)])
def test_decode_attention_matches_masked_sdpa(g, d):
    """Each sequence attends to its first ctx keys of the padded batch (strided K/V views, as the mirrors
    give them); contexts of 1, of the full width and not a multiple of 4 or 16 included."""
    b, s_max, hkv = 4, 37, 2
    gen = torch.Generator().manual_seed(g * d)
    q = torch.randn(b, hkv, g, d, generator=gen)
    kv = torch.randn(b, s_max, 2, hkv, d, generator=gen)
    k, v = kv[:, :, 0], kv[:, :, 1]  # [B, S, Hkv, D], not contiguous
    ctx = torch.tensor([[1], [37], [20], [16]])
    got = cpu_ext.decode_attention(q, k, v, ctx, d**-0.5)
    assert got is not None
    mask = torch.arange(s_max)[None, :] < ctx  # [B, S]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=d**-0.5)
    _close(got, ref)
    assert cpu_ext.decode_attention(q[..., :24], k[..., :24], v[..., :24], ctx, 0.2) is None  # no kernel: SDPA


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (16, 1000), (3, 17)])
def test_greedy_sample_matches_the_reference(rows, vocab):
    """argmax (the first index among ties, also across vector lanes and in the tail) and its log-probability."""
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    logits[0, vocab // 2] = logits[0, vocab - 1] = logits[0, 3] = logits[0].max() + 1  # ties: index 3 wins
    got = cpu_ext.greedy_sample(logits)
    assert got is not None
    ids, logprobs = reference.greedy_sample(logits)
    assert torch.equal(got[0], ids) and got[0][0] == 3
    _close(got[1], logprobs)
    assert torch.equal(kernels.greedy_sample(logits)[0], ids)


def test_greedy_sample_leaves_nan_and_inf_rows_to_the_reference():
    logits = torch.randn(3, 40)
    logits[0, :30] = float("-inf")  # masked tokens: the kernel's
    _close(cpu_ext.greedy_sample(logits)[1], reference.greedy_sample(logits)[1])
    for bad, at in ((float("nan"), 7), (float("inf"), 7), (float("nan"), 37), (float("inf"), 38)):
        logits = logits.clone()
        logits[1] = torch.randn(40)
        logits[1, at] = bad  # in a vector or in the tail
        assert cpu_ext.greedy_sample(logits) is None
        ids, logprobs = kernels.greedy_sample(logits)
        ref_ids, ref_lp = reference.greedy_sample(logits)
        assert torch.equal(ids, ref_ids) and torch.equal(logprobs.isnan(), ref_lp.isnan())
    assert cpu_ext.greedy_sample(logits.double()) is None  # not fp32: the reference


@pytest.mark.parametrize("m,s,hq,hkv,d", [(37, 37, 9, 3, 64), (5, 70, 4, 2, 128), (1, 9, 2, 1, 256), (67, 67, 8, 8, 64),
                                          (20, 83, 6, 2, 64)])
def test_prefill_attention_matches_causal_sdpa(m, s, hq, hkv, d):
    """The last m positions of a sequence of s attend causally to its keys: a whole prompt (m == s), a chunk after
    a prefix (m < s), GQA and MHA, key counts not a multiple of the score tile."""
    gen = torch.Generator().manual_seed(m * s + d)
    q = torch.randn(m, hq, d, generator=gen)
    kv = torch.randn(s, 2, hkv, d, generator=gen)
    k, v = kv[:, 0], kv[:, 1]  # [S, Hkv, D], strided as a gather of the cache gives them
    got = cpu_ext.prefill_attention(q, k, v, d**-0.5)
    assert got is not None
    mask = torch.arange(s)[None, :] <= torch.arange(s - m, s)[:, None]
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=d**-0.5, enable_gqa=True)[0].transpose(0, 1)
    _close(got, ref)
    assert cpu_ext.prefill_attention(q[..., :24], k[..., :24], v[..., :24], 0.2) is None  # no kernel: SDPA

"""The element-wise kernels (RMSNorm + residual, gated activations, rotary, the greedy choice): Triton through its
interpreter on CPU tensors against the torch twins, which are the models' own (transformers') code;
the same at real shapes on the GPU (marked `gpu`)."""

from __future__ import annotations

import pytest
import torch

from paged_backend import kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32: reduction order only; bf16/fp16: at most a rounding step apart somewhere.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def close(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


def randn(*shape, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device).to(dtype)


def check_rms_norm(t, n, dtype, gemma, with_residual, device, impl):
    x = randn(t, n, dtype=dtype, device=device, seed=1) * 3
    w = randn(n, dtype=dtype, device=device, seed=2)
    res = randn(t, n, dtype=dtype, device=device, seed=3) if with_residual else None
    out = kernels.rms_norm(x, w, 1e-6, res, gemma=gemma, impl=impl)
    ref = kernels.rms_norm(x, w, 1e-6, res, gemma=gemma, impl="reference")
    if with_residual:
        close(out[0], ref[0], dtype)
        if dtype != torch.bfloat16 or device == "cuda":  # the interpreter truncates fp32 -> bf16
            assert torch.equal(out[1], ref[1]), "x + residual must be exactly torch's sum in x's dtype"
        close(out[1], ref[1], dtype)
    else:
        close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, gemma, with_residual):
    check_rms_norm(7, 48, dtype, gemma, with_residual, "cpu", "triton")  # 48: not a power of two


def test_rms_norm_of_strided_heads():
    """Qwen3/Gemma3 q/k norm: [T, H, D] views into the fused qkv output."""
    qkv = randn(5, 3 * 4 * 16, dtype=torch.float32)
    q = qkv[:, : 4 * 16].view(5, 4, 16)
    w = randn(16, dtype=torch.float32, seed=4)
    close(kernels.rms_norm(q, w, 1e-6, impl="triton"), kernels.rms_norm(q, w, 1e-6, impl="reference"), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (37, 576), (3, 9, 64), (5, 2048)])
def test_reference_rms_norm_is_transformers_bitwise(dtype, shape):
    """The CPU twin (torch's fused rms_norm where the math is all fp32) gives transformers' exact bits."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = randn(*shape, dtype=dtype, seed=5) * 4
    for cls, gemma in ((LlamaRMSNorm, False), (GemmaRMSNorm, True)):
        hf = cls(shape[-1], eps=1e-6).to(dtype)
        with torch.no_grad():
            hf.weight.copy_(randn(shape[-1], dtype=dtype, seed=6))
            assert torch.equal(kernels.rms_norm(x, hf.weight, 1e-6, gemma=gemma, impl="reference"), hf(x))


def check_fp8_out(got, ref, exact: bool = True) -> None:
    """exact: the same bytes and scales. Otherwise (compiled kernels: the fused RMSNorm may sum its variance in
    another order than the plain one, a last-bit difference of a few values) the scales within 1e-6 and at most
    one value in 10^4 one fp8 step apart."""
    (q, s), (q_ref, s_ref) = got, ref
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and s.shape == s_ref.shape == (q.shape[0], 1)
    if exact:
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        return
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    diff = (q.view(torch.uint8).int() - q_ref.view(torch.uint8).int()).abs()
    assert diff.max().item() <= 1 and diff.float().mean().item() < 1e-4


def fp8_out_cases(t, n, dtype, device, impl):
    """The fused kernels' fp8 output (rms_norm both styles, with and without residual; the gated activations) is
    quantize_fp8_rows of the same implementation's unfused output: byte for byte on the CPU, to the last bit of
    a few values on the GPU."""
    exact = device == "cpu"
    x = randn(t, n, dtype=dtype, device=device, seed=1) * 3
    w = randn(n, dtype=dtype, device=device, seed=2)
    res = randn(t, n, dtype=dtype, device=device, seed=3)
    for gemma in (False, True):
        for r in (None, res):
            got = kernels.rms_norm(x, w, 1e-6, r, gemma=gemma, fp8_out=True, impl=impl)
            unfused = kernels.rms_norm(x, w, 1e-6, r, gemma=gemma, impl=impl)
            if r is not None:
                assert torch.equal(got[1], unfused[1])
                got, unfused = got[0], unfused[0]
            check_fp8_out(got, kernels.quantize_fp8_rows(unfused, impl=impl), exact)
    g = randn(t, 2 * n, dtype=dtype, device=device, seed=4) * 2
    for act in ("silu", "gelu_tanh", "gelu"):
        got = kernels.gated_activation(g, act, fp8_out=True, impl=impl)
        check_fp8_out(got, kernels.quantize_fp8_rows(kernels.gated_activation(g, act, impl=impl), impl=impl), exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_out_is_the_unfused_quantization(dtype):
    for impl in ("triton", "reference"):
        fp8_out_cases(5, 200, dtype, "cpu", impl)  # 200: not a power of two
    with pytest.raises(ValueError, match="fp8_out"):
        kernels.rms_norm(randn(2, 8, dtype=torch.bfloat16), randn(8, dtype=torch.float32), 1e-6, fp8_out=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_gated_activation(dtype, activation):
    x = randn(6, 2 * 40, dtype=dtype) * 2
    close(kernels.gated_activation(x, activation, impl="triton"),
          kernels.gated_activation(x, activation, impl="reference"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", [(16, 4, 2), (64, 4, 2), (256, 40, 8)])  # 256: 32 heads a program, a masked tail
def test_rotary_on_a_view_of_the_qkv_output(dtype, d, hq, hkv):
    t = 9
    qkv = randn(t, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    pos = torch.arange(100, 100 + t, dtype=torch.float32)
    freqs = pos[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = freqs.cos(), freqs.sin()
    for x in (q, k):
        out = kernels.rotary(x, cos, sin, impl="triton")
        assert out.is_contiguous()
        close(out, kernels.rotary(x, cos, sin, impl="reference"), dtype)


def check_greedy(n, v, dtype, device, impl):
    x = randn(n, v, dtype=dtype, device=device, seed=4) * 5
    x[0, v // 3] = x[0, v - 1] = x[0].max() + 1  # a tie in two blocks: the first index wins, as torch's
    if n > 1:
        x[1, :] = x[1, 0]  # a flat row: index 0, log-probability -log(V)
    ids, lp = kernels.greedy_sample(x, impl=impl)
    ref_ids, ref_lp = kernels.greedy_sample(x, impl="reference")
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32
    assert torch.equal(ids, ref_ids) and torch.equal(ids, x.argmax(dim=1)) and ids[0] == v // 3
    assert torch.allclose(lp, ref_lp, rtol=1e-5, atol=1e-5)
    expected = x.float().log_softmax(dim=1).gather(1, ids[:, None]).squeeze(1)
    assert torch.allclose(lp, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, v", [(1, 50), (3, 4096), (5, 9000)])
def test_greedy_sample(n, v, dtype):
    check_greedy(n, v, dtype, "cpu", "triton")


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        kernels.rms_norm(x, torch.ones(8), 1e-6, torch.randn(3, 4))
    with pytest.raises(ValueError, match="activation"):
        kernels.gated_activation(x, "relu")
    with pytest.raises(ValueError, match="cos/sin"):
        kernels.rotary(x.view(3, 2, 4), torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="logits"):
        kernels.greedy_sample(torch.zeros(3, 8, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [256, 8192])
def test_gpu_real_shapes(dtype, t):
    for gemma in (False, True):
        check_rms_norm(t, 2048, dtype, gemma, True, "cuda", None)
    for act in ("silu", "gelu_tanh"):
        x = randn(t, 2 * 8192, dtype=dtype, device="cuda")
        close(kernels.gated_activation(x, act), kernels.gated_activation(x, act, impl="reference"), dtype)
    x = randn(t, 32, 64, dtype=dtype, device="cuda")
    freqs = torch.rand(t, 32, device="cuda") * 1000
    close(kernels.rotary(x, freqs.cos(), freqs.sin()),
          kernels.rotary(x, freqs.cos(), freqs.sin(), impl="reference"), dtype)
    for n in (1, 256):
        check_greedy(n, 128256, dtype, "cuda", None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 256, 8192])
@pytest.mark.parametrize("n", [2048, 14336])
def test_gpu_fp8_out_is_the_unfused_quantization(t, n):
    """What the unfused kernels and quantize_fp8_rows write, at the models' widths (8B's MLP: 14336)."""
    fp8_out_cases(t, n, torch.bfloat16, "cuda", None)

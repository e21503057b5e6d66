"""The fp8 linear's GEMM (kernels.fp8_matmul): our Triton kernel through Triton's interpreter on the CPU
against the fp32 reference, at small shapes that take every path (split-K, ragged M/N/K tails, each tile
choice of `config`); the GPU checks at real shapes are in test_gpu_fp8.py."""

from __future__ import annotations

import pytest
import torch

from paged_backend import kernels


def _operands(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_q, x_s = kernels.quantize_fp8_rows(torch.randn(m, k, generator=g))
    w_q, w_s = kernels.quantize_fp8_rows(torch.randn(n, k, generator=g) * 0.05)
    return x_q, x_s, w_q, w_s.reshape(1, -1)


def _gemm_module():
    return kernels._triton_module(True, "triton_gemm")


@pytest.mark.parametrize("m,k,n,cfg", [
    (5, 64, 48, None),  # one program, K shorter than a step
    (130, 320, 96, None),  # rows past one tile, K not a multiple of the step
    (3, 2064, 40, (64, 32, 64, 4, 4, 2)),  # split-K whose last split ends inside a step
    (70, 256, 64, (64, 64, 32, 3, 4, 2)),  # three splits
    (200, 128, 130, (128, 64, 64, 1, 4, 2)),  # N past the tiles
])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_triton_matches_reference(m, k, n, cfg, out_dtype):
    x_q, x_s, w_q, w_s = _operands(m, k, n, seed=m + k + n)
    mod = _gemm_module()
    got = mod.fp8_matmul(x_q, x_s, w_q, w_s, out_dtype, None if cfg is None else mod.GemmConfig(*cfg))
    want = kernels.fp8_matmul(x_q, x_s, w_q, w_s, torch.float32, impl="reference")
    assert got.dtype == out_dtype and got.shape == (m, n)
    # fp8 products are exact in fp32: only the summation order (and the output's rounding) differ.
    tol = 1e-5 if out_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_fp8_gemm_public_entry_and_errors():
    x_q, x_s, w_q, w_s = _operands(4, 32, 16)
    got = kernels.fp8_matmul(x_q, x_s, w_q, w_s, torch.float32, impl="triton")
    torch.testing.assert_close(got, kernels.fp8_matmul(x_q, x_s, w_q, w_s, torch.float32), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must be \\[M, K\\] and \\[N, K\\]"):
        kernels.fp8_matmul(x_q, x_s, w_q[:, :16], w_s, torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        kernels.fp8_matmul(x_q.float(), x_s, w_q, w_s, torch.float32)
    with pytest.raises(ValueError, match="x_scale"):
        kernels.fp8_matmul(x_q, x_s.reshape(-1), w_q, w_s, torch.float32)


@pytest.mark.parametrize("m", [1, 16, 64, 128, 256])
@pytest.mark.parametrize("k,n", [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048), (4096, 6144),
                                 (4096, 4096), (4096, 28672), (14336, 4096)])
@pytest.mark.parametrize("sms,smem", [(132, 227 * 1024), (58, 99 * 1024)])  # an H100 / H200; an L4 (Ada)
def test_fp8_gemm_config_fills_the_gpu(m, k, n, sms, smem):
    """Each launch of the model shapes gives every SM at least ~0.7 programs unless its splits are already
    1024 deep, never tiles taller than max(m, 64), and fits the GPU's shared memory (tiles x stages)."""
    c = _gemm_module().config(m, n, k, sms, smem)
    programs = -(-m // c.block_m) * -(-n // c.block_n) * c.split_k
    assert programs >= 0.7 * sms or k // c.split_k < 2048
    assert c.block_m <= max(m, 64) and c.block_k * c.split_k <= k
    assert (c.block_m + c.block_n) * c.block_k * c.num_stages <= smem and c.num_stages >= 2

"""The CPU linear kernel for small batches (kernels/cpu_linear.cpp) against F.linear, and its dispatch."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from paged_backend import kernels
from paged_backend.kernels import cpu_linear
from paged_backend.layers.linear import Linear, MergedLinear, use_input_major_weights


def _has_compiler() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.skipif(not _has_compiler(), reason="no C++ compiler: the kernel cannot be built here")
def test_the_kernel_builds_where_there_is_a_compiler():
    assert kernels.load_cpu_linear(), "a machine with a C++ compiler must get the kernel, not the F.linear fallback"


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 12, 13, 16, 31, 64])
@pytest.mark.parametrize("n,k", [(1, 16), (4, 64), (67, 37), (130, 577), (96, 1536)])
def test_matches_f_linear(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    assert cpu_linear.fits(x, w)
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
    many = torch.randn(cpu_linear.MAX_ROWS + 1, 40)
    assert not cpu_linear.fits(many, w) and torch.equal(kernels.linear(many, w), F.linear(many, w))
    x16, w16 = torch.randn(3, 40, dtype=torch.bfloat16), w.bfloat16()
    assert not cpu_linear.fits(x16, w16) and torch.equal(kernels.linear(x16, w16), F.linear(x16, w16))
    strided_w = torch.randn(40, 24).t()  # an input-major weight
    assert not cpu_linear.fits(torch.randn(3, 40), strided_w)
    empty = torch.randn(0, 40)
    assert not cpu_linear.fits(empty, w) and kernels.linear(empty, w).shape == (0, 24)


def test_autograd_goes_to_f_linear():
    lin = Linear(40, 24)
    x = torch.randn(3, 40)
    assert not cpu_linear.fits(x, lin.weight)  # the weight is a parameter that requires grad
    lin(x).sum().backward()
    assert lin.weight.grad is not None
    with torch.inference_mode():
        assert cpu_linear.fits(x, lin.weight)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PAGED_BACKEND_CPU_LINEAR", "0")
    assert cpu_linear._build() is False


def test_the_project_linears_keep_their_layout_for_the_kernel():
    """Input-major storage (MKL's faster small-M layout) is only for plain nn.Linear modules (transformers'
    own); the project's Linear keeps [out, in] row-major, which the kernel reads."""
    model = torch.nn.Sequential(Linear(40, 24), MergedLinear(40, {"a": 8, "b": 16}), torch.nn.Linear(40, 24))
    assert use_input_major_weights(model) == 1
    assert model[0].weight.is_contiguous() and model[1].weight.is_contiguous()
    assert not model[2].weight.is_contiguous() and model[2].weight.t().is_contiguous()

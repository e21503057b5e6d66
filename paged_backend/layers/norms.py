"""RMSNorm variants, numerically identical to transformers' so fp32 greedy decoding matches exactly.

The arithmetic lives in `kernels.rms_norm` (one Triton kernel on CUDA, its torch twin on CPU), which
can also fold the residual add that precedes a norm into the same pass: `norm(x, residual)` returns
`(norm(x + residual), x + residual)`.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_backend import kernels
from paged_backend.layers.quant import Fp8Rows


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalise in fp32, cast back to the input dtype, then scale by `weight`.

    The cast happens *before* the weight multiply (as in HF's LlamaRMSNorm), which matters in bf16.
    """

    gemma = False
    fp8_output = False  # its output comes as Fp8Rows (its one reader is an fp8 linear: layers.quant.fuse_fp8_inputs)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if not self.gemma else torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        out = kernels.rms_norm(x, self.weight, self.eps, residual, gemma=self.gemma, fp8_out=self.fp8_output)
        if not self.fp8_output:
            return out
        return Fp8Rows(*out, x.dtype) if residual is None else (Fp8Rows(*out[0], x.dtype), out[1])

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma-style RMSNorm: the whole computation, including the (1 + weight) scale, runs in fp32.

    Checkpoints store `weight` as an offset from 1 (zero-initialised).
    """

    gemma = True

"""Gated activations over a fused gate/up projection: [..., 2*I] -> [..., I] (`kernels.gated_activation`:
one Triton kernel on CUDA, the torch twin on CPU)."""

from __future__ import annotations

import torch
from torch import nn

from paged_backend import kernels
from paged_backend.layers.quant import Fp8Rows


class _Gated(nn.Module):
    kind = "silu"
    fp8_output = False  # its output comes as Fp8Rows (its one reader is an fp8 linear: layers.quant.fuse_fp8_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor | Fp8Rows:
        if self.fp8_output:
            return Fp8Rows(*kernels.gated_activation(x, self.kind, fp8_out=True), x.dtype)
        return kernels.gated_activation(x, self.kind)


class SiluAndMul(_Gated):
    """silu(gate) * up, where the input is cat(gate, up) along the last dim (Llama family)."""


class GeluAndMul(_Gated):
    """gelu(gate) * up (GeGLU); approximate="tanh" for Gemma."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.kind = "gelu_tanh" if approximate == "tanh" else "gelu"

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


_GATED = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu": GeluAndMul,
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
    "gelu_tanh": lambda: GeluAndMul("tanh"),
}


def gated_activation(name: str) -> nn.Module:
    """The gated module for an HF activation name (config.hidden_act / hidden_activation)."""
    try:
        return _GATED[name]()
    except KeyError:
        raise NotImplementedError(
            f"activation {name!r} is not supported by the native models (supported: {sorted(_GATED)})"
        ) from None

"""Gated activations over a fused gate/up projection: [..., 2*I] -> [..., I] (`kernels.gated_activation`:
one Triton kernel on CUDA, the torch twin on CPU)."""

from __future__ import annotations

import torch
from torch import nn

from paged_backend import kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is cat(gate, up) along the last dim (Llama family)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.gated_activation(x, "silu")


class GeluAndMul(nn.Module):
    """gelu(gate) * up (GeGLU); approximate="tanh" for Gemma."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.gated_activation(x, "gelu_tanh" if self.approximate == "tanh" else "gelu")

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

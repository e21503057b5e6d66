"""Rotary position embeddings (neox style, as transformers applies them), from the per-token `positions`.

cos/sin are computed per step from the positions rather than looked up in a table: it is the same
arithmetic transformers does (positions.float() * inv_freq, then cos/sin in fp32), so the values are
bit-identical, and a table up to max_position_embeddings would cost up to hundreds of MB for Gemma 3
(head_dim 256, 128k positions, two rope bases). The model computes them once per forward and every
layer reuses them.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_backend import kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The RoPE parameters of `config` (for `layer_type` when they differ per layer type), as a flat dict
    with at least `rope_type` and `rope_theta`.

    Works with transformers 5 (`config.rope_parameters`, possibly nested by layer type) and 4.x
    (`rope_theta` + `rope_scaling`, and Gemma 3's `rope_local_base_freq` for its sliding layers).
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        elif any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"rope_parameters are per layer type ({list(params)}); name one, got {layer_type!r}")
        params = dict(params)
    else:  # transformers 4.x
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        if layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
            params = {"rope_theta": config.rope_local_base_freq}  # Gemma 3: local layers are never scaled
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def _nested(config) -> bool:
    params = getattr(config, "rope_parameters", None)
    return isinstance(params, dict) and any(isinstance(v, dict) for v in params.values())


def compute_inv_freq(config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32, attention_scaling) exactly as transformers initialises them."""
    params = rope_parameters(config, layer_type)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {rope_type!r} is not supported by the native models (supported: {SUPPORTED_ROPE_TYPES})"
        )
    if rope_type == "default":
        base = float(params["rope_theta"])
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        return 1.0 / (base**exponents), 1.0
    # Scaled variants: transformers' own init functions are the definition, so use them for exactness.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init_fn = ROPE_INIT_FUNCTIONS[rope_type]
    if _nested(config):
        inv_freq, scaling = init_fn(config, None, layer_type=layer_type)
    else:
        inv_freq, scaling = init_fn(config, None)
    return inv_freq.to(torch.float32), float(scaling)


class RotaryEmbedding(nn.Module):
    """cos/sin for a set of positions (`forward`, once per model forward) and the rotation of q/k
    heads with them (`rotate`, in every layer)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        # Kept out of the module's buffers on purpose: model.to(bfloat16) must not round inv_freq.
        self._inv_freq = {inv_freq.device: inv_freq.to(torch.float32)}
        self.attention_scaling = attention_scaling

    @classmethod
    def from_config(cls, config, head_dim: int, layer_type: str | None = None) -> "RotaryEmbedding":
        return cls(*compute_inv_freq(config, head_dim, layer_type))

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = next(iter(self._inv_freq.values())).to(device)
        return self._inv_freq[device]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, head_dim/2] fp32."""
        freqs = positions[:, None].float() * self.inv_freq(positions.device)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin

    @staticmethod
    def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, H, head_dim] rotated by rope = forward(positions); a new contiguous tensor."""
        cos, sin = rope
        return kernels.rotary(x, cos, sin)

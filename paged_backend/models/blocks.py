"""Building blocks shared by the native model families: self-attention over the paged cache and the gated MLP."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from paged_backend.layers.activations import gated_activation
from paged_backend.layers.attention import Attention, AttentionMetadata
from paged_backend.layers.linear import MergedLinear
from paged_backend.layers.rotary import RotaryEmbedding


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def layer_types_of(config) -> list[str]:
    """ "full_attention" / "sliding_attention" for each layer, as transformers decides them."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    # Configs without layer_types (Mistral, older transformers): a set sliding_window applies everywhere,
    # unless the config switches it off (Qwen2/3's use_sliding_window).
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


class SelfAttention(nn.Module):
    """Fused QKV projection, optional per-head q/k norm, rotary, paged attention, output projection."""

    def __init__(
        self,
        config,
        *,
        scale: float,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: Callable[[int, float], nn.Module] | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads_of(config)
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(hidden, {"q": q_size, "k": kv_size, "v": kv_size}, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, hidden, bias=o_bias)
        if qk_norm is not None:
            self.q_norm = qk_norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = qk_norm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window=sliding_window, softcap=softcap
        )

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = RotaryEmbedding.rotate(q, rope), RotaryEmbedding.rotate(k, rope)
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v.contiguous(), meta)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = gated_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))

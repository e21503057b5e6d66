"""Building blocks shared by the native model families: self-attention over the paged cache and the gated MLP."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from paged_backend.layers.activations import gated_activation
from paged_backend.layers.attention import Attention, AttentionMetadata
from paged_backend.layers.parallel import (
    SINGLE,
    MergedColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    even_slices,
    qkv_slices,
)
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
    """Fused QKV projection, optional per-head q/k norm, rotary, paged attention, output projection.
    Under tensor parallelism this rank holds its query heads and their KV heads (column-parallel
    QKV) and o_proj's matching input columns (row-parallel, one all-reduce)."""

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
        tp: TPGroup = SINGLE,
    ):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = head_dim_of(config)
        slices = qkv_slices(tp, config.num_attention_heads, num_kv_heads_of(config), self.head_dim)
        self.num_heads = slices["q"][1] // self.head_dim  # this rank's heads
        self.num_kv_heads = slices["k"][1] // self.head_dim
        self.qkv_proj = MergedColumnParallelLinear(hidden, slices, bias=qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, hidden, bias=o_bias, tp=tp)
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
        t, nq, nkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (nq + 2 nkv) * d]: this rank's q, k and v heads side by side
        if self.q_norm is None:  # q and k heads are adjacent: one rotation for both (views, no copies)
            qk = RotaryEmbedding.rotate(qkv[:, : (nq + nkv) * d].view(t, nq + nkv, d), rope)
            q, k = qk[:, :nq], qk[:, nq:]
        else:
            q, k, _ = self.qkv_proj.split(qkv)
            q = RotaryEmbedding.rotate(self.q_norm(q.reshape(t, nq, d)), rope)
            k = RotaryEmbedding.rotate(self.k_norm(k.reshape(t, nkv, d)), rope)
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), qkv[:, (nq + nkv) * d :], meta)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one matmul (column-parallel under
    tensor parallelism; down_proj row-parallel)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False, tp: TPGroup = SINGLE
    ):
        super().__init__()
        slices = even_slices(tp, {"gate": intermediate_size, "up": intermediate_size}, "intermediate_size")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, slices, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)
        self.act_fn = gated_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))

    def fp8_feeds(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.act_fn, self.down_proj)]  # (layers.quant.fuse_fp8_inputs)

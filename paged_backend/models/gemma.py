"""The Gemma family natively: Gemma 1, Gemma 2 and Gemma 3 (text).

All three: GeGLU with the tanh GELU, RMSNorm scaling by (1 + w) in fp32, embeddings multiplied by
sqrt(hidden_size) (rounded to the model dtype first, as transformers does), tied lm_head.
Gemma 2 adds attention and final-logit soft-capping, alternating sliding-window layers, norms after
attention and around the MLP, and query_pre_attn_scalar for the attention scale. Gemma 3 drops the
soft-capping (configs may still set it), adds per-head q/k norm, a 5 local : 1 global layer pattern
(`config.layer_types`) where local layers have their own rope base and only global layers are
rope-scaled.
"""

from __future__ import annotations

import torch
from torch import nn

from paged_backend.layers.attention import AttentionMetadata
from paged_backend.layers.norms import GemmaRMSNorm
from paged_backend.layers.parallel import SINGLE, ParallelLMHead, TPGroup, VocabParallelEmbedding
from paged_backend.layers.rotary import RotaryEmbedding
from paged_backend.models.base import CausalLM, sliding_window_for
from paged_backend.models.blocks import GatedMLP, SelfAttention, head_dim_of, layer_types_of


def _activation(config) -> str:
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    # Gemma 1 configs say "gelu" but the models were trained with the tanh approximation
    # (transformers rewrites it the same way).
    return "gelu_pytorch_tanh" if act == "gelu" else act


def _generation(config) -> int:
    return {"gemma": 1, "gemma2": 2}.get(config.model_type, 3)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str, tp: TPGroup = SINGLE):
        super().__init__()
        gen = _generation(config)
        pre_attn_scalar = getattr(config, "query_pre_attn_scalar", None) if gen >= 2 else None
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = SelfAttention(
            config,
            scale=(pre_attn_scalar or head_dim_of(config)) ** -0.5,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=GemmaRMSNorm if gen >= 3 else None,
            sliding_window=sliding_window_for(config, layer_type),
            softcap=getattr(config, "attn_logit_softcapping", None),
            tp=tp,
        )
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, _activation(config), tp=tp)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        # Gemma 2/3 "sandwich" norms: the attention output is normalised before the residual add
        # (post_attention_layernorm), the MLP has a norm on each side.
        self.sandwich = gen >= 2
        if self.sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.layer_type = layer_type

    def forward(self, hidden: torch.Tensor, rope, meta: AttentionMetadata) -> torch.Tensor:
        residual = hidden
        hidden = self.self_attn(self.input_layernorm(hidden), rope, meta)
        if not self.sandwich:  # Gemma 1: Llama's layout
            hidden = residual + hidden
            return hidden + self.mlp(self.post_attention_layernorm(hidden))
        hidden = residual + self.post_attention_layernorm(hidden)
        residual = hidden
        hidden = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        return residual + hidden

    def fp8_feeds(self) -> list[tuple[nn.Module, nn.Module]]:
        """The norms whose one reader is a linear (layers.quant.fuse_fp8_inputs); Gemma 2/3's post-attention
        norm feeds the residual add instead."""
        before_mlp = self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm
        return [(self.input_layernorm, self.self_attn.qkv_proj), (before_mlp, self.mlp.gate_up_proj)]


class GemmaModel(nn.Module):
    def __init__(self, config, tp: TPGroup = SINGLE):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.embed_scale = config.hidden_size**0.5
        layer_types = layer_types_of(config)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, t, tp) for t in layer_types)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        # One rotary per layer type: Gemma 3's local and global layers use different bases/scaling.
        self.rotary_emb = nn.ModuleDict(
            {t: RotaryEmbedding.from_config(config, head_dim_of(config), t) for t in sorted(set(layer_types))}
        )

    def _embed_scale_in(self, dtype: torch.dtype) -> float:
        """sqrt(hidden) rounded to the model dtype first (55.43 -> 55.5 in bf16), as transformers does.
        A Python float, so the multiply allocates nothing on the device (CUDA-graph safe)."""
        return float(torch.tensor(self.embed_scale, dtype=dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        hidden = hidden * self._embed_scale_in(hidden.dtype)
        ropes = {t: rotary(positions) for t, rotary in self.rotary_emb.items()}
        for layer in self.layers:
            hidden = layer(hidden, ropes[layer.layer_type], meta)
        return self.norm(hidden)


class GemmaForCausalLM(CausalLM):
    """Gemma 1/2/3 (text); config.model_type ("gemma", "gemma2", "gemma3_text") selects the variations."""

    def __init__(self, config, tp: TPGroup = SINGLE):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config, tp)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp)
        if getattr(config, "tie_word_embeddings", True):
            self.tie_embeddings()
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions [T] (one varlen batch) -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        cap = self.final_logit_softcapping
        if not cap:
            return super().compute_logits(hidden)
        # Gemma 2: cap * tanh(logits / cap), in fp32 (elementwise: each rank caps its vocab range)
        logits = self.lm_head(hidden).float()
        return self.lm_head.gather(torch.tanh(logits / cap) * cap)


Gemma2ForCausalLM = GemmaForCausalLM
Gemma3ForCausalLM = GemmaForCausalLM

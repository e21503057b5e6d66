"""The Llama family natively: Llama 2/3 (incl. llama3 rope scaling), Mistral (sliding window),
Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm) and SmolLM2 (a Llama)."""

from __future__ import annotations

import torch
from torch import nn

from paged_backend.layers.attention import AttentionMetadata
from paged_backend.layers.norms import RMSNorm
from paged_backend.layers.parallel import SINGLE, ParallelLMHead, TPGroup, VocabParallelEmbedding
from paged_backend.layers.rotary import RotaryEmbedding
from paged_backend.models.base import CausalLM, sliding_window_for
from paged_backend.models.blocks import GatedMLP, SelfAttention, head_dim_of, layer_types_of


def _biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias). Qwen2 always has q/k/v bias and never an o_proj bias; the others
    follow config.attention_bias for all four projections."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str, tp: TPGroup = SINGLE):
        super().__init__()
        qkv_bias, o_bias = _biases(config)
        self.self_attn = SelfAttention(
            config,
            scale=head_dim_of(config) ** -0.5,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=RMSNorm if config.model_type == "qwen3" else None,
            sliding_window=sliding_window_for(config, layer_type),
            tp=tp,
        )
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            bias=bool(getattr(config, "mlp_bias", False)),
            tp=tp,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope, meta: AttentionMetadata):
        """(hidden, residual) -> (hidden, residual): each residual add is folded into the norm after it
        (the last one into the model's final norm)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def fp8_feeds(self) -> list[tuple[nn.Module, nn.Module]]:
        """Each norm's one reader (layers.quant.fuse_fp8_inputs)."""
        return [(self.input_layernorm, self.self_attn.qkv_proj), (self.post_attention_layernorm, self.mlp.gate_up_proj)]


class LlamaModel(nn.Module):
    def __init__(self, config, tp: TPGroup = SINGLE):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, t, tp) for t in layer_types_of(config))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding.from_config(config, head_dim_of(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope, meta)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(CausalLM):
    """Llama / Mistral / Qwen2 / Qwen3 / SmolLM2; the config's model_type selects the variations."""

    def __init__(self, config, tp: TPGroup = SINGLE):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, tp)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp)
        if getattr(config, "tie_word_embeddings", False):
            self.tie_embeddings()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions [T] (one varlen batch) -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)


# transformers' architecture names for the same code.
MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM
Qwen3ForCausalLM = LlamaForCausalLM

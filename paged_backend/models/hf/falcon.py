"""Falcon's attention: the one architecture of the matrix whose transformers code computes attention
inline instead of calling through `AttentionInterface`. Its projection, head split, rotary and output
projection stay transformers' own; only the attention itself is routed to the paged function.
"""

from __future__ import annotations

import torch

from paged_backend.models.hf.attention import paged_attention_forward


def falcon_attention_forward(module, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                             use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    """FalconAttention.forward's signature; bound to each attention module for the engine's forward."""
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    b, t, _ = hidden_states.shape
    query, key, value = module._split_heads(module.query_key_value(hidden_states))  # [B, T, H, D]
    if module.new_decoder_architecture:
        # transformers broadcasts each KV head over its query group; the cache keeps one copy (GQA).
        group = module.num_heads // module.num_kv_heads
        key, value = key[:, :, ::group], value[:, :, ::group]
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    out, _ = paged_attention_forward(module, query, key, value, None, scaling=module.inv_norm_factor)
    return module.dense(out.reshape(b, t, -1)), None


def attention_overrides(model: torch.nn.Module) -> dict[torch.nn.Module, object]:
    """The modules whose forward the engine replaces while it runs (no lasting change to the model)."""
    from transformers.models.falcon.modeling_falcon import FalconAttention

    return {m: falcon_attention_forward for m in model.modules() if isinstance(m, FalconAttention)}


def check(config) -> None:
    if getattr(config, "model_type", None) == "falcon" and getattr(config, "alibi", False):
        raise NotImplementedError("this Falcon uses ALiBi position biases, which the paged kernel does not have")

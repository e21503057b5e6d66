"""The architecture matrix of the transformers path: a tiny random model of each architecture
(transformers config + from_config + save_pretrained, fp32) and the check that the engine's greedy
token ids equal transformers' `generate` on the same weights, with prefix-cache hits, chunked
prefill and forced preemption all happening. The tests run it; `python -m paged_backend.models.table`
runs it to write docs/models.md.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 49152  # SmolLM2's tokenizer, which every tiny model is saved with
MAX_NEW = 24
BLOCK = 16
NUM_BLOCKS = 12  # for 6 prompts of up to 135 tokens: the scheduler must preempt
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_DENSE = dict(_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512)
_GQA = dict(_DENSE, num_key_value_heads=2)
_GPT = dict(_COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=512)

# architecture -> (transformers config class name, its arguments, what the tiny model exercises)
MATRIX: dict[str, tuple[str, dict, str]] = {
    "Phi3ForCausalLM": ("Phi3Config", dict(_GQA, sliding_window=24, pad_token_id=0), "GQA, sliding window"),
    "GPT2LMHeadModel": ("GPT2Config", _GPT, "learned absolute positions"),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict(_DENSE, rotary_pct=0.25), "partial rotary, parallel residual"),
    "FalconForCausalLM": ("FalconConfig", dict(_DENSE, num_kv_heads=2, new_decoder_architecture=True),
                          "attention written inline (routed by paged_backend), GQA"),
    "Olmo2ForCausalLM": ("Olmo2Config", _GQA, "q/k norm over all heads"),
    "StableLmForCausalLM": ("StableLmConfig", dict(_GQA, partial_rotary_factor=0.25, qk_layernorm=True,
                                                   use_qkv_bias=True), "partial rotary, per-head q/k norm"),
    "GraniteForCausalLM": ("GraniteConfig", dict(_GQA, embedding_multiplier=2.0, residual_multiplier=0.5,
                                                 attention_multiplier=0.3, logits_scaling=4.0),
                           "attention scale, logits scaling"),
    "CohereForCausalLM": ("CohereConfig", dict(_GQA, logit_scale=0.5), "parallel block, logit scale"),
    "Starcoder2ForCausalLM": ("Starcoder2Config", dict(_GQA, sliding_window=24), "sliding window, biases"),
    "MixtralForCausalLM": ("MixtralConfig", dict(_GQA, intermediate_size=96, num_local_experts=4,
                                                 num_experts_per_tok=2, sliding_window=24), "MoE, sliding window"),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(_GQA, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                                                   num_experts=4, num_experts_per_tok=2, use_sliding_window=True,
                                                   sliding_window=24, max_window_layers=1),
                            "MoE with shared expert, window set by the mask only"),
    "PhiForCausalLM": ("PhiConfig", dict(_DENSE, partial_rotary_factor=0.5), "partial rotary, parallel block"),
    "OPTForCausalLM": ("OPTConfig", dict(_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         ffn_dim=128, max_position_embeddings=512, word_embed_proj_dim=64),
                       "learned positions with an offset"),
    "GPTBigCodeForCausalLM": ("GPTBigCodeConfig", dict(_GPT, multi_query=True), "multi-query attention (MQA)"),
    "GPTJForCausalLM": ("GPTJConfig", dict(_GPT, rotary_dim=8), "interleaved partial rotary"),
    "OlmoeForCausalLM": ("OlmoeConfig", dict(_GQA, intermediate_size=32, num_experts=4, num_experts_per_tok=2),
                         "MoE"),
    "Cohere2ForCausalLM": ("Cohere2Config", dict(_GQA, num_hidden_layers=4, sliding_window=12),
                           "3 sliding : 1 global layers"),
    "Gemma4ForCausalLM": ("Gemma4TextConfig", dict(_GQA, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                                                   sliding_window=12, hidden_size_per_layer_input=8,
                                                   vocab_size_per_layer_input=VOCAB,
                                                   layer_types=["sliding_attention", "full_attention"]),
                          "per-layer head size and KV heads (16/2 sliding, 32/1 global)"),
}


def tiny_config(arch: str):
    import transformers

    cls_name, kwargs, _ = MATRIX[arch]
    return getattr(transformers, cls_name)(**kwargs)


def save_tiny_model(arch: str, path: Path, tokenizer) -> Path:
    """A tiny random model of arch with weights spread enough that greedy argmaxes are not near-ties."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prompts(seed: int) -> list[list[int]]:
    """Six prompts, three of them sharing a 40-token prefix (prefix-cache hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, VOCAB) for _ in range(40)]
    out = []
    for i, n in enumerate([1, 7, 17, 33, 60, 95]):
        body = [rng.randrange(3, VOCAB) for _ in range(n)]
        out.append(shared[: 20 + i] + body if i % 2 else body)
    return out


def transformers_greedy(model, prompt_ids: list[list[int]], max_new_tokens: int = MAX_NEW) -> list[list[int]]:
    """The reference: transformers `generate`, one prompt at a time (no padding effects)."""
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=model.device)
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
            outs.append(y[0, len(ids):].tolist())
    return outs


@dataclass
class Verdict:
    arch: str
    identical: bool
    prompts: int
    prefix_cache_hit_tokens: int
    preemptions: int
    chunked: bool
    mismatches: list[int]


def verify(arch: str, model_dir: Path, model_impl: str = "auto") -> Verdict:
    """Engine vs transformers greedy on model_dir: twice (the second round on a warm prefix cache),
    with a KV cache of NUM_BLOCKS blocks (preemption) and a 24-token step budget (chunked prefill)."""
    import transformers

    from paged_backend import LLM, SamplingParams
    from paged_backend.models.hf.build import wrap

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    layers, kv_heads, head_dim = wrap(reference).kv_cache_shape_info()
    ps = prompts(sum(map(ord, arch)))
    expected = transformers_greedy(reference, ps)
    block_bytes = layers * 2 * BLOCK * kv_heads * head_dim * 4
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    mismatches: list[int] = []
    with LLM(str(model_dir), dtype="float32", device="cpu", model_impl=model_impl, block_size=BLOCK,
             kv_cache_memory=NUM_BLOCKS * block_bytes, max_model_len=NUM_BLOCKS * BLOCK,
             max_num_batched_tokens=24) as llm:
        for _ in range(2):
            outs = llm.generate(ps, params, use_tqdm=False)
            mismatches += [i for i, (o, e) in enumerate(zip(outs, expected)) if o.outputs[0].token_ids != e]
        stats = llm.stats()
    return Verdict(arch, not mismatches, len(ps), stats.prefix_cache_hit_tokens, stats.num_preemptions,
                   stats.num_steps > 2 * MAX_NEW + 8, sorted(set(mismatches)))

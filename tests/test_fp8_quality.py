"""Quality of the FP8 paths on real models: fp8 weights (quantization="fp8"), an fp8 KV cache, both.

Yardstick (issue 19): the unquantized engine's greedy continuation of 20 chat prompts, 24 tokens each,
is fed back teacher-forced to every variant, and at each of the 480 positions the variant's argmax is
compared with the unquantized one; plus the relative L2 error of the logits there. Free-running greedy
text is not the measure: small models sit near ties and diverge early even between bf16 and fp32.

Teacher forcing is one varlen prefill pass per variant straight through the model (all 20 sequences in
one batch, logits read at the 24 positions of each): the engine has no prompt logprobs, and growing
prefixes through the engine would cost 24 passes per variant. The variants are copies of the engine's
own model, converted the way the engine converts them (`quantize_linears_fp8`, an fp8 cache through the
same kernels), so the arithmetic measured is the engine's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from paged_backend import LLM, SamplingParams
from paged_backend.layers.attention import AttentionMetadata
from paged_backend.layers.quant import quantize_linears_fp8

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "List three prime numbers.", "How do I boil an egg?", "What is 12 times 7?", "Name a famous painter.",
    "Why is the sky blue?", "Give me a synonym for happy.", "Translate 'good morning' to Spanish.",
    "What does a CPU do?", "Describe a cat in one sentence.", "Who wrote Hamlet?",
    "What is the boiling point of water?", "Suggest a name for a dog.", "What is machine learning?",
    "How many days are in a leap year?", "Tell me a fun fact about space.", "What is a noun?",
    "Recommend a book for children.",
]
POSITIONS = 24


def greedy_continuations(llm: LLM, prompts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the unquantized engine's 24 greedy tokens) for each chat prompt."""
    params = SamplingParams(temperature=0.0, max_tokens=POSITIONS, ignore_eos=True)
    tok = llm.get_tokenizer()
    if getattr(tok, "chat_template", None):
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]


@torch.inference_mode()
def teacher_forced_logits(model, seqs, kv_dtype: torch.dtype, block_size: int = 16) -> torch.Tensor:
    """One prefill of every prompt + continuation; logits [20 * 24, vocab] predicting each continuation token."""
    ids, positions, slots, qsl, rows, tables = [], [], [], [0], [], []
    next_block = 0
    for prompt, cont in seqs:
        full = prompt + cont
        n = len(full)
        nb = -(-n // block_size)
        blocks = list(range(next_block, next_block + nb))
        next_block += nb
        start = len(ids)
        ids += full
        positions += range(n)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(n)]
        qsl.append(len(ids))
        rows += range(start + len(prompt) - 1, start + n - 1)
        tables.append(blocks)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor([len(p) + len(c) for p, c in seqs], dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        max_query_len=max(len(p) + len(c) for p, c in seqs),
        max_seq_len=max(len(p) + len(c) for p, c in seqs),
    )
    layers = model.attention_layers()
    shape = (next_block, 2, block_size, layers[0].num_kv_heads, layers[0].head_dim)
    for attn in layers:
        attn.kv_cache = torch.empty(shape, dtype=kv_dtype)
    try:
        hidden = model(torch.tensor(ids), torch.tensor(positions), meta)
        return model.compute_logits(hidden[torch.tensor(rows)]).float()
    finally:
        for attn in layers:
            attn.kv_cache = None


def variants(model):
    """(name, model, KV-cache dtype) one at a time (copies of the engine's model, so at most two are alive):
    the unquantized model, plain bf16, and the fp8 paths."""
    plain = copy.deepcopy(model)
    yield "fp32", plain, torch.float32
    yield "fp8 KV", plain, torch.float8_e4m3fn
    del plain
    yield "bf16", copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16
    fp8 = copy.deepcopy(model)
    quantize_linears_fp8(fp8)
    yield "fp8 weights", fp8, torch.float32
    yield "fp8 weights + fp8 KV", fp8, torch.float8_e4m3fn


def measure(llm: LLM, prompts: list[str] = PROMPTS) -> dict[str, tuple[float, float]]:
    """name -> (argmax agreement with fp32 over the 24 positions of each prompt, relative L2 error of the logits)."""
    seqs = greedy_continuations(llm, prompts)
    model = llm.engine.runner.model
    ref = None
    figures = {}
    for name, m, kv_dtype in variants(model):
        logits = teacher_forced_logits(m, seqs, kv_dtype)
        if ref is None:
            ref = logits
            # Sanity: the unquantized teacher-forced argmax is the engine's own greedy choice.
            cont = torch.tensor([t for _, c in seqs for t in c])
            assert (ref.argmax(-1) == cont).float().mean() >= 0.99
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        err = ((logits - ref).norm() / ref.norm()).item()
        figures[name] = (agree, err)
    print("\n" + "\n".join(f"  {n:22s} agreement {a:6.1%}  logits rel. error {e:.4f}" for n, (a, e) in figures.items()))
    return figures


def check(figures, bounds: dict[str, tuple[float, float]]):
    """bounds: name -> (least argmax agreement with fp32, largest relative L2 error of the logits). An
    agreement at least plain bf16's passes whatever its bound."""
    bf16_agree = figures["bf16"][0]
    for name, (min_agree, max_err) in bounds.items():
        agree, err = figures[name]
        assert agree >= min_agree or agree >= bf16_agree, f"{name}: agreement {agree:.1%} (bf16: {bf16_agree:.1%})"
        assert err < max_err, f"{name}: logits relative error {err:.4f}"


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_fp8_quality_tiny(tiny_model_dir, kind):
    """Random tiny models: their logits are near-ties everywhere (bf16 itself agrees on only ~96 %), so the
    argmax floor is loose; the logits' error is the real check here. 8 of the prompts (CI time)."""
    llm = LLM(model=str(tiny_model_dir(kind)), max_model_len=256, kv_cache_memory=16 << 20)
    check(measure(llm, PROMPTS[:8]), {"fp8 weights": (0.65, 0.15), "fp8 KV": (0.85, 0.07), "fp8 weights + fp8 KV": (0.65, 0.16)})


# Measured on the CPU (fp32 reference, 480 positions), agreement / logits relative error:
#   SmolLM2-135M:  bf16 98.3 % / 0.022, fp8 KV 94.0 % / 0.062, fp8 weights 89.6 % / 0.127, both 88.1 % / 0.135
#   gemma-3-270m:  bf16 97.9 % / 0.022, fp8 KV 97.7 % / 0.043, fp8 weights 96.0 % / 0.137, both 95.4 % / 0.142
# gemma-3-270m meets the 95 % yardstick on every fp8 path; SmolLM2-135M does not: e4m3 keeps 3 mantissa
# bits (2.6 % RMS error per element, measured on SmolLM2's K/V whatever the KV scale), and its weights and
# activations each take about half of the fp8-weights loss (92.5 % weights only, 92.9 % activations only).
# The bounds pin the measured quality (less a margin for thread-count-dependent near-ties).
BUNDLED_BOUNDS = {
    "smollm2-135m-instruct": {"fp8 weights": (0.87, 0.15), "fp8 KV": (0.92, 0.08), "fp8 weights + fp8 KV": (0.85, 0.16)},
    "gemma-3-270m": {"fp8 weights": (0.95, 0.16), "fp8 KV": (0.96, 0.06), "fp8 weights + fp8 KV": (0.94, 0.17)},
}


@pytest.mark.slow
@pytest.mark.parametrize("alias", sorted(BUNDLED_BOUNDS))
def test_fp8_quality_bundled(alias, bundled_llm):
    check(measure(bundled_llm(alias)), BUNDLED_BOUNDS[alias])


def test_fp8_engine_end_to_end(tiny_model_dir):
    """The flags through LLM: fp8 weights and cache in place, greedy output close to fp32, stats report bytes."""
    base = LLM(model=str(tiny_model_dir("llama")), max_model_len=256, kv_cache_memory=16 << 20)
    fp8 = LLM(model=str(tiny_model_dir("llama")), max_model_len=256, kv_cache_memory=16 << 20,
              quantization="fp8", kv_cache_dtype="fp8")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    a = base.generate(["Hello there", "One two three"], params, use_tqdm=False)
    b = fp8.generate(["Hello there", "One two three"], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in b)
    assert sum(x.outputs[0].token_ids[0] == y.outputs[0].token_ids[0] for x, y in zip(a, b)) >= 1
    s0, s1 = base.stats(), fp8.stats()
    assert (s0.quantization, s0.kv_cache_dtype) == (None, "float32")
    assert (s1.quantization, s1.kv_cache_dtype) == ("fp8", "float8_e4m3fn")
    assert s1.kv_bytes_per_token * 4 == s0.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers, K+V, Hkv, D, fp32
    assert s1.weight_bytes < s0.weight_bytes
    model = fp8.engine.runner.model
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert model.lm_head.weight.dtype == torch.float32  # the LM head stays unquantized
    assert fp8.engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_fp8_norms_and_activations_quantize_for_their_linear(tiny_model_dir, kind, monkeypatch):
    """quantization="fp8": each norm or gated activation whose one reader is an fp8 linear hands it fp8 rows
    (one kernel pass instead of two); the logprobs are exactly those of the unfused path."""
    import paged_backend.runtime.shard as shard
    from paged_backend.layers.quant import Fp8Rows

    kw = dict(max_model_len=256, kv_cache_memory=16 << 20, quantization="fp8")
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True)
    with LLM(model=str(tiny_model_dir(kind)), **kw) as llm:
        layer = llm.engine.runner.model.model.layers[0]
        feeds = layer.fp8_feeds() + layer.mlp.fp8_feeds()
        assert len(feeds) == 3 and all(producer.fp8_output for producer, _ in feeds)
        assert isinstance(layer.mlp.act_fn(torch.randn(3, 2 * layer.mlp.down_proj.in_features)), Fp8Rows)
        fused = [o.outputs[0].logprobs for o in llm.generate(["Hello there", "One two three"], params, use_tqdm=False)]
    monkeypatch.setattr(shard, "fuse_fp8_inputs", lambda model: 0)
    with LLM(model=str(tiny_model_dir(kind)), **kw) as llm:
        assert not any(getattr(m, "fp8_output", False) for m in llm.engine.runner.model.modules())
        plain = [o.outputs[0].logprobs for o in llm.generate(["Hello there", "One two three"], params, use_tqdm=False)]
    assert fused == plain

"""Greedy token ids identical to transformers `generate` (fp32, CPU) on the same weights, through
every scheduling path: prefix caching on and off, forced preemption, forced chunked prefill."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import hf_greedy, reference_model
from paged_backend import LLM, SamplingParams

MAX_NEW = 32


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 7, 16, 17, 33, 60, 95]
    shared = [rng.randrange(3, vocab) for _ in range(40)]  # a common prefix for prefix-cache hits
    prompts = []
    for i, n in enumerate(lengths):
        body = [rng.randrange(3, vocab) for _ in range(n)]
        prompts.append(shared[: 20 + i] + body if i % 2 else body)
    return prompts


MODES = {
    "prefix-cache": dict(enable_prefix_caching=True),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    # 12 blocks of 16 tokens for 8 prompts of up to 150 tokens: the scheduler must preempt
    "preemption": dict(enable_prefix_caching=True, kv_cache_memory=None, _blocks=12, _pipelined=True),
    "chunked-prefill": dict(enable_prefix_caching=False, max_num_batched_tokens=24, _pipelined=True),
}
# _pipelined: steps overlap as on a GPU (the next one launches before this one's tokens are read back,
# pending tokens fed from the device), which the CPU's default skips: those modes keep it tested here.


def _llm(model_dir, mode: str) -> LLM:
    kw = dict(MODES[mode])
    blocks = kw.pop("_blocks", None)
    pipelined = kw.pop("_pipelined", False)
    if blocks is not None:
        # bytes for exactly `blocks` blocks: layers * 2 (K,V) * block_size * kv_heads * head_dim * 4 bytes
        from paged_backend.loader import resolve_model
        from paged_backend.models.registry import kv_cache_shape_info

        layers, hkv, d = kv_cache_shape_info(resolve_model(str(model_dir)).hf_config)
        kw["kv_cache_memory"] = blocks * layers * 2 * 16 * hkv * d * 4
        kw["max_model_len"] = 12 * 16
    llm = LLM(str(model_dir), dtype="float32", device="cpu", **kw)
    llm.engine.overlap_steps = pipelined
    return llm


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"])
def test_greedy_matches_transformers_in_every_mode(kind, tiny_model_dir):
    model_dir = tiny_model_dir(kind, sharded=(kind == "llama"))
    prompts = _prompts(49152, seed=sum(map(ord, kind)))
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    for mode in MODES:
        with _llm(model_dir, mode) as llm:
            # twice: the second round runs on a warm prefix cache where it is enabled
            for round_ in range(2):
                outs = llm.generate(prompts, params, use_tqdm=False)
                got = [o.outputs[0].token_ids for o in outs]
                for i, (g, e) in enumerate(zip(got, expected)):
                    assert g == e, f"{kind}/{mode}/round {round_}: prompt {i} (len {len(prompts[i])}) differs"
            stats = llm.stats()
            assert stats.num_blocks_used == 0, "blocks leaked after all requests finished"
            if mode == "preemption":
                assert stats.num_preemptions > 0, "the small cache did not force a preemption"
            if mode == "prefix-cache":
                assert stats.prefix_cache_hit_tokens > 0
            if mode == "chunked-prefill":
                assert stats.num_steps > MAX_NEW + 4  # long prompts took several steps each


def test_lone_prompt_longer_than_the_step_budget(tiny_model_dir):
    """A prompt over max_num_batched_tokens runs alone in chunks: the steps that complete no prompt
    sample nothing (they used to crash the step), and the tokens match transformers."""
    model_dir = tiny_model_dir("llama")
    prompt = _prompts(49152, seed=7)[-1] * 2  # 190 tokens, 12 chunks of 16
    expected = hf_greedy(model_dir, [prompt], 8)
    with LLM(str(model_dir), dtype="float32", device="cpu", max_num_batched_tokens=16) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected[0]
        assert llm.stats().num_steps >= 12 + 7 and llm.stats().num_blocks_used == 0


def test_smollm2_gguf_greedy_matches_transformers(bundled_llm):
    """The bundled SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized): our engine vs transformers on
    the same dequantized weights."""
    import torch

    from paged_backend.loader import resolve_model

    llm = bundled_llm("smollm2-135m-instruct")
    tok = llm.get_tokenizer()
    hf = reference_model(resolve_model("smollm2-135m-instruct"))
    texts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a land far away,",
        "1, 2, 3, 4,",
        "The three primary colors are",
        "Water boils at",
        "In machine learning, a transformer is",
        "Hello",
    ]
    prompts = [tok.encode(t) for t in texts]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False,
                            pad_token_id=tok.pad_token_id or 0, eos_token_id=None)
            expected.append(y[0, len(ids):].tolist())
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert o.outputs[0].token_ids[: len(e)] == e, f"prompt {texts[i]!r} differs"
        assert len(o.outputs[0].token_ids) == MAX_NEW


def test_gemma3_270m_greedy_matches_transformers(bundled_llm):
    """The bundled gemma-3-270m (Q4_K_M GGUF, dequantized): engine vs transformers on the same weights."""
    import torch

    from paged_backend.loader import resolve_model

    llm = bundled_llm("gemma-3-270m")
    tok = llm.get_tokenizer()
    hf = reference_model(resolve_model("gemma-3-270m"))
    texts = ["The capital of France is", "The largest planet in the solar system is", "def add(a, b):", "Roses are red,"]
    prompts = [tok.encode(t) for t in texts]
    n_new = 30
    expected = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
            expected.append(y[0, len(ids):].tolist())
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True), use_tqdm=False)
    for t, o, e in zip(texts, outs, expected):
        assert o.outputs[0].token_ids[: len(e)] == e, f"{t!r} differs"
        assert len(o.outputs[0].token_ids) == n_new


def test_warm_up_runs_prompt_steps_and_stores_nothing(tiny_model_dir):
    """ModelRunner.warm_up (run at start-up on CUDA to compile every attention launch configuration)
    works on any device, writes nothing into the KV cache and leaves generation unchanged."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    with LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", max_model_len=128,
             kv_cache_memory=1 << 22) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        runner = llm.engine.runner
        before = [c.view(torch.uint8).clone() for c in runner.kv_caches]
        runner.warm_up(64)
        assert all(torch.equal(c.view(torch.uint8), b) for c, b in zip(runner.kv_caches, before))
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected

"""The engine on CUDA (Triton kernels): greedy ids identical to transformers on the GPU in fp32.
Skipped without CUDA; run on the GPU machine with `python -m pytest -q tests/test_gpu_engine.py`."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import save_tiny_model
from paged_backend import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gpu_greedy_matches_transformers_fp32(kind, tmp_path):
    import transformers

    from paged_backend.bench import word_level_tokenizer

    model_dir = save_tiny_model(kind, tmp_path / kind, word_level_tokenizer(49152))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (1, 5, 16, 17, 40, 77, 130, 300)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    expected = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False, pad_token_id=0)
            expected.append(y[0, len(ids):].tolist())
    del hf
    for kw in (dict(), dict(enforce_eager=True, max_num_batched_tokens=64, enable_prefix_caching=False)):
        with LLM(str(model_dir), dtype="float32", device="cuda", gpu_memory_utilization=0.3, **kw) as llm:
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
            for i, (o, e) in enumerate(zip(outs, expected)):
                assert o.outputs[0].token_ids == e, f"{kind} {kw}: prompt {i} differs on the GPU"
            assert llm.stats().num_blocks_used == 0


def test_gpu_bf16_dummy_llama_runs(tmp_path):
    from paged_backend.bench import make_model_dir, workload_a

    model_dir = make_model_dir("tiny", tmp_path / "m")
    prompts = workload_a(16, 10, 200, 4096)
    with LLM(str(model_dir), load_format="dummy", dtype="bfloat16", gpu_memory_utilization=0.3) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 20 for o in outs)


def test_gpu_graph_steps_sample_like_eager_steps(tmp_path):
    """Decode steps from the CUDA graphs (LM head and greedy choice inside them; other sampling from the
    graphs' logits) give the tokens of eager steps: greedy, seeded random and mixed batches, logprobs."""
    from paged_backend.bench import word_level_tokenizer

    model_dir = save_tiny_model("llama", tmp_path / "m", word_level_tokenizer(49152))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (3, 9, 17, 40, 77, 130)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    params = [greedy if i % 2 else SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=20 + i,
                                                  ignore_eos=True) for i in range(len(prompts))]
    results = []
    for kw in (dict(), dict(enforce_eager=True)):
        with LLM(str(model_dir), dtype="float32", device="cuda", gpu_memory_utilization=0.3, **kw) as llm:
            assert (llm.engine.runner.graphs is None) == bool(kw)
            results.append([(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob)
                            for batch in ([greedy] * len(prompts), params)
                            for o in llm.generate(prompts, batch, use_tqdm=False)])
    for (g_ids, g_lp), (e_ids, e_lp) in zip(*results):
        assert g_ids == e_ids
        assert g_lp == pytest.approx(e_lp, rel=1e-4, abs=1e-4)

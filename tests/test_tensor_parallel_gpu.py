"""Tensor parallelism over NCCL (2 GPUs): greedy ids identical to transformers in fp32 with CUDA graphs
(NCCL all-reduces captured in them) and eagerly; a killed worker ends in EngineDeadError within
seconds (the NCCL communicators are aborted so rank 0 is not left waiting on the GPU).
Skipped with fewer than 2 GPUs; on nvidia-h100-x2: `python -m pytest -q tests/test_tensor_parallel_gpu.py`."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import psutil
import pytest
import torch

from conftest import assert_tp_fp8_first_tokens_agree, save_tiny_model
from paged_backend import LLM, EngineDeadError, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_tp2_gpu_greedy_matches_transformers_fp32(kind, tmp_path):
    import transformers

    from paged_backend.bench import word_level_tokenizer

    model_dir = save_tiny_model(kind, tmp_path / kind, word_level_tokenizer(49152))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (1, 5, 16, 17, 40, 77, 130, 300)]
    attn = "eager" if kind == "gemma2" else "sdpa"
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    hf = hf.cuda().eval()
    expected = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False, pad_token_id=0)
            expected.append(y[0, len(ids):].tolist())
    del hf
    torch.cuda.empty_cache()
    for kw in (dict(), dict(enforce_eager=True, max_num_batched_tokens=64)):
        with LLM(str(model_dir), dtype="float32", device="cuda", gpu_memory_utilization=0.3,
                 tensor_parallel_size=2, **kw) as llm:
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
            for i, (o, e) in enumerate(zip(outs, expected)):
                assert o.outputs[0].token_ids == e, f"{kind} tp=2 {kw}: prompt {i} differs on the GPU"
            assert llm.stats().num_blocks_used == 0


def test_tp2_gpu_killed_worker_is_engine_dead(tmp_path):
    from paged_backend.bench import word_level_tokenizer

    model_dir = save_tiny_model("llama", tmp_path / "llama", word_level_tokenizer(49152))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    llm = LLM(str(model_dir), dtype="float32", device="cuda", gpu_memory_utilization=0.3, tensor_parallel_size=2)
    (pid,) = {p.pid for p in psutil.Process().children(recursive=True)} - before
    killer = threading.Timer(2.0, os.kill, (pid, signal.SIGKILL))
    start = time.monotonic()
    killer.start()
    try:
        with pytest.raises(EngineDeadError):
            for _ in range(100):  # keeps the GPUs busy until the kill lands
                llm.generate([[5, 6, 7]] * 64, SamplingParams(max_tokens=200, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - start < 60
    finally:
        killer.cancel()
        llm.shutdown()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_tp2_gpu_fp8_weights_and_kv_match_tp1(tmp_path):
    """quantization="fp8" + an fp8 KV cache over NCCL with CUDA graphs (`_scaled_mm` on each rank's slice, the
    row-parallel products all-reduced): the first token's top log-probabilities agree with the one-GPU fp8 engine's
    within twice the fp8 error (each rank quantizes its own slice of the activations, so they are not bitwise
    equal), and generation leaves no KV block behind."""
    from paged_backend.bench import word_level_tokenizer

    model_dir = save_tiny_model("llama", tmp_path / "llama", word_level_tokenizer(49152))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (3, 17, 40, 130)]
    kw = dict(dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3, quantization="fp8", kv_cache_dtype="fp8")
    first, texts = {}, {}
    for tp in (1, 2):
        with LLM(str(model_dir), tensor_parallel_size=tp, **kw) as llm:
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
            first[tp] = [o.outputs[0].logprobs[0] for o in outs]
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
            texts[tp] = [o.outputs[0].token_ids for o in outs]
            assert llm.stats().num_blocks_used == 0
    assert_tp_fp8_first_tokens_agree(first[1], first[2])
    assert all(len(t) == 24 for t in texts[2])

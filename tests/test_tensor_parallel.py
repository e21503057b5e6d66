"""Tensor parallelism on the CPU: gloo, 2 ranks (this process is rank 0, one worker process).

Greedy token ids of tp=2 equal transformers' (and so tp=1's) on the same fp32 weights, with prefix
caching, chunked prefill and forced preemption all at once; a model with fewer KV heads than ranks
(replication); a killed worker fails every pending and later request with EngineDeadError, quickly
and without orphan processes; the torchrun-style environment rendezvous on loopback.
Each engine costs a worker start (a fresh interpreter importing torch), so the tests share few.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import assert_tp_fp8_first_tokens_agree, hf_greedy, save_tiny_model
from paged_backend import LLM, EngineDeadError, SamplingParams
from paged_backend.runtime.step_profile import ENV

pytestmark = pytest.mark.slow  # each engine here starts processes (fresh interpreters importing torch)
TP = 2
MAX_NEW = 16
BLOCKS = 12  # 12 blocks of 16 tokens for 6 prompts of up to ~135 tokens: the scheduler must preempt


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 49152) for _ in range(40)]  # a common prefix for prefix-cache hits
    out = []
    for i, n in enumerate([3, 17, 33, 60, 95, 7]):
        body = [rng.randrange(3, 49152) for _ in range(n)]
        out.append(shared[: 20 + i] + body if i % 2 else body)
    return out


def _engine_kwargs(model_dir: Path, tp: int) -> dict:
    """Prefix caching on, prompts chunked by 24 tokens, a cache of exactly BLOCKS blocks on each rank."""
    from paged_backend.layers.parallel import TPGroup, local_kv_heads
    from paged_backend.loader import resolve_model
    from paged_backend.models.registry import kv_cache_shape_info

    cfg = resolve_model(str(model_dir)).hf_config
    layers, hkv, d = kv_cache_shape_info(cfg)
    hkv = local_kv_heads(TPGroup(0, tp), cfg.num_attention_heads, hkv)
    return dict(
        dtype="float32", device="cpu", tensor_parallel_size=tp, enable_prefix_caching=True,
        max_num_batched_tokens=24, max_model_len=BLOCKS * 16, kv_cache_memory=BLOCKS * layers * 2 * 16 * hkv * d * 4,
    )


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"}


@pytest.fixture(scope="module")
def kv1_qwen3_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    """Qwen3 (per-head q/k norm) with 1 KV head: each of the 2 ranks holds a replica of it."""
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("tiny-qwen3-kv1"), smollm_tokenizer, num_key_value_heads=1)


@pytest.mark.parametrize("kind", ["llama", "qwen3-kv1", "gemma2"])
def test_tp2_greedy_matches_transformers(kind, tiny_model_dir, kv1_qwen3_dir, monkeypatch, capfd):
    model_dir = kv1_qwen3_dir if kind == "qwen3-kv1" else tiny_model_dir(kind)
    profiled = kind == "llama"  # the per-step profile on: same tokens, and every rank reports
    if profiled:
        monkeypatch.setenv(ENV, "1")
    prompts = _prompts(seed=sum(map(ord, kind)))
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    before = _children()
    with LLM(str(model_dir), **_engine_kwargs(model_dir, TP)) as llm:
        assert len(_children() - before) == TP - 1, "one worker process per rank but rank 0"
        outs = llm.generate(prompts, params, use_tqdm=False)
        for i, (out, exp) in enumerate(zip(outs, expected)):
            assert out.outputs[0].token_ids == exp, f"{kind}: prompt {i} differs"
        stats = llm.stats()
        assert stats.num_preemptions > 0, "the small cache did not force a preemption"
        assert stats.prefix_cache_hit_tokens > 0, "the shared prefixes were not served from the cache"
        assert stats.num_steps > MAX_NEW + 8, "long prompts were not chunked"
        assert stats.num_blocks_used == 0, "blocks leaked"
    _assert_gone(before)
    if profiled:
        err = capfd.readouterr().err
        assert "[step profile rank 0/2] decode (all)" in err and " send " in err, err
        assert "[step profile rank 1/2] decode (all)" in err and " wait " in err, err


def _assert_gone(before: set[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _children() - before, "a worker process outlived its engine"


def test_killed_worker_fails_pending_and_later_requests(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    before = _children()
    llm = LLM(str(model_dir), **_engine_kwargs(model_dir, TP))
    try:
        (worker_pid,) = _children() - before
        killer = threading.Timer(1.0, os.kill, (worker_pid, signal.SIGKILL))
        prompts = [[5 + i, 6, 7] for i in range(8)]
        start = time.monotonic()
        killer.start()
        with pytest.raises(EngineDeadError, match="worker"):
            llm.generate(prompts, SamplingParams(max_tokens=150, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - start < 30, "the dead worker was not noticed within seconds"
        with pytest.raises(EngineDeadError):  # a later request fails the same way, at once
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
        assert llm.stats().num_blocks_used == 0
    finally:
        killer.cancel()
        llm.shutdown()
    _assert_gone(before)


def test_bad_tensor_parallel_size_fails_before_any_process(tiny_model_dir):
    model_dir = tiny_model_dir("llama")  # 4 query heads, 2 KV heads
    before = _children()
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(str(model_dir), dtype="float32", device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="num_attention_heads"):  # 8 ranks for 4 heads
        LLM(str(model_dir), dtype="float32", device="cpu", tensor_parallel_size=8)
    with pytest.raises(ValueError, match="native model code only"):  # transformers' modeling code is not sharded
        LLM(str(model_dir), dtype="float32", device="cpu", tensor_parallel_size=2, model_impl="transformers")
    assert _children() == before


def test_environment_rendezvous_on_loopback(tiny_model_dir, monkeypatch):
    """torchrun-style: the worker is started from outside with RANK=1; the engine (RANK=0) finds it
    through MASTER_ADDR/MASTER_PORT and starts no process itself."""
    model_dir = tiny_model_dir("qwen3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(TP), RANK="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    worker = subprocess.Popen([sys.executable, "-m", "paged_backend.cli", "worker", "--device", "cpu"], env=env)
    try:
        for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(TP), RANK="0").items():
            monkeypatch.setenv(key, value)
        prompts = _prompts(seed=7)[:3]
        params = SamplingParams(temperature=0.0, max_tokens=8)
        before = _children()
        with LLM(str(model_dir), **_engine_kwargs(model_dir, TP)) as llm:
            assert _children() == before, "the environment rendezvous starts no process"
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert worker.wait(timeout=30) == 0, "the worker did not stop when the engine shut down"
        assert got == hf_greedy(model_dir, prompts, 8)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_tp2_fp8_weights_all_reduce_the_row_parallel_projections(tiny_model_dir):
    """quantization="fp8" under tensor parallelism: o_proj and down_proj hold one rank's input features each,
    so their fp8 products must be all-reduced like the unquantized RowParallelLinear's (an Fp8Linear in their
    place without it leaves every rank with a partial sum: then 0-1 of the five top tokens are tp=1's). The first
    token's top log-probabilities agree with the tp=1 fp8 engine's within twice the fp8 error itself (tp=1 fp8
    against fp32 differs by up to 0.12 on these prompts: each rank quantizes its own slice of the activations)."""
    model_dir = tiny_model_dir("llama")
    prompts = _prompts(seed=19)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    kw = dict(dtype="float32", device="cpu", quantization="fp8", max_model_len=BLOCKS * 16)
    outs = {}
    for tp in (1, TP):
        with LLM(str(model_dir), tensor_parallel_size=tp, **kw) as llm:
            outs[tp] = [o.outputs[0].logprobs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert_tp_fp8_first_tokens_agree(outs[1], outs[TP])

"""The peer-memory all-reduce on 2 GPUs (two processes, one per GPU, as the engine runs them):
bitwise equal to the torch twin on every rank for several sizes and dtypes, eagerly and inside a CUDA
graph, over hundreds of calls back to back (both buffers, call counters, flags); a peer that never
comes is survived through the host's abort word and through max_spins, and the process can set up a
fresh one after; two tensor-parallel engines one after the other in one process both use it and give
the same tokens. Skipped with fewer than 2 GPUs; on nvidia-h100-x2:
`python -m pytest -q tests/test_peer_all_reduce_gpu.py`."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from paged_backend.bench.all_reduce import run_ranks
from paged_backend.kernels.reference import all_reduce_sum
from paged_backend.runtime.peer_memory import PeerAllReduce

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
WORLD = 2
SIZES = [1, 7, 4095, 4096, 4097, 3 * 65536 + 5, 1 << 20, 2 << 20]  # elements; 2 << 20 fp32 = the 8 MiB limit
DTYPES = [torch.bfloat16, torch.float32]


def _parts(seed: int, n: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Every rank's input of one call, the same on every rank (each rank keeps its own row)."""
    out = []
    for r in range(WORLD):
        g = torch.Generator(device=device).manual_seed(seed * WORLD + r)
        out.append(torch.randn(n, generator=g, device=device).to(dtype))
    return out


def _correctness_rank(rank, world, control) -> list[str]:
    device = torch.device("cuda", rank)
    peer = PeerAllReduce.create(control, rank, world, device, 8 << 20)
    if peer is None:
        return ["no peer memory: PeerAllReduce.create returned None on a 2-GPU host"]
    bad: list[str] = []
    seed = 0
    for n in SIZES:  # eager, one by one
        for dtype in DTYPES:
            seed += 1
            parts = _parts(seed, n, dtype, device)
            if not torch.equal(peer.all_reduce(parts[rank]), all_reduce_sum(parts)):
                bad.append(f"eager n={n} {dtype}")
    pending = []  # back to back, no host wait in between: 300 calls over both buffers
    for i in range(300):
        seed += 1
        n, dtype = SIZES[i % len(SIZES) % 6], DTYPES[i % 2]
        parts = _parts(seed, n, dtype, device)
        pending.append((f"burst {i} n={n} {dtype}", peer.all_reduce(parts[rank]), all_reduce_sum(parts)))
    # a graph of three all-reduces, replayed with fresh inputs, eager calls in between
    shapes = [((64, 4096), torch.bfloat16), ((1000,), torch.float32), ((1 << 20,), torch.bfloat16)]
    static = [torch.zeros(s, dtype=d, device=device) for s, d in shapes]
    for t in static:
        peer.all_reduce(t)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [peer.all_reduce(t) for t in static]
    for k in range(20):
        for j, ((shape, dtype), t) in enumerate(zip(shapes, static)):
            seed += 1
            parts = [p.view(shape) for p in _parts(seed, t.numel(), dtype, device)]
            t.copy_(parts[rank])
            pending.append((f"graph replay {k} tensor {j}", outs[j], all_reduce_sum(parts)))
        graph.replay()
        pending[-3:] = [(name, got.clone(), want) for name, got, want in pending[-3:]]
        seed += 1
        parts = _parts(seed, 4097, torch.float32, device)
        pending.append((f"eager after replay {k}", peer.all_reduce(parts[rank]), all_reduce_sum(parts)))
    torch.cuda.synchronize()
    bad += [name for name, got, want in pending if not torch.equal(got, want)]
    bad += [f"status words {peer.status.tolist()}"] if peer.status.any() else []
    peer.release(control)
    return bad


def test_matches_the_twin_bitwise_eager_in_graphs_and_back_to_back():
    for rank, bad in enumerate(run_ranks(_correctness_rank, WORLD, timeout=240)):
        assert bad == [], f"rank {rank}: {bad[:10]}"


def _wait_for_stream(limit_s: float = 60.0) -> None:
    """Poll (the GIL stays free for the thread that aborts); give up after limit_s."""
    done = torch.cuda.Event()
    done.record()
    deadline = time.monotonic() + limit_s
    while not done.query() and time.monotonic() < deadline:
        time.sleep(0.01)


def _abort_rank(rank, world, control) -> dict:
    device = torch.device("cuda", rank)
    x = torch.ones(4096, device=device)
    seen = {}
    # 1. rank 1 never calls; rank 0's host sets the abort word after 1 s
    peer = PeerAllReduce.create(control, rank, world, device, 1 << 20)
    if rank == 0:
        timer = threading.Timer(1.0, peer.abort)
        start = time.monotonic()
        timer.start()
        peer.all_reduce(x)
        _wait_for_stream()
        seen["abort_s"], seen["saw_abort"] = time.monotonic() - start, peer.saw_abort
    dist.barrier(group=control)
    peer.release()  # the way the engine releases with a dead peer: no rendezvous
    dist.barrier(group=control)
    # 2. a fresh one (new region, new handles) whose waits give up by themselves
    peer = PeerAllReduce.create(control, rank, world, device, 1 << 20, max_spins=1 << 20)
    if rank == 0:
        start = time.monotonic()
        peer.all_reduce(x)
        _wait_for_stream()
        seen["timeout_s"], seen["timed_out"] = time.monotonic() - start, peer.timed_out
    dist.barrier(group=control)
    peer.release()
    dist.barrier(group=control)
    # 3. and one more that works: nothing of the first two is left in the way
    peer = PeerAllReduce.create(control, rank, world, device, 1 << 20)
    seen["sum_ok"] = bool((peer.all_reduce(x * (rank + 1)) == 3).all())
    peer.release(control)
    return seen


def test_abort_and_max_spins_unblock_a_rank_whose_peer_never_comes():
    rank0, rank1 = run_ranks(_abort_rank, WORLD, timeout=180)
    assert rank0["saw_abort"] and 0.9 < rank0["abort_s"] < 30, rank0
    assert rank0["timed_out"] and rank0["timeout_s"] < 60, rank0
    assert rank0["sum_ok"] and rank1["sum_ok"]


def test_two_tp_engines_one_after_the_other_use_peer_memory(tmp_path):
    """The second engine sets up its own peer memory in the same process (the symmetric-memory
    attempt hung here) and gives the same greedy tokens; every worker is gone after each."""
    import psutil

    from conftest import save_tiny_model
    from paged_backend import LLM, SamplingParams
    from paged_backend.bench import word_level_tokenizer

    model_dir = save_tiny_model("llama", tmp_path / "llama", word_level_tokenizer(49152))
    prompts = [[5 + i, 6, 7, 8 + i] * (i + 1) for i in range(6)]
    runs = []
    for _ in range(2):
        start = time.monotonic()
        with LLM(str(model_dir), dtype="float32", device="cuda", gpu_memory_utilization=0.3,
                 tensor_parallel_size=2, max_num_seqs=8) as llm:
            assert llm.engine.runner.tp.peer is not None, "the engine runs NCCL only on a 2-GPU host"
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
            pids = llm.engine.runner.worker_pids
        runs.append([o.outputs[0].token_ids for o in outs])
        assert time.monotonic() - start < 240
        assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)
    assert runs[0] == runs[1]

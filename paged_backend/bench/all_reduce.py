"""Micro-benchmark of the tensor-parallel all-reduce: the peer-memory kernel (runtime/peer_memory.py)
against NCCL's, per message size, on the GPUs of this host, the way the engine runs them: `--repeat`
all-reduces of one bf16 tensor captured in a CUDA graph, the graph replayed back to back, CUDA events
between replays; reported per all-reduce, the median over the replays.

    python -m paged_backend.bench.all_reduce --world 2 --sizes 256K,2M,64M

`run_ranks` (one spawned process per GPU, a gloo group for control and optionally NCCL for the
tensors) is also the harness of the two-process GPU tests.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paged_backend.runtime.distributed import NCCL_ENV
from paged_backend.runtime.peer_memory import PeerAllReduce


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world: int, port: int, nccl: bool, args: tuple, results) -> None:
    for key, value in NCCL_ENV.items():  # NVLink multicast stays off in every process
        os.environ.setdefault(key, value)
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(rank)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=120))
        dist.init_process_group("nccl" if nccl else "gloo", store=store, rank=rank, world_size=world)
        control = dist.new_group(backend="gloo") if nccl else dist.group.WORLD
        results.put((rank, fn(rank, world, control, *args), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, args: tuple = (), timeout: float = 300.0, nccl: bool = False) -> list:
    """fn(rank, world, control_group, *args) in one spawned process per GPU (cuda:rank); their return
    values by rank. A rank that raises or a run past `timeout` seconds ends every process and raises."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, nccl, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        while len(out) < world:
            try:
                rank, value, error = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(out))} did not finish in {timeout} s") from None
            if error is not None:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30 if len(out) == world else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world)]


def _time_graph(op, x: torch.Tensor, repeat: int, replays: int) -> float:
    """Median microseconds of one op(x) over `replays` replays of a graph of `repeat` calls."""
    for _ in range(3):  # eager warm-up: Triton compiles, NCCL connects
        op(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # NCCL's watchdog polls meanwhile
        for _ in range(repeat):
            op(x)
    for _ in range(3):
        graph.replay()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
    events[0].record()
    for e in events[1:]:
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(events, events[1:])) * 1000 / repeat


def _bench_rank(rank: int, world: int, control, sizes: list[int], repeat: int, replays: int) -> list[dict]:
    device = torch.device("cuda", rank)
    peer = PeerAllReduce.create(control, rank, world, device, max(sizes))
    rows = []
    for size in sizes:
        x = torch.zeros(size // 2, dtype=torch.bfloat16, device=device)  # zeros: NCCL's in-place sum stays finite
        row = {"bytes": size, "nccl_us": _time_graph(lambda t: dist.all_reduce(t), x, repeat, replays)}
        if peer is not None and peer.fits(x):
            row["peer_us"] = _time_graph(peer.all_reduce, x, repeat, replays)
        rows.append(row)
    if peer is not None:
        peer.release(control)
    return rows


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="GPUs (ranks)")
    parser.add_argument("--sizes", default="256K,512K,1M,2M,4M,8M,16M,32M,64M", help="message sizes in bytes")
    parser.add_argument("--repeat", type=int, default=20, help="all-reduces per graph")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--json", default=None, help="write the rows here")
    a = parser.parse_args(argv)
    sizes = [_size(s) for s in a.sizes.split(",")]
    rows = run_ranks(_bench_rank, a.world, (sizes, a.repeat, a.replays), timeout=600, nccl=True)[0]
    print(f"all-reduce, {a.world} GPUs ({torch.cuda.get_device_name(0)}), bf16, in a CUDA graph, median us per call")
    print(f"{'bytes':>10} {'nccl':>9} {'peer':>9} {'nccl/peer':>9}")
    for r in rows:
        peer = r.get("peer_us")
        shown = f"{peer:9.1f} {r['nccl_us'] / peer:9.2f}" if peer else f"{'-':>9} {'-':>9}"
        print(f"{r['bytes']:>10} {r['nccl_us']:9.1f} {shown}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"world": a.world, "device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A tensor-parallel worker: ranks 1..N-1. It builds its shard, then runs every step rank 0 sends
until rank 0 says stop or goes away.

One entry point for both ways of starting it, the environment rendezvous::

    MASTER_ADDR=host0 MASTER_PORT=29500 RANK=1 WORLD_SIZE=2 paged-backend worker

either by rank 0 itself (one worker per GPU of its host, on a loopback port it chose) or from outside
(torchrun on every host; the rank-0 process runs the engine with the same variables set). A worker
needs nothing else: rank 0 sends it the engine arguments over the control group.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from paged_backend.runtime.distributed import Rendezvous, destroy_groups, device_for, init_groups, open_store
from paged_backend.runtime.peer_memory import with_peer_all_reduce
from paged_backend.runtime.shard import ShardSpec, build_shard
from paged_backend.runtime.step_channel import open_receiver

logger = logging.getLogger("paged_backend")

_PARENT_POLL_S = 0.5


def receive(control) -> object:
    """The next object rank 0 broadcasts on the control group (the shard spec, once)."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def send(control, obj) -> None:
    dist.broadcast_object_list([obj], src=0, group=control)


def _exit_with_parent(parent_pid: int) -> None:
    """A started worker must not outlive the engine's process, however that process ended."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def serve(rdv: Rendezvous, device_type: str | None = None, store=None) -> None:
    """Join the group, build this rank's shard, run steps until told to stop."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The ranks of one host share its cores: N ranks with all cores each would oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rdv.world_size))
    tp, control = init_groups(rdv, device_type, store)
    try:
        spec: ShardSpec = receive(control)
        device = device_for(spec.device_type, rdv.local_rank)
        tp = with_peer_all_reduce(tp, control, device, spec)  # where rank 0 sets up its own
        runner, _ = build_shard(spec, tp=tp, control=control, device=device)
        _serve_steps(runner, open_receiver(control))  # shared memory from the rank 0 that spawned us, else gloo
        runner.release()
        if tp.peer is not None:
            tp.peer.release(control)  # together with rank 0's shutdown
    finally:
        destroy_groups()


def _serve_steps(runner, steps) -> None:
    """Run each step rank 0 sends until it says stop; with PAGED_BACKEND_PROFILE_STEPS the wait for a
    step and its reading are timed apart."""
    prof = runner.step_profile
    while True:
        t0 = time.perf_counter()
        message = steps.wait()
        t1 = time.perf_counter()
        step = steps.read(message)
        if step is None:
            return
        if prof is not None:
            prof.add("wait", t1 - t0)
            prof.add("recv", time.perf_counter() - t1)
        runner.execute(step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="paged-backend worker",
        description="a tensor-parallel worker (rank > 0); rendezvous from MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    a, _ = parser.parse_known_args(argv)  # under torchrun the engine's own flags may follow
    rdv = Rendezvous.from_environment()
    if rdv is None:
        print("set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE (as torchrun does)", file=sys.stderr)
        return 2
    if rdv.rank == 0:
        print("RANK=0 runs the engine (LLM / serve with tensor_parallel_size), not a worker", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rdv.rank}] %(levelname)s %(message)s")
    if a.parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(a.parent_pid,), daemon=True).start()
    store = open_store(rdv)
    store.set(ready_key(rdv.rank), "1")  # rank 0 waits for this, watching the process meanwhile
    serve(rdv, a.device, store)
    return 0


def ready_key(rank: int) -> str:
    return f"paged_backend/worker_ready/{rank}"


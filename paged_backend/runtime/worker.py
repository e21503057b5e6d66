"""A tensor-parallel worker: ranks 1..N-1. It builds its shard, then runs every step rank 0 sends
until rank 0 says stop or goes away.

Started by rank 0 (spawned, one per GPU) or from outside with the environment rendezvous::

    MASTER_ADDR=host0 MASTER_PORT=29500 RANK=1 WORLD_SIZE=2 python -m paged_backend.runtime.worker

(what torchrun does on every host; the rank-0 process runs the engine with the same variables set).
A worker needs nothing else: rank 0 sends it the engine arguments over the control group.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch.distributed as dist

from paged_backend.runtime.distributed import Rendezvous, destroy_groups, device_for, init_groups, open_store
from paged_backend.runtime.shard import ShardSpec, build_shard

logger = logging.getLogger("paged_backend")

_PARENT_POLL_S = 0.5


def receive(control) -> object:
    """The next object rank 0 broadcasts on the control group (a step input, or None to stop)."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def send(control, obj) -> None:
    dist.broadcast_object_list([obj], src=0, group=control)


def _exit_with_parent(parent_pid: int) -> None:
    """A spawned worker must not outlive the engine's process, however that process ended."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def serve(rdv: Rendezvous, device_type: str | None = None, store=None) -> None:
    """Join the group, build this rank's shard, run steps until told to stop."""
    device_type = device_type or ("cuda" if _cuda_visible() else "cpu")
    tp, control = init_groups(rdv, device_type, store)
    try:
        spec: ShardSpec = receive(control)
        runner, _ = build_shard(spec, tp=tp, control=control, device=device_for(spec.device_type, rdv.local_rank))
        while (step := receive(control)) is not None:
            runner.execute(step)
        runner.release()
    finally:
        destroy_groups()


def spawned_main(addr: str, port: int, rank: int, world_size: int, device_type: str, parent_pid: int) -> None:
    """Entry point of a worker that rank 0 spawned (torch.multiprocessing, spawn context)."""
    # Ctrl-C reaches the whole foreground process group; only the engine's process acts on it and
    # ends the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    rdv = Rendezvous(addr, port, rank, world_size, local_rank=rank)
    store = open_store(rdv)
    store.set(f"worker_ready/{rank}", "1")
    serve(rdv, device_type, store)


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> int:
    rdv = Rendezvous.from_environment()
    if rdv is None:
        print("set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE (as torchrun does)", file=sys.stderr)
        return 2
    if rdv.rank == 0:
        print("RANK=0 runs the engine (LLM / serve with tensor_parallel_size), not a worker", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=f"[rank {rdv.rank}] %(message)s")
    serve(rdv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

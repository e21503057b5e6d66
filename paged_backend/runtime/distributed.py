"""torch.distributed process groups for tensor parallelism: NCCL for the model's tensors on CUDA,
gloo on CPU, and a gloo group on both for the host-side control messages (each step's input).

Two ways to meet:
- spawned workers (one host): rank 0 (the caller's process) opens a TCP store on loopback and hands
  its port to the processes it spawns;
- the standard environment rendezvous (MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE, as torchrun
  sets them, LOCAL_RANK picks the GPU): every process is started from outside, across hosts if need
  be; rank 0 runs the engine and the others run `python -m paged_backend.runtime.worker`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from paged_backend.layers.parallel import TPGroup

# NVLink multicast stays off (the GPU machines set these; spawned processes keep them).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# The control group waits for the next step for as long as the engine is idle; a dead peer is
# noticed through its closed socket (and the process sentinel), not through this timeout.
CONTROL_TIMEOUT = timedelta(days=365)
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)
_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class Rendezvous:
    addr: str
    port: int
    rank: int
    world_size: int
    local_rank: int
    from_env: bool = False

    @classmethod
    def from_environment(cls) -> "Rendezvous | None":
        """The torchrun-style rendezvous if all of MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE are set."""
        if not all(k in os.environ for k in _ENV_KEYS):
            return None
        env = os.environ
        try:
            rank, world, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError as exc:
            raise ValueError(f"RANK, WORLD_SIZE, MASTER_PORT and LOCAL_RANK must be integers: {exc}") from exc
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        return cls(env["MASTER_ADDR"], port, rank, world, local, from_env=True)


def backend_for(device_type: str) -> str:
    """"nccl" on CUDA, "gloo" on CPU; ValueError if this torch build lacks it."""
    if not dist.is_available():
        raise ValueError("tensor_parallel_size > 1 needs torch.distributed, which this torch build lacks")
    if device_type == "cuda":
        if not dist.is_nccl_available():
            raise ValueError("tensor_parallel_size > 1 on CUDA needs NCCL, which this torch build lacks")
        return "nccl"
    if device_type == "cpu":
        if not dist.is_gloo_available():
            raise ValueError("tensor_parallel_size > 1 on the CPU needs gloo, which this torch build lacks")
        return "gloo"
    raise ValueError(f"tensor parallelism runs on cuda or cpu devices, not {device_type!r}")


def device_for(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def open_store(rdv: Rendezvous) -> dist.Store:
    """Rank 0's TCP store (port 0: the OS picks a free one, read back with `.port`) or a client of it."""
    return dist.TCPStore(
        rdv.addr, rdv.port, rdv.world_size, is_master=rdv.rank == 0, timeout=RENDEZVOUS_TIMEOUT, wait_for_workers=False
    )


def init_groups(rdv: Rendezvous, device_type: str, store: dist.Store | None = None) -> tuple[TPGroup, object]:
    """Join the group; returns (the TP group of the model's tensors, the gloo control group)."""
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)
    backend = backend_for(device_type)
    if dist.is_initialized():
        raise RuntimeError(
            "a torch.distributed process group already exists in this process; one tensor-parallel engine "
            "per process (shut the other one down first)"
        )
    if device_type == "cuda":
        torch.cuda.set_device(rdv.local_rank)
    if store is None:
        store = open_store(rdv)
    timeout = CONTROL_TIMEOUT if backend == "gloo" else None
    dist.init_process_group(backend, store=store, rank=rdv.rank, world_size=rdv.world_size, timeout=timeout)
    world = dist.group.WORLD
    control = world if backend == "gloo" else dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TPGroup(rdv.rank, rdv.world_size, world), control


def destroy_groups() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a group whose peer died may refuse a clean teardown; it is gone either way
            pass


def abort_groups() -> None:
    """Make collectives blocked on a dead peer fail instead of waiting (best effort: NCCL waits on
    the GPU, where only aborting its communicators lets the stream go on)."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None and dist.is_initialized() and dist.get_backend() == "nccl":
        try:
            abort()
        except Exception:  # nothing more can be done for a group whose peer is gone
            pass

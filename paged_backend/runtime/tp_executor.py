"""Rank 0 of a tensor-parallel engine: it starts and owns the workers, runs its own shard, and sends
each step's input to the workers before running it itself.

Rank 0 is the caller's process (like vLLM's driver worker): it holds shard 0 on GPU 0, so no GPU
idles and the logits gathered to it are sampled where they land, with no extra hop. The scheduler,
block manager, sampler and detokenizer stay with it; the workers only ever see plain step inputs.

Workers are fresh interpreters (`python -m paged_backend.cli worker`, the same entry point
torchrun-started workers use) rather than multiprocessing children: a spawn-context child re-runs
the caller's `__main__`, which breaks every script without an `if __name__ == "__main__"` guard.
They run in their own session, so a terminal's Ctrl-C reaches only the engine, which ends them.

Faults: a monitor thread watches the worker processes; when one exits unasked, the executor is
dead, collectives blocked on it are aborted, and this and every later step raise EngineDeadError.
`shutdown()` (also at interpreter exit) stops the workers, killing any that does not stop within
seconds; a worker also exits by itself when the engine's process is gone.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
import torch.distributed

from paged_backend.errors import EngineDeadError
from paged_backend.layers.parallel import TPGroup, even_slices, qkv_slices
from paged_backend.models.blocks import head_dim_of, num_kv_heads_of
from paged_backend.models.registry import resolve_impl, supported_architectures
from paged_backend.runtime import worker
from paged_backend.runtime.distributed import (
    NCCL_ENV,
    Rendezvous,
    abort_groups,
    backend_for,
    destroy_groups,
    device_for,
    init_groups,
    open_store,
)
from paged_backend.runtime.peer_memory import with_peer_all_reduce
from paged_backend.runtime.shard import ShardSpec, build_shard
from paged_backend.runtime.step_channel import GlooStepSender, ShmStepSender, shm_available

logger = logging.getLogger("paged_backend")

_JOIN_S = 5.0
_POLL_S = 0.2
_START_TIMEOUT_S = 600


def validate_tensor_parallel(hf_config, tp_size: int, device_type: str, model_impl: str = "auto") -> None:
    """ValueError before any process starts if the model cannot be cut tp_size ways here."""
    backend_for(device_type)
    if resolve_impl(hf_config, model_impl) != "native":
        raise ValueError(
            f"tensor_parallel_size={tp_size} runs the native model code only (natively: "
            f"{', '.join(supported_architectures())}); this model would run through transformers' modeling code"
        )
    for rank in range(tp_size):  # every rank's cut must exist (heads, KV replication, MLP)
        group = TPGroup(rank, tp_size)
        qkv_slices(group, hf_config.num_attention_heads, num_kv_heads_of(hf_config), head_dim_of(hf_config))
        even_slices(group, {"mlp": hf_config.intermediate_size}, "intermediate_size")
    if device_type == "cuda" and Rendezvous.from_environment() is None and torch.cuda.device_count() < tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} needs {tp_size} GPUs but {torch.cuda.device_count()} are visible "
            "(CUDA_VISIBLE_DEVICES); lower tensor_parallel_size"
        )


class TPExecutor:
    """Runs every step on all ranks; `execute` returns rank 0's result (the sampled tokens)."""

    def __init__(self, spec: ShardSpec, tp_size: int, source=None):
        self.tp_size = tp_size
        self._procs: list[subprocess.Popen] = []
        self._dead: str | None = None
        self._closing = False
        # Steps go to workers this process spawned through shared memory; to ranks started from
        # outside (other hosts perhaps) over the gloo control group.
        self._channel: ShmStepSender | GlooStepSender | None = None
        env_rdv = Rendezvous.from_environment()
        try:
            if env_rdv is not None:
                self._rdv, store = self._check_env(env_rdv), None
            else:
                self._rdv = Rendezvous("127.0.0.1", 0, 0, tp_size, local_rank=0)
                store = open_store(self._rdv)
                if shm_available():
                    self._channel = ShmStepSender(tp_size - 1, is_dead=self._exited)
                self._spawn(store.port, spec.device_type)
                self._wait_ready(store)
            self.tp, self.control = init_groups(self._rdv, spec.device_type, store)
            self._channel = self._channel or GlooStepSender(self.control)
            self._watch()
            worker.send(self.control, spec)
            device = device_for(spec.device_type, self._rdv.local_rank)
            # Before the model is built (its layers hold the group) and here, not in build_shard, so
            # the monitor can abort it from the first collective on.
            self.tp = with_peer_all_reduce(self.tp, self.control, device, spec)
            self.runner, self.num_blocks = build_shard(spec, source, self.tp, self.control, device)
        except BaseException as exc:
            reason = self._dead
            self.shutdown()
            # Bad arguments fail the workers too (they build the same shard): the error is the news.
            if reason is not None and not isinstance(exc, (ValueError, TypeError)):
                raise EngineDeadError(f"a tensor-parallel worker failed while starting: {reason}") from exc
            raise
        # Ends the workers when the interpreter exits without shutdown() (weakly: no cycle).
        self._atexit = _atexit_shutdown(self)
        atexit.register(self._atexit)

    # ---- start -----------------------------------------------------------------------------
    def _check_env(self, rdv: Rendezvous) -> Rendezvous:
        if rdv.world_size != self.tp_size:
            raise ValueError(
                f"WORLD_SIZE={rdv.world_size} in the environment but tensor_parallel_size={self.tp_size}; "
                "they must match (one process per rank)"
            )
        if rdv.rank != 0:
            raise ValueError(
                f"RANK={rdv.rank}: only rank 0 runs the engine; start the other ranks with "
                "`paged-backend worker` (or the same command under torchrun)"
            )
        return rdv

    def _spawn(self, port: int, device_type: str) -> None:
        """One worker process per rank 1..N-1, meeting rank 0 through the environment rendezvous."""
        package_root = str(Path(__file__).resolve().parents[2])  # the workers import this very package
        base = dict(os.environ, **{k: os.environ.get(k, v) for k, v in NCCL_ENV.items()})
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(self.tp_size))
        cmd = [sys.executable, "-m", "paged_backend.cli", "worker", "--device", device_type,
               "--parent-pid", str(os.getpid())]
        for rank in range(1, self.tp_size):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            fds: list[int] = []
            if self._channel is not None:
                fds, channel_env = self._channel.worker_fds(rank - 1)
                env.update(channel_env)
            self._procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=fds))
        if self._channel is not None:
            self._channel.spawned()
        logger.info("started %d tensor-parallel workers (pids %s)", len(self._procs), self.worker_pids)

    def _wait_ready(self, store) -> None:
        """Wait for every worker to reach the store; fail at once if one exits first (a worker that
        never arrives would otherwise leave rank 0 in the rendezvous until its timeout)."""
        keys = [worker.ready_key(rank) for rank in range(1, self.tp_size)]
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not store.check(keys):
            self._check_exits()
            if self._dead is not None:
                raise RuntimeError(f"tensor-parallel {self._dead} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel workers did not start within {_START_TIMEOUT_S} s")
            time.sleep(_POLL_S)

    def _exited(self) -> bool:
        self._check_exits()
        return self._dead is not None

    def _check_exits(self) -> None:
        for rank, proc in enumerate(self._procs, start=1):
            if self._dead is None and proc.poll() is not None:
                self._dead = f"worker rank {rank} (pid {proc.pid}) exited with code {proc.returncode}"

    def _watch(self) -> None:
        if self._procs:
            threading.Thread(target=self._monitor, name="paged-backend-tp-monitor", daemon=True).start()

    def _monitor(self) -> None:
        while not self._closing and self._dead is None:
            self._check_exits()
            time.sleep(_POLL_S)
        if self._dead is not None and not self._closing:
            logger.error("tensor parallelism: %s; the engine is dead", self._dead)
            if self._peer is not None:  # first (a host write, it cannot block): kernels waiting for the dead rank give up
                self._peer.abort()
            abort_groups()

    # ---- steps -----------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: tensor-parallel {self._dead}")

    def execute(self, step, *args, **kwargs):
        """Send the step to the workers, run rank 0's shard on it; rank 0's result."""
        self.check_alive()
        try:
            prof = self.runner.step_profile
            t0 = time.perf_counter() if prof is not None else 0.0
            self._channel.send(step)  # first: the workers launch while rank 0 does
            if prof is not None:
                prof.add("send", time.perf_counter() - t0)
            return self.runner.execute(step, *args, **kwargs)
        except Exception as exc:
            deadline = time.monotonic() + _JOIN_S  # a peer's socket may close just before its exit is seen
            while self._procs and self._dead is None and time.monotonic() < deadline:
                self._check_exits()
                time.sleep(0.05)
            if not self._procs and _peer_gone(exc):  # ranks started from outside: no process to watch
                self._dead = f"peer rank went away ({exc})"
            if self._dead is not None:
                raise EngineDeadError(f"the engine is dead: tensor-parallel {self._dead or exc!r}") from exc
            raise

    # ---- stop ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every worker (asked first, then terminated, then killed) and leave the group."""
        if self._closing:
            return
        self._closing = True
        if getattr(self, "_atexit", None) is not None:
            atexit.unregister(self._atexit)
        if self._dead is None and self._channel is not None and getattr(self, "control", None) is not None:
            try:
                self._channel.send(None)
            except Exception:  # a worker went away meanwhile: it is stopped below either way
                pass
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.release()
        self._release_peer_memory()
        deadline = time.monotonic() + _JOIN_S
        for proc in self._procs:
            _wait(proc, deadline - time.monotonic())
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                _wait(proc, _JOIN_S)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._dead is not None:
            abort_groups()
        destroy_groups()
        if self._channel is not None:
            self._channel.close()

    release = shutdown  # what the engine calls on its runner at shutdown

    @property
    def _peer(self):
        """The peer-memory all-reduce of rank 0's group (None before it is set up, or where NCCL does all)."""
        return getattr(getattr(self, "tp", None), "peer", None)

    def _release_peer_memory(self) -> None:
        peer = self._peer
        if peer is None:
            return
        if self._dead is None:
            peer.release(self.control)  # with the workers, which release theirs after their last step
        else:
            peer.abort()
            abort_groups()  # NCCL kernels behind ours in the stream must end too before it drains
            peer.release()

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]


def _peer_gone(exc: Exception) -> bool:
    # gloo reports a vanished peer as a plain RuntimeError; NCCL and the store as DistError.
    return isinstance(exc, torch.distributed.DistError) or "closed by peer" in str(exc)


def _wait(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(max(0.0, seconds))
    except subprocess.TimeoutExpired:
        pass


def _atexit_shutdown(executor: TPExecutor):
    ref = weakref.ref(executor)

    def run() -> None:
        live = ref()
        if live is not None:
            live.shutdown()

    return run


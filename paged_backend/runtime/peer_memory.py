"""The tensor-parallel all-reduce over NVLink peer memory (kernels/peer_all_reduce.py), owned by one
engine: set up with it, aborted when a peer dies, released at its shutdown.

Set-up is collective over the gloo control group, on every rank in the same order, before the model
is built (its layers get the TPGroup carrying it) and so before KV sizing and CUDA-graph capture:
the region is allocated before the profiling run, which counts it as memory used elsewhere, so the
KV cache is sized around it. Every rank checks it can run it (same host, P2P between every pair of
GPUs, the CUDA runtime found, not switched off with PAGED_BACKEND_DISABLE_CUSTOM_ALL_REDUCE=1) and all
agree: one rank's "no" makes every rank use NCCL for everything. Each engine makes its own region and
handles and frees them at shutdown (no process-wide cache), so a second engine in the same process
starts clean.

Which messages: with two ranks a one-shot all-reduce moves the same bytes over NVLink as NCCL's ring
(each rank reads the other's whole message; the ring sends half and receives half, twice) in one
kernel with one handshake. Measured on two H100s (`python -m paged_backend.bench.all_reduce`, bf16, in
CUDA graphs, 2026-11-28) it beats NCCL from 256 KiB (9.6 vs 13.3 us) through 2 MiB (15.5 vs 31.7 us,
a decode step of 256 sequences at hidden 4096) to 32 MiB (137 vs 145 us) and loses at 64 MiB (264 vs
253 us), so the buffer is sized to the largest message the engine can make (max(max_num_batched_tokens,
max_num_seqs) x hidden x dtype bytes) capped at 32 MiB; its cost, twice that per rank (two alternating
buffers), comes out of the KV cache (64 MiB of ~60 GiB on an H100).
With more ranks each reads N-1 whole messages where the ring moves 2(N-1)/N of one, so only messages
small enough for latency to dominate would pay (512 KiB up to 4 ranks, 256 KiB beyond, the crossovers
NCCL's own and vLLM's measurements put there); the kernel handles any rank count (the CPU tests run it
for three), but it has run on GPUs only in pairs, so by default 3+ ranks leave everything to NCCL until
a 4-GPU run measures it. PAGED_BACKEND_CUSTOM_ALL_REDUCE_MAX_BYTES overrides the cap, also for 3+ ranks
(a measurement knob: the limit where NCCL takes over).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from paged_backend.layers.parallel import TPGroup
from paged_backend.runtime.cuda_ipc import CudaRuntime, loaded_runtime

logger = logging.getLogger("paged_backend")

DISABLE_ENV = "PAGED_BACKEND_DISABLE_CUSTOM_ALL_REDUCE"
MAX_BYTES_ENV = "PAGED_BACKEND_CUSTOM_ALL_REDUCE_MAX_BYTES"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_RELEASE_BARRIER = timedelta(seconds=10)
_DRAIN_S = 10.0  # how long release waits for this rank's stream before aborting the waits in it


def size_limit(world: int, largest_message: int) -> int:
    """The largest message (bytes) sent through peer memory; 0: none (NCCL does everything)."""
    env = os.environ.get(MAX_BYTES_ENV, "").strip()
    if env:
        try:
            cap = int(env)
        except ValueError:
            raise ValueError(f"{MAX_BYTES_ENV}={env!r} must be a number of bytes") from None
    else:
        cap = 32 << 20 if world == 2 else 0  # 3+ ranks: not measured on GPUs yet (see the module docstring)
    return max(0, min(cap, largest_message) if largest_message > 0 else cap)


def largest_message(spec) -> int:
    """Bytes of the largest all-reduce a forward pass of this shard spec issues (0 if unknown):
    [tokens, hidden] activations, tokens up to a prefill chunk or a decode batch."""
    tokens = max(spec.max_num_batched_tokens, spec.args.max_num_seqs)
    return tokens * spec.hidden_size * spec.dtype.itemsize


def fits(x: torch.Tensor, max_bytes: int) -> bool:
    """Whether the kernel can take x: contiguous, fp32/fp16/bf16, not empty, at most max_bytes."""
    return x.dtype in _DTYPES and x.is_contiguous() and 0 < x.numel() * x.element_size() <= max_bytes


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0").strip() not in ("", "0")


def with_peer_all_reduce(tp: TPGroup, control, device: torch.device, spec) -> TPGroup:
    """tp carrying a PeerAllReduce where every rank can run one, else tp unchanged (NCCL does it all).
    Collective on CUDA: every rank calls it, in the same order."""
    if device.type != "cuda" or tp.size < 2:
        return tp
    peer = PeerAllReduce.create(control, tp.rank, tp.size, device, size_limit(tp.size, largest_message(spec)))
    return tp if peer is None else dataclasses.replace(tp, peer=peer)


def _agree(control, ok: bool) -> bool:
    flag = torch.tensor([int(ok)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=control)
    return bool(flag.item())


def _local_index(uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None


class PeerAllReduce:
    """One rank's side: its region (buffers + flags, see kernels/peer_all_reduce.py), the peers'
    regions mapped here, the per-program call counters and the page-locked abort/status words."""

    def __init__(self, runtime: CudaRuntime, device: torch.device, rank: int, world: int, max_bytes: int,
                 programs: int, region: int, opened: list[int], addresses: list[int], max_spins: int):
        from paged_backend.kernels import peer_all_reduce as kernel

        self._kernel = kernel
        self._runtime, self.device, self.rank, self.world = runtime, device, rank, world
        self.max_bytes = max_bytes
        self._half, _ = kernel.region_layout(max_bytes, world, programs)
        self._region, self._opened = region, opened
        self._regions = torch.tensor(addresses, dtype=torch.int64, device=device)
        self._counters = torch.zeros(programs, dtype=torch.int64, device=device)
        # Host memory the kernel polls: the host can stop a kernel whose stream no device call reaches.
        self.status = torch.zeros(kernel.STATUS_WORDS, dtype=torch.int32, pin_memory=True)
        self._max_spins = max_spins
        self._released = False

    @classmethod
    def create(cls, control, rank: int, world: int, device: torch.device, max_bytes: int,
               max_spins: int = 0) -> "PeerAllReduce | None":
        """Set up on every rank (collective over the gloo `control` group); None on every rank where
        any rank cannot run it. max_spins > 0: a wait gives up after about that many spins (tests)."""
        if device.type != "cuda" or world < 2:
            return None
        from paged_backend.kernels import peer_all_reduce as kernel

        runtime = loaded_runtime()
        programs = torch.cuda.get_device_properties(device).multi_processor_count
        me = dict(host=socket.gethostname(), uuid=str(torch.cuda.get_device_properties(device).uuid),
                  ok=not disabled() and max_bytes > 0 and runtime is not None, max_bytes=max_bytes, programs=programs)
        everyone: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(everyone, me, group=control)
        peers = [_local_index(p["uuid"]) if p["host"] == me["host"] else None for p in everyone]
        ok = all(p["ok"] for p in everyone) and all(
            i is not None and (r == rank or torch.cuda.can_device_access_peer(device, i)) for r, i in enumerate(peers)
        )
        if not _agree(control, ok):
            logger.info("all-reduce: NCCL for every message (peer memory is off, or not every GPU pair has P2P)")
            return None
        max_bytes = min(p["max_bytes"] for p in everyone)
        programs = min(p["programs"] for p in everyone)
        _, total = kernel.region_layout(max_bytes, world, programs)
        region, handle, opened, addresses = None, None, [], []
        try:
            region = runtime.malloc_zeroed(device.index, total)
            handle = runtime.export(region)
        except RuntimeError as exc:
            logger.warning("all-reduce: no peer memory on %s (%s); NCCL for every message", device, exc)
        handles: list[bytes | None] = [None] * world
        dist.all_gather_object(handles, handle, group=control)
        ok = all(h is not None for h in handles)
        try:
            for r, h in enumerate(handles if ok else []):
                addresses.append(region if r == rank else runtime.open(device.index, h))
                if r != rank:
                    opened.append(addresses[-1])
        except RuntimeError as exc:
            logger.warning("all-reduce: a peer's memory could not be opened (%s); NCCL for every message", exc)
            ok = False
        if not _agree(control, ok):  # every rank gives up together, or none does
            for ptr in opened:
                runtime.close(ptr)
            if region is not None:
                runtime.free(region)
            return None
        logger.info("all-reduce: messages up to %.1f MiB through NVLink peer memory (%d ranks, %.1f MiB a rank)",
                    max_bytes / 2**20, world, total / 2**20)
        return cls(runtime, device, rank, world, max_bytes, programs, region, opened, addresses, max_spins)

    def fits(self, x: torch.Tensor) -> bool:
        return not self._released and fits(x, self.max_bytes)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks, as a new tensor (bitwise the same on every rank); x must fit."""
        return self._kernel.peer_all_reduce(
            x, torch.empty_like(x), self._regions, self._counters, self.status, self.rank, self.world,
            self._half, self._max_spins,
        )

    def abort(self) -> None:
        """Make every kernel waiting for a peer give up (a host write: safe from any thread, even while
        the device is stuck). The reducer is unusable afterwards."""
        self.status[self._kernel.ABORT] = 1

    @property
    def timed_out(self) -> bool:
        return bool(self.status[self._kernel.TIMED_OUT])

    @property
    def saw_abort(self) -> bool:
        return bool(self.status[self._kernel.SAW_ABORT])

    def release(self, control=None) -> None:
        """Close the peers' regions and free this rank's (once). control: the gloo group when all ranks
        release together (a normal shutdown): once every rank's stream is idle nobody reads anybody's
        buffer. Without it (a peer is gone) the kernels still waiting are aborted first."""
        if self._released:
            return
        self._released = True
        if control is None:
            self.abort()
        if not self._drain():
            logger.warning("all-reduce: the stream of %s never went idle; its peer memory stays allocated", self.device)
            return
        together = control is not None and self._barrier(control)  # nobody reads anybody's buffer now
        try:
            for ptr in self._opened:
                self._runtime.close(ptr)
        except RuntimeError as exc:  # e.g. the peer's process is gone: its memory went with it
            logger.warning("all-reduce: closing a peer's region failed (%s)", exc)
        self._opened = []
        if together:
            self._barrier(control)  # nobody maps this rank's region any more
        self._runtime.free(self._region)

    @staticmethod
    def _barrier(control) -> bool:
        try:
            dist.monitored_barrier(group=control, timeout=_RELEASE_BARRIER)
            return True
        except Exception as exc:  # a peer went away meanwhile: it reads nothing any more either
            logger.warning("all-reduce: the ranks did not release peer memory together (%s)", exc)
            return False

    def _drain(self) -> bool:
        """Wait for this rank's stream, aborting the waits in it if it takes too long (a peer that
        never comes); False if it is still busy after that (then nothing may be freed)."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        for _ in range(2):
            deadline = time.monotonic() + _DRAIN_S
            while time.monotonic() < deadline:
                if done.query():
                    return True
                time.sleep(0.005)
            self.abort()
        return done.query()

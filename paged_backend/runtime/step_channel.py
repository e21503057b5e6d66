"""How rank 0 hands each step to the tensor-parallel workers: shared memory and a pipe on one host,
gloo otherwise. Both carry the flat int32 encoding of `step_wire` (no pickling).

Shared memory (workers rank 0 spawned itself): one anonymous memory file (memfd) holds a ring of
SLOTS message slots; rank 0 writes step i into slot i % SLOTS and writes a 16-byte record (offset,
words) into each worker's notify pipe; the worker, blocked in a plain read of that pipe (no spinning:
the ranks share the host's cores with the engine), copies the message out and answers one byte on its
ack pipe. Rank 0 reuses a slot only once every worker acknowledged it; slots grow (the file is
extended, never moved under a worker) when a step does not fit. Both ends notice a vanished peer
through its pipe: EOF on read, EPIPE on write.

gloo (ranks started from outside, possibly on other hosts): the word count, then the words, as two
broadcasts over the control group into reused buffers.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from paged_backend.runtime.step_input import StepInput
from paged_backend.runtime.step_wire import decode, encode_into, wire_words

FDS_ENV = "PAGED_BACKEND_STEP_FDS"  # "memfd,notify_read,ack_write" in a spawned worker's environment
SLOTS = 4
_RECORD = struct.Struct("<qq")  # (byte offset, int32 words); words = -1: stop
_STOP = -1
_INITIAL_SLOT_BYTES = 1 << 20
_POLL_S = 0.2


def shm_available() -> bool:
    return hasattr(os, "memfd_create")


class ShmStepSender:
    """Rank 0's end. `worker_fds(i)` are the descriptors worker i inherits (pass_fds) and its
    environment entry; call `spawned()` once every worker is started."""

    def __init__(self, num_workers: int, is_dead: Callable[[], bool] = lambda: False):
        self._is_dead = is_dead
        self._mem = os.memfd_create("paged-backend-steps")
        self._notify = [os.pipe() for _ in range(num_workers)]  # (worker reads, rank 0 writes)
        self._ack = [os.pipe() for _ in range(num_workers)]  # (rank 0 reads, worker writes)
        for r, _ in self._ack:
            os.set_blocking(r, False)
        self._acked = [0] * num_workers
        self._sent = 0
        self._slot_bytes = 0
        self._grow(_INITIAL_SLOT_BYTES)

    def worker_fds(self, i: int) -> tuple[list[int], dict[str, str]]:
        fds = [self._mem, self._notify[i][0], self._ack[i][1]]
        return fds, {FDS_ENV: ",".join(map(str, fds))}

    def spawned(self) -> None:
        """Drop rank 0's copies of the workers' pipe ends: a worker's exit must close its pipes."""
        for r, _ in self._notify:
            os.close(r)
        for _, w in self._ack:
            os.close(w)
        self._notify = [(-1, w) for _, w in self._notify]
        self._ack = [(r, -1) for r, _ in self._ack]

    def send(self, step: StepInput | None) -> None:
        if step is None:
            return self._notify_all(_RECORD.pack(0, _STOP))
        words = wire_words(step)
        if words * 4 > self._slot_bytes:
            self._wait_acked(self._sent)  # nothing in flight: the slots can be laid out again
            self._grow(max(2 * self._slot_bytes, words * 4))
        slot = self._sent % SLOTS
        self._wait_acked(self._sent - SLOTS + 1)  # the step that used this slot was read by all
        encode_into(step, self._slots[slot])
        self._sent += 1
        self._notify_all(_RECORD.pack(slot * self._slot_bytes, words))

    def close(self) -> None:
        fds = [self._mem] + [fd for pair in self._notify + self._ack for fd in pair if fd >= 0]
        self._slots = []
        for fd in fds:
            os.close(fd)
        self._notify, self._ack, self._mem = [], [], -1

    def _grow(self, slot_bytes: int) -> None:
        slot_bytes = -(-slot_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        os.ftruncate(self._mem, SLOTS * slot_bytes)
        # A new mapping (the old one is freed with its views); workers map the larger file when a
        # record points past what they have mapped.
        mm = mmap.mmap(self._mem, SLOTS * slot_bytes)
        self._slots = [np.frombuffer(mm, np.int32, slot_bytes // 4, i * slot_bytes) for i in range(SLOTS)]
        self._slot_bytes = slot_bytes

    def _notify_all(self, record: bytes) -> None:
        for i, (_, w) in enumerate(self._notify):
            try:
                os.write(w, record)  # 16 bytes: atomic, and never blocks (at most SLOTS records unread)
            except BrokenPipeError:
                raise ConnectionError(f"tensor-parallel worker {i + 1} closed its step channel") from None

    def _wait_acked(self, count: int) -> None:
        while min(self._acked) < count:
            fds = [r for r, _ in self._ack]
            ready, _, _ = select.select(fds, [], [], _POLL_S)
            for i, (r, _) in enumerate(self._ack):
                if r in ready:
                    got = os.read(r, 4096)
                    if not got:
                        raise ConnectionError(f"tensor-parallel worker {i + 1} closed its step channel")
                    self._acked[i] += len(got)
            if not ready and self._is_dead():
                raise ConnectionError("a tensor-parallel worker died while rank 0 waited for it")


class ShmStepReceiver:
    """A spawned worker's end, from the descriptors in its environment."""

    def __init__(self, spec: str):
        self._mem, self._notify, self._ack = (int(x) for x in spec.split(","))
        self._words = np.empty(0, np.int32)

    def receive(self) -> StepInput | None:
        return self.read(self.wait())

    def wait(self) -> bytes:
        """Block until rank 0 sends the next message (the step profile times this apart)."""
        record = _read_exactly(self._notify, _RECORD.size)
        if record is None:
            raise ConnectionError("rank 0 closed the step channel (the engine process is gone)")
        return record

    def read(self, record: bytes) -> StepInput | None:
        offset, words = _RECORD.unpack(record)
        if words == _STOP:
            return None
        end = offset // 4 + words
        if end > self._words.size:
            self._words = np.frombuffer(mmap.mmap(self._mem, os.fstat(self._mem).st_size), np.int32)
        message = self._words[offset // 4 : end].copy()  # then the slot is rank 0's again
        os.write(self._ack, b"\x01")
        return decode(message)

    def close(self) -> None:
        self._words = np.empty(0, np.int32)
        for fd in (self._mem, self._notify, self._ack):
            os.close(fd)


def _read_exactly(fd: int, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class _GlooEnd:
    """Either end over gloo: the word count, then the words, broadcast into reused buffers."""

    def __init__(self, control):
        self._control = control
        self._size = torch.zeros(1, dtype=torch.int64)
        self._buf = torch.empty(0, dtype=torch.int32)

    def _words(self, n: int) -> torch.Tensor:
        if n > self._buf.numel():
            self._buf = torch.empty(2 * n, dtype=torch.int32)
        return self._buf[:n]


class GlooStepSender(_GlooEnd):
    def send(self, step: StepInput | None) -> None:
        buf = None if step is None else self._words(wire_words(step))
        if buf is not None:
            encode_into(step, buf.numpy())
        self._size[0] = _STOP if buf is None else buf.numel()
        dist.broadcast(self._size, src=0, group=self._control)
        if buf is not None:
            dist.broadcast(buf, src=0, group=self._control)

    def close(self) -> None:
        pass


class GlooStepReceiver(_GlooEnd):
    """The arrays of a received step are views into a reused buffer: valid until the next receive."""

    def receive(self) -> StepInput | None:
        return self.read(self.wait())

    def wait(self) -> int:
        dist.broadcast(self._size, src=0, group=self._control)
        return int(self._size[0])

    def read(self, words: int) -> StepInput | None:
        if words == _STOP:
            return None
        buf = self._words(words)
        dist.broadcast(buf, src=0, group=self._control)
        return decode(buf.numpy())


def open_receiver(control):
    """The worker's end: shared memory if rank 0 passed its descriptors, else gloo."""
    spec = os.environ.get(FDS_ENV)
    return ShmStepReceiver(spec) if spec else GlooStepReceiver(control)

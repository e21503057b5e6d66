"""How tensor-parallel workers receive steps: the flat int32 encoding keeps every model input of a real
mixed step (chunked prefill, decode, pending tokens, copy-on-write); the shared-memory channel delivers
steps in order through its slot ring, grows its slots for a step that does not fit, stops, and reports
a peer that went away instead of waiting for it. (Both ends in this process: no worker to start.)"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from paged_backend.bench.tp_transport import decode_step
from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.scheduler import Scheduler
from paged_backend.engine.sequence import Request, Sequence
from paged_backend.engine.step_builder import build_step_input
from paged_backend.params import SamplingParams
from paged_backend.runtime.step_channel import FDS_ENV, SLOTS, ShmStepReceiver, ShmStepSender, shm_available
from paged_backend.runtime.step_wire import decode, encode_into, wire_words


def _mixed_step():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, 8, 10)
    for rid, ids in (("a", list(range(3))), ("b", list(range(20, 32)))):
        sched.add(Sequence(Request(rid, None, ids, SamplingParams()), 0, ids))
    step = build_step_input(sched.schedule(), bm.table_array, bm.block_size)  # a completes, b is chunked
    return dataclasses.replace(step, block_copies=[(3, 9), (4, 11)], pending_dst=np.array([1]), pending_src=np.array([0]))


def _assert_same(got, want) -> None:
    for x, y in zip(got.int32_arrays(), want.int32_arrays()):
        assert x.shape == y.shape and np.array_equal(x, y)
    assert (got.max_query_len, got.max_seq_len, got.block_copies) == (want.max_query_len, want.max_seq_len,
                                                                       want.block_copies)


def test_wire_encoding_round_trip_and_corrupt_header():
    step = _mixed_step()
    buf = np.full(wire_words(step) + 5, -7, np.int32)
    assert encode_into(step, buf) == wire_words(step)
    _assert_same(decode(buf), step)
    buf[0] = 0
    with pytest.raises(ValueError, match="corrupt"):
        decode(buf)


def _spawned_worker_end(sender: ShmStepSender) -> ShmStepReceiver:
    """The receiving end as a spawned worker holds it: its own copies of its descriptors, rank 0's
    copies of the worker ends closed (so that the worker's exit, or rank 0's, closes the pipes)."""
    fds, env = sender.worker_fds(0)
    assert env[FDS_ENV] == ",".join(map(str, fds))
    receiver = ShmStepReceiver(",".join(str(os.dup(fd)) for fd in fds))
    sender.spawned()
    return receiver


@pytest.mark.skipif(not shm_available(), reason="needs memfd_create (Linux)")
def test_shm_channel_in_order_through_the_ring_growth_and_stop():
    sender = ShmStepSender(1)
    receiver = _spawned_worker_end(sender)
    try:
        small = [decode_step(8, seed=i) for i in range(SLOTS)]
        for s in small:  # a full ring before any is read: no wait yet
            sender.send(s)
        for s in small:
            _assert_same(receiver.receive(), s)
        big = decode_step(4096)  # ~4 MiB: more than a slot holds
        assert wire_words(big) * 4 > sender._slot_bytes
        for s in (_mixed_step(), big, small[0]):
            sender.send(s)
            _assert_same(receiver.receive(), s)
        sender.send(None)
        assert receiver.receive() is None
    finally:
        sender.close()
        receiver.close()


@pytest.mark.skipif(not shm_available(), reason="needs memfd_create (Linux)")
def test_shm_channel_notices_a_vanished_peer():
    sender = ShmStepSender(1)
    _spawned_worker_end(sender).close()  # the worker exited: its pipe ends are closed
    try:
        with pytest.raises(ConnectionError, match="worker 1 closed its step channel"):
            sender.send(decode_step(4))
    finally:
        sender.close()
    sender = ShmStepSender(1)
    receiver = _spawned_worker_end(sender)
    sender.close()  # rank 0 is gone
    with pytest.raises(ConnectionError, match="engine process is gone"):
        receiver.receive()
    receiver.close()

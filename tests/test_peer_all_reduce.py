"""The peer-memory all-reduce on the CPU: its torch twin, which messages it takes, that it stays off on
the CPU, and the Triton kernel itself through the interpreter, one rank at a time: the peers' part of
the protocol (their data in their buffers, their flags in ours) is written by hand, so the kernel's
indexing, buffer alternation, call counters, flags, abort and timeout are checked without a GPU. The
two-process runs on real GPUs are in test_peer_all_reduce_gpu.py."""

from __future__ import annotations

import pytest
import torch

from paged_backend import kernels
from paged_backend.kernels.reference import all_reduce_sum
from paged_backend.layers.parallel import TPGroup
from paged_backend.runtime import peer_memory

pytest.importorskip("triton")
PROGRAMS = 3
POLL_EVERY = 64  # the interpreter spins ~1000x slower than a GPU: poll the abort word sooner


@pytest.fixture(scope="module")
def kernel():
    return kernels._triton_module(interpret=True, name="peer_all_reduce")


class OneRank:
    """Rank `rank` of `world` with every rank's region in host memory; the peers are played by hand."""

    def __init__(self, kernel, world: int, rank: int, max_bytes: int):
        self.k, self.world, self.rank = kernel, world, rank
        self.half, total = kernel.region_layout(max_bytes, world, PROGRAMS)
        self.regions = [torch.zeros(total, dtype=torch.uint8) for _ in range(world)]
        self.table = torch.tensor([t.data_ptr() for t in self.regions], dtype=torch.int64)
        self.counters = torch.zeros(PROGRAMS, dtype=torch.int64)
        self.status = torch.zeros(kernel.STATUS_WORDS, dtype=torch.int32)

    def flags(self, r: int) -> torch.Tensor:  # [src, program] of rank r's region
        return self.regions[r][2 * self.half:].view(torch.int64).view(self.world, PROGRAMS)

    def buffer(self, r: int, call: int, like: torch.Tensor) -> torch.Tensor:
        start = (call % 2) * self.half
        return self.regions[r][start:start + like.numel() * like.element_size()].view(like.dtype).view(like.shape)

    def peers_arrive(self, call: int, parts: list[torch.Tensor]) -> None:
        for r in range(self.world):
            if r != self.rank:
                self.buffer(r, call, parts[r]).copy_(parts[r])
                self.flags(self.rank)[r] = call

    def run(self, x: torch.Tensor, max_spins: int = 0) -> torch.Tensor:
        out = torch.full_like(x, float("nan"))
        return self.k.peer_all_reduce(x, out, self.table, self.counters, self.status, self.rank, self.world,
                                      self.half, max_spins, poll_every=POLL_EVERY)


def test_reference_sums_in_fp32_in_rank_order():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(1000, generator=g).to(torch.bfloat16) * 10 ** i for i in range(3)]
    expected = ((parts[0].float() + parts[1].float()) + parts[2].float()).to(torch.bfloat16)
    assert torch.equal(all_reduce_sum(parts), expected)
    assert all_reduce_sum(parts).dtype == torch.bfloat16


@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (3, 2)])
def test_kernel_protocol_one_rank_interpreted(kernel, world, rank):
    block = kernel.BLOCK
    sim = OneRank(kernel, world, rank, max_bytes=(PROGRAMS + 1) * block * 4 + 68)
    g = torch.Generator().manual_seed(world * 10 + rank)
    # one element; a partial second chunk; more chunks than programs (program 0 loops twice)
    cases = [(1, torch.float32), (block + 1, torch.float16), ((PROGRAMS + 1) * block + 17, torch.float32),
             (2 * block, torch.float16)]
    for call, (n, dtype) in enumerate(cases, start=1):
        parts = [torch.randn(n, generator=g).to(dtype) for _ in range(world)]
        sim.peers_arrive(call, parts)
        out = sim.run(parts[rank])
        assert torch.equal(out, all_reduce_sum(parts)), f"call {call}: n={n} {dtype}"
        assert torch.equal(sim.buffer(rank, call, parts[rank]), parts[rank])  # this call's buffer
        assert sim.counters.tolist() == [call] * PROGRAMS
        for r in range(world):  # every rank (itself too) heard of this call from every program
            assert sim.flags(r)[rank].tolist() == [call] * PROGRAMS
    assert sim.status.tolist() == [0] * kernel.STATUS_WORDS


def test_kernel_gives_up_when_the_host_aborts(kernel):
    sim = OneRank(kernel, 2, 0, max_bytes=1024)
    sim.status[kernel.ABORT] = 1  # the peer never arrives
    out = sim.run(torch.ones(64))
    assert out.isnan().all()  # nothing written
    assert sim.status[kernel.SAW_ABORT] == 1 and sim.status[kernel.TIMED_OUT] == 0
    assert sim.counters.tolist() == [0] * PROGRAMS  # the call never completed


def test_kernel_gives_up_after_max_spins(kernel):
    sim = OneRank(kernel, 2, 1, max_bytes=1024)
    out = sim.run(torch.ones(64), max_spins=2 * POLL_EVERY)
    assert out.isnan().all()
    assert sim.status[kernel.TIMED_OUT] == 1 and sim.status[kernel.ABORT] == 1  # the others stop too
    assert sim.counters.tolist() == [0] * PROGRAMS


def test_size_limit(monkeypatch):
    monkeypatch.delenv(peer_memory.MAX_BYTES_ENV, raising=False)
    llama8b = 8192 * 4096 * 2
    assert peer_memory.size_limit(2, llama8b) == 32 << 20  # the cap: NCCL wins above it (measured)
    assert peer_memory.size_limit(2, 256 * 4096 * 2) == 2 << 20  # no larger than the engine's largest
    assert peer_memory.size_limit(2, 0) == 32 << 20  # hidden size unknown: the cap
    assert peer_memory.size_limit(4, llama8b) == 0  # 3+ ranks: NCCL until measured on GPUs
    assert peer_memory.size_limit(8, llama8b) == 0
    monkeypatch.setenv(peer_memory.MAX_BYTES_ENV, str(8 << 20))
    assert peer_memory.size_limit(2, llama8b) == 8 << 20
    monkeypatch.setenv(peer_memory.MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=peer_memory.MAX_BYTES_ENV):
        peer_memory.size_limit(2, llama8b)


def test_largest_message_covers_prefill_chunks_and_decode_batches():
    from paged_backend.args import EngineArgs
    from paged_backend.runtime.shard import ShardSpec

    spec = ShardSpec(EngineArgs(model="x", max_num_seqs=512), torch.bfloat16, "cuda", 4096, 256, hidden_size=4096)
    assert peer_memory.largest_message(spec) == 512 * 4096 * 2  # the decode batch is the larger here


def test_fits():
    fits = peer_memory.fits
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert fits(x, 64) and not fits(x, 63)
    assert not fits(x.t(), 1 << 20)  # not contiguous
    assert not fits(torch.zeros(0), 1 << 20)
    assert not fits(torch.zeros(4, dtype=torch.int32), 1 << 20)
    assert fits(torch.zeros(4, dtype=torch.float16), 8) and fits(torch.zeros(4), 16)


def test_off_on_the_cpu_and_with_one_rank(monkeypatch):
    """No collective runs (control=None would fail one): every rank decides alike without talking."""
    from paged_backend.args import EngineArgs
    from paged_backend.runtime.shard import ShardSpec

    spec = ShardSpec(EngineArgs(model="x"), torch.float32, "cpu", 512, 64, hidden_size=64)
    tp = TPGroup(0, 2)
    assert peer_memory.with_peer_all_reduce(tp, None, torch.device("cpu"), spec) is tp
    assert peer_memory.PeerAllReduce.create(None, 0, 1, torch.device("cuda", 0), 1 << 20) is None
    monkeypatch.setenv(peer_memory.DISABLE_ENV, "1")
    assert peer_memory.disabled()
    monkeypatch.setenv(peer_memory.DISABLE_ENV, "0")
    assert not peer_memory.disabled()

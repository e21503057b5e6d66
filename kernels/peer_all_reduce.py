"""One-shot all-reduce over GPU peer memory (NVLink), for WORLD ranks (2..8) of one host.

Why: a tensor-parallel decode step issues two all-reduces per layer of a few MiB each; NCCL's ring
pays its own latency on each. Here every rank copies its input into a buffer all ranks can read and
sums all ranks' buffers in one kernel: one read of each peer's data, one handshake per program.
For two ranks this moves the same bytes over NVLink as NCCL's ring, for more ranks (N-1)/N x 2 more,
so the caller (runtime/peer_memory.py) picks the sizes it serves.

Memory each rank owns (one allocation, "region", made peer-visible by CUDA IPC; `regions_ptr` holds
every rank's region address as mapped in *this* process, int64, cast to pointers in the kernel):

    [ buffer 0 : half_bytes ][ buffer 1 : half_bytes ][ flags : int64[WORLD, programs] ]

flags[src, p] of rank R = the last call number that program p of rank `src` announced to R.
`counters` (int64[programs], this rank's device memory, not shared) = calls program p has finished.
`status` (int32[4], page-locked HOST memory, device-visible): [abort, saw_abort, timed_out, unused].

Protocol of one call, program p (the grid is the same fixed size on every call and every rank, and
every rank makes the same calls in the same order, so call number c = counters[p] + 1 is the same
on every rank without any host-side argument: the kernel works unchanged inside CUDA graphs):
  1. copy this rank's chunks (p, p + programs, ...) of x into its own buffer c % 2;
  2. barrier of the program's threads, then release-store c into flags[RANK, p] of every rank
     (system scope: the readers are other GPUs);
  3. for every peer r: spin with acquire loads (system scope) until my flags[r, p] >= c;
  4. barrier, then out[chunk] = sum over r = 0..WORLD-1 (rank order, fp32) of buffer c % 2 of rank r:
     every rank adds the same values in the same order, so all get bitwise the same result;
  5. counters[p] = c.

Why two buffers suffice: rank A writes its buffer c % 2 in call c. A peer B last read that buffer in
call c - 2. A's call c starts only after A's whole call c - 1 ended, and A's call c - 1 waited for
B's flag c - 1, which B stores in its call c - 1, which (one stream, kernels in order) starts only
after B's call c - 2 ended: B's reads of call c - 2 are over before A overwrites. And B reading A's
buffer c % 2 after seeing flag >= c gets call c's data: A cannot reach call c + 2 (the next write of
that buffer) before B has announced c + 1, i.e. finished reading.

Abort: the spin loop reads the host's abort word every POLL_EVERY spins and gives up when it is set
(saw_abort = 1). Reads of page-locked host memory are slow enough to dominate a call: polling every
256 spins made every all-reduce take ~1 ms on two H100s (10-37 us without; measured 2026-11-28). A
healthy wait ends long before 65,536 spins, so it never polls; a wait for a dead peer polls every
few milliseconds: the host unblocks a stream
whose peer died. With max_spins > 0 a wait also gives up after about that many spins (timed_out = 1,
and it sets abort so the other programs stop too). A stopped call leaves `out` unwritten and the
call numbers out of step across ranks: the reducer is unusable afterwards (the engine is dead).

Like the other kernel modules this one calls only Triton builtins, so kernels/__init__.py can load it
under TRITON_INTERPRET=1 for the CPU tests (which stand in for the peers by hand).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements a program moves per step of its grid-stride loop (8 KiB of bf16)
NUM_WARPS = 8  # 16 bf16 per thread per step: two 16-byte vector loads in flight per rank
POLL_EVERY = 1 << 16  # spins between two reads of the host's abort word: see the module docstring
ALIGN = 256  # every buffer starts 256-byte aligned (cudaMalloc's alignment): vector loads stay legal
STATUS_WORDS = 4
ABORT, SAW_ABORT, TIMED_OUT = 0, 1, 2  # indices into `status`
_ABORT = tl.constexpr(ABORT)
_SAW_ABORT = tl.constexpr(SAW_ABORT)
_TIMED_OUT = tl.constexpr(TIMED_OUT)


def region_layout(max_bytes: int, world: int, programs: int) -> tuple[int, int]:
    """(half_bytes, total bytes) of one rank's region for messages of up to max_bytes."""
    half = -(-max_bytes // ALIGN) * ALIGN
    return half, 2 * half + world * programs * 8


@triton.jit(do_not_specialize=["max_spins"])
def _peer_all_reduce_kernel(
    x_ptr, out_ptr, n, regions_ptr, counters_ptr, status_ptr, half_bytes, max_spins,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, POLL_EVERY: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    call = tl.load(counters_ptr + pid) + 1  # int64, the same on every rank (see the module docstring)
    offset = (call % 2) * half_bytes  # this call's buffer
    flags_at = 2 * half_bytes.to(tl.int64)  # int64: 2 x half_bytes may not fit an int32
    dtype = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)

    # 1. this rank's chunks into its own peer-visible buffer. Regions are 256-byte aligned; the hint goes
    # on the pointer itself (Triton does not carry an integer's alignment through int-to-pointer), else
    # every access here would be one 2-byte load instead of 16-byte vectors.
    mine = tl.multiple_of((tl.load(regions_ptr + RANK) + offset).to(tl.pointer_type(dtype)), 16)
    for start in range(pid * BLOCK, n, programs * BLOCK):
        idx = start + offs
        m = idx < n
        tl.store(mine + idx, tl.load(x_ptr + idx, mask=m), mask=m)
    tl.debug_barrier()  # every thread's stores precede the release below

    # 2. announce call `call` of program pid to every rank (itself included: harmless, keeps one loop)
    for r in tl.static_range(WORLD):
        flags_r = (tl.load(regions_ptr + r) + flags_at).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(flags_r + RANK * programs + pid, call, sem="release", scope="sys")

    # 3. wait until every peer announced it too (or the host aborts, or max_spins pass)
    my_flags = (tl.load(regions_ptr + RANK) + flags_at).to(tl.pointer_type(tl.int64))
    stop = 0
    for r in tl.static_range(WORLD):
        if r != RANK:
            flag = my_flags + r * programs + pid
            spins = 0
            while (tl.atomic_add(flag, 0, sem="acquire", scope="sys") < call) & (stop == 0):
                spins += 1
                if spins % POLL_EVERY == 0:
                    if tl.load(status_ptr + _ABORT, volatile=True) != 0:
                        stop = 1
                        tl.store(status_ptr + _SAW_ABORT, 1)
                    elif (max_spins > 0) & (spins >= max_spins):
                        stop = 1
                        tl.store(status_ptr + _TIMED_OUT, 1)
                        tl.store(status_ptr + _ABORT, 1)  # the other programs stop at their next poll
    tl.debug_barrier()  # every thread's loads below follow the acquire

    # 4. the sum over ranks 0..WORLD-1 in fp32 (the same order on every rank), then 5. the call is done
    if stop == 0:
        for start in range(pid * BLOCK, n, programs * BLOCK):
            idx = start + offs
            m = idx < n
            acc = tl.full([BLOCK], 0.0, tl.float32)
            for r in tl.static_range(WORLD):
                buf = tl.multiple_of((tl.load(regions_ptr + r) + offset).to(tl.pointer_type(dtype)), 16)
                # .cg: through L2 only, never an L1 line left from an earlier call
                acc += tl.load(buf + idx, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(counters_ptr + pid, call)


def peer_all_reduce(
    x: torch.Tensor, out: torch.Tensor, regions: torch.Tensor, counters: torch.Tensor, status: torch.Tensor,
    rank: int, world: int, half_bytes: int, max_spins: int = 0, poll_every: int = POLL_EVERY,
) -> torch.Tensor:
    """out = the sum of x over the ranks (x contiguous, x.numel() * itemsize <= half_bytes; every rank
    calls with the same shape and dtype, in the same order). regions: int64[world] device tensor of the
    ranks' region addresses; counters: int64[programs] device tensor (its length is the grid);
    status: int32[STATUS_WORDS] page-locked host tensor. poll_every: spins between reads of the abort
    word (smaller only where spins are slow, e.g. the CPU interpreter in tests). Returns out."""
    _peer_all_reduce_kernel[(counters.numel(),)](
        x, out, x.numel(), regions, counters, status, half_bytes, max_spins,
        RANK=rank, WORLD=world, BLOCK=BLOCK, POLL_EVERY=poll_every, num_warps=NUM_WARPS,
    )
    return out

"""Which sequences run this step and how many new tokens each: continuous batching, FCFS.

Every step has a token budget. Running sequences go first (decode tokens, or the next chunk of a
long prompt); then waiting sequences join while budget, sequence slots and blocks last, a long
prompt taking only what is left of the budget (chunked prefill). When a running sequence cannot
get a block, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the queue to be recomputed later (its full blocks may still be hit in the prefix
cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    completes_prompt: bool  # after this step every known token of seq has K/V: its next token is sampled

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> "ScheduledSeq":
        return cls(seq, num_new_tokens, seq.num_computed_tokens + num_new_tokens == seq.num_total_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    block_copies: list[tuple[int, int]]  # copy-on-write (src, dst) to run before the forward
    num_preempted: int

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_forked(self, parent: Sequence, child: Sequence) -> None:
        """A sibling forked off parent: it shares parent's computed blocks and runs at once."""
        self.block_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = 0
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.pending is not None and seq.pending.is_last:  # its last token is still on the device: nothing more to compute
                i += 1
                continue
            num_new = min(seq.num_total_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate_slots(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq.of(seq, num_new))
                budget -= num_new
                i += 1

        # Admit waiting sequences only in steps without preemption: memory is short otherwise.
        # A sequence still to fork holds slots for its siblings.
        slots_used = sum(1 + s.pending_forks for s in self.running)
        while not preempted and self.waiting and budget > 0:
            seq = self.waiting[0]
            if slots_used + 1 + seq.pending_forks > self.max_num_seqs or seq.pending is not None:
                break  # (a preempted sequence waits for its last sampled token before it re-runs)
            allocated = bm.allocate_new(seq, budget)
            if allocated is None:
                break
            seq.num_computed_tokens, num_new = allocated  # a prefix-cache hit is already computed
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq.of(seq, num_new))
            budget -= num_new
            slots_used += 1 + seq.pending_forks

        return SchedulerOutput(scheduled, bm.take_pending_copies(), preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence, wherever it is."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.FINISHED

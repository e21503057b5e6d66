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


@dataclass
class SchedulerOutput:
    """The step's sequences and, index for index, how many new tokens each computes and whether that
    completes its known tokens (then its next token is sampled). Parallel lists, not one object per
    sequence: a step schedules hundreds and the host builds this every few milliseconds. Order: the
    running sequences with one new token (decodes) first, then the running prompts' next chunks, then
    the sequences admitted this step."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    completes_prompt: list[bool]
    block_copies: list[tuple[int, int]]  # copy-on-write (src, dst) to run before the forward
    num_preempted: int

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


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
        seqs: list[Sequence] = []
        num_new_tokens: list[int] = []
        completes: list[bool] = []
        preempted = 0
        bm = self.block_manager
        bs, ref_counts = bm.block_size, bm.ref_counts
        running = self.running

        # Running prompts' next chunks go after the one-token (decode) sequences, so the step's decodes
        # are one run at the front of the batch, which the attention launches as a decode batch.
        chunks: tuple[list[Sequence], list[int], list[bool]] = ([], [], [])
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            pending = seq.pending
            if pending is not None and pending.is_last:  # its last token is still on the device: nothing more to compute
                i += 1
                continue
            total = len(seq.token_ids) + (pending is not None)
            computed = seq.num_computed_tokens
            num_new = min(total - computed, budget)
            table = seq.block_table
            # (a decode token that goes into a block the sequence holds alone needs nothing allocated)
            if not (num_new == 1 and computed < len(table) * bs and ref_counts[table[computed // bs]] == 1):
                while not bm.allocate_slots(seq, num_new):
                    victim = running[-1]
                    self._preempt(victim)
                    preempted += 1
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:  # it preempted itself: nothing after it runs
                    break
            group = (seqs, num_new_tokens, completes) if num_new == 1 else chunks
            group[0].append(seq)
            group[1].append(num_new)
            group[2].append(computed + num_new == total)
            budget -= num_new
            i += 1
        seqs += chunks[0]
        num_new_tokens += chunks[1]
        completes += chunks[2]

        # Admit waiting sequences only in steps without preemption: memory is short otherwise.
        # A sequence still to fork holds slots for its siblings.
        if self.waiting and not preempted and budget > 0:
            slots_used = sum(1 + s.pending_forks for s in running)
            while self.waiting and budget > 0:
                seq = self.waiting[0]
                if slots_used + 1 + seq.pending_forks > self.max_num_seqs or seq.pending is not None:
                    break  # (a preempted sequence waits for its last sampled token before it re-runs)
                allocated = bm.allocate_new(seq, budget)
                if allocated is None:
                    break
                seq.num_computed_tokens, num_new = allocated  # a prefix-cache hit is already computed
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                running.append(seq)
                seqs.append(seq)
                num_new_tokens.append(num_new)
                completes.append(seq.num_computed_tokens + num_new == seq.num_total_tokens)
                budget -= num_new
                slots_used += 1 + seq.pending_forks

        return SchedulerOutput(seqs, num_new_tokens, completes, bm.take_pending_copies(), preempted)

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

"""A schedule -> the plain `StepInput` the runner executes (numpy, vectorised over the batch).

Per sequence it needs only a few integers (new tokens, cached tokens, table row) and the token ids
of its new tokens; a sequence whose one new token was sampled last step and is still on the device
gets a pending-token source instead of an id.
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from paged_backend.engine.scheduler import SchedulerOutput
from paged_backend.runtime.sampling_row import SamplingRow
from paged_backend.runtime.step_input import StepInput, table_width

_computed = attrgetter("num_computed_tokens")
_table_row = attrgetter("table_row")


def build_step_input(sched: SchedulerOutput, table_array: np.ndarray, block_size: int) -> StepInput:
    """The model inputs of sched, read before the step advances any sequence (num_computed_tokens
    is what is cached before this step). The engine adds the sampling rows (`with_sampling`)."""
    seqs = sched.seqs
    b = len(seqs)
    n = np.array(sched.num_new_tokens, np.int64)
    start = np.fromiter(map(_computed, seqs), np.int64, b)
    rows = np.fromiter(map(_table_row, seqs), np.int64, b)
    completes = np.array(sched.completes_prompt, bool)
    seq_lens = start + n
    max_seq_len = int(seq_lens.max())
    qsl = np.zeros(b + 1, np.int64)
    np.cumsum(n, out=qsl[1:])
    owner = np.repeat(np.arange(b), n)  # the sequence of each new token
    positions = np.arange(qsl[-1]) - qsl[owner] + start[owner]
    tables = table_array[rows, : table_width(max_seq_len, block_size)]
    slots = tables[owner, positions // block_size] * block_size + positions % block_size
    ids: list[int] = []
    pending_dst: list[int] = []
    pending_src: list[int] = []
    for seq, num_new in zip(seqs, sched.num_new_tokens):
        first = seq.num_computed_tokens
        if first < len(seq.token_ids):
            ids.extend(seq.token_ids[first : first + num_new])
        else:  # its one new token was sampled last step and is still only on the device
            pending_dst.append(len(ids))
            pending_src.append(seq.pending.row)
            ids.append(0)
    return StepInput(
        input_ids=np.array(ids),
        positions=positions,
        slot_mapping=slots,
        seq_lens=seq_lens,
        query_start_loc=qsl,
        block_tables=tables,
        logit_rows=(qsl[1:] - 1)[completes],
        pending_dst=np.array(pending_dst),
        pending_src=np.array(pending_src),
        max_query_len=int(n.max()),
        max_seq_len=max_seq_len,
        block_copies=sched.block_copies,
    )


def with_sampling(step: StepInput, rows: list[SamplingRow], sample_from: list[int], released_seeds: list[int]) -> StepInput:
    """rows / sample_from: one entry per sampled row and the logits row it reads (its index among
    the sequences that complete their known tokens, in schedule order)."""
    step.sampling_rows = rows
    step.sample_from = None if len(sample_from) == len(step.logit_rows) else np.array(sample_from, np.int64)
    step.released_seeds = released_seeds
    return step

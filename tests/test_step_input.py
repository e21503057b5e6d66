"""The plain step input the engine hands the runtime: its arrays for a mixed batch, the one
table-width rule, and that it pickles (tensor-parallel workers receive it)."""

from __future__ import annotations

import pickle

import numpy as np

from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.scheduler import Scheduler
from paged_backend.engine.sequence import PendingToken, Request, Sequence
from paged_backend.engine.step_builder import build_step_input, with_sampling
from paged_backend.params import SamplingParams
from paged_backend.runtime.sampling_row import SamplingRow
from paged_backend.runtime.step_input import table_width


def test_table_width_is_a_multiple_of_16_blocks():
    assert table_width(1, 16) == 16 and table_width(16 * 16, 16) == 16 and table_width(16 * 16 + 1, 16) == 32


def test_mixed_batch_arrays_and_pickling():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, 8, 10)
    params = SamplingParams(seed=5)
    a = Sequence(Request("a", None, list(range(3)), params), 0, list(range(3)), seed=5)
    b = Sequence(Request("b", None, list(range(20, 32)), params), 0, list(range(20, 32)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # a: 3 tokens (completes), b: the first 7 of 12 (a chunk)
    assert out.num_new_tokens == [3, 7] and out.completes_prompt == [True, False]
    step = build_step_input(out, bm.table_array, bm.block_size)
    assert step.input_ids.tolist() == [0, 1, 2, *range(20, 27)]
    assert step.positions.tolist() == [0, 1, 2, *range(7)]
    assert step.query_start_loc.tolist() == [0, 3, 10] and step.seq_lens.tolist() == [3, 7]
    assert step.logit_rows.tolist() == [2]  # only a completes its known tokens
    assert step.num_decodes == 0  # no sequence at the front computes exactly one token
    assert step.block_tables.shape == (2, 16)
    bt = a.block_table
    assert step.slot_mapping[:3].tolist() == [bt[0] * 4, bt[0] * 4 + 1, bt[0] * 4 + 2]
    row = SamplingRow(params, a.request.prompt_token_ids, [], a.seed, set(), key=a.seq_id)
    with_sampling(step, [row, row], [0, 0], released_seeds=[7])  # a sibling reads a's row too
    assert step.sample_from.tolist() == [0, 0]
    back = pickle.loads(pickle.dumps(step))
    assert all(np.array_equal(x, y) for x, y in zip(back.int32_arrays(), step.int32_arrays()))
    assert back.sampling_rows[0].seed == 5 and back.released_seeds == [7]

    # next step: a's sampled token is still on the device, b runs its last 5 prompt tokens
    a.num_computed_tokens, b.num_computed_tokens = 3, 7
    a.pending = PendingToken(step=1, row=0, is_last=False)
    nxt = build_step_input(sched.schedule(), bm.table_array, bm.block_size)
    assert nxt.pending_dst.tolist() == [0] and nxt.pending_src.tolist() == [0]
    assert nxt.positions.tolist() == [3, *range(7, 12)] and nxt.logit_rows.tolist() == [0, 5]
    assert nxt.num_decodes == 1  # a's decode, then b's chunk

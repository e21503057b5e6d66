"""The one thing the engine hands the runtime per step: plain numpy arrays and sampling rows.

Nothing in it refers to engine objects, so it can be pickled (tensor-parallel workers receive the
same step input) and the runtime never needs to import the engine. The engine builds it from a
schedule (engine/step_builder.py); the runner copies the int32 arrays to the device in one
transfer, runs the model, and samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from paged_backend.runtime.sampling_row import SamplingRow

# Table widths are multiples of this many blocks: Triton compiles a kernel variant per divisibility
# of the tables' row stride, and a width that changed with every step would keep hitting both.
TABLE_WIDTH_MULTIPLE = 16


def table_width(max_seq_len: int, block_size: int) -> int:
    """Block-table columns for sequences of up to max_seq_len tokens (the one width rule: the step
    input, the block manager's table array and the CUDA graphs' static tables all use it)."""
    blocks = -(-max_seq_len // block_size)
    return -(-blocks // TABLE_WIDTH_MULTIPLE) * TABLE_WIDTH_MULTIPLE


@dataclass
class StepInput:
    """One step as one flat varlen batch (B sequences, T new tokens, R sampled sequences).

    Token i of the batch belongs to the sequence whose [query_start_loc[b], query_start_loc[b+1])
    range holds it. A token sampled last step that the host has not read back yet is a pending
    token: input_ids holds 0 at `pending_dst` and the runner fills it on the device from row
    `pending_src` of the previous step's sampled ids.
    """

    input_ids: np.ndarray  # [T] int32 (0 where a pending token goes)
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T] cache slot of each new token
    seq_lens: np.ndarray  # [B] context length after this step (cached + new)
    query_start_loc: np.ndarray  # [B+1] cumulative new-token counts
    block_tables: np.ndarray  # [B, width] with width = table_width(max_seq_len, block_size)
    logit_rows: np.ndarray  # [R] batch index of the last token of each sequence that samples
    pending_dst: np.ndarray  # [P] batch index of each pending token
    pending_src: np.ndarray  # [P] its row in the previous step's sampled ids
    max_query_len: int
    max_seq_len: int
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) first
    # One per sampled row; several rows may read one logits row (n > 1 siblings forked this step).
    sampling_rows: list[SamplingRow] = field(default_factory=list)
    sample_from: np.ndarray | None = None  # [S] index into logit_rows of each sampling row; None: identity
    released_seeds: list[int] = field(default_factory=list)  # seed keys of sequences that ended

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_decodes(self) -> int:
        """How many sequences at the front of the batch compute exactly one new token (the scheduler
        puts the decodes first): the attention runs them as a decode batch."""
        if self.max_query_len == 1:
            return self.num_seqs
        return int(np.argmin(np.diff(self.query_start_loc) == 1))  # the first sequence with more

    def int32_arrays(self) -> list[np.ndarray]:
        """The arrays the runner copies to the device in one transfer, in a fixed order."""
        return [self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.query_start_loc,
                self.block_tables, self.logit_rows, self.pending_dst, self.pending_src]

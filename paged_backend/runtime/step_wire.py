"""A step input as the tensor-parallel workers receive it: one flat int32 buffer, no pickle.

The workers need only the model inputs of a step (rank 0 alone samples), all of them int32 arrays
plus two bounds, so a step travels as a small int32 header followed by the arrays back to back.
Encoding is a handful of numpy copies into a caller-given buffer (a shared-memory slot or a gloo
tensor); decoding returns numpy views into the received buffer, with no Python object per token or
sequence, which is what pickling a `StepInput` costs at hundreds of sequences.

Layout (int32): header[HEADER] = MAGIC, T tokens, B sequences, W table width, R logit rows,
P pending tokens, C block copies, max_query_len, max_seq_len, then input_ids[T], positions[T],
slot_mapping[T], seq_lens[B], query_start_loc[B+1], block_tables[B*W], logit_rows[R],
pending_dst[P], pending_src[P], block_copies[2C] (src, dst pairs).
"""

from __future__ import annotations

import numpy as np

from paged_backend.runtime.step_input import StepInput

HEADER = 16  # int32 words; room to spare keeps the arrays 64-byte aligned
MAGIC = 0x53544550  # "STEP": a buffer that is not a step (a protocol mix-up) fails loudly


def _counts(step: StepInput) -> tuple[int, ...]:
    t, (b, w) = step.input_ids.size, step.block_tables.shape
    return t, b, w, step.logit_rows.size, step.pending_dst.size, len(step.block_copies)


def wire_words(step: StepInput) -> int:
    """int32 words `encode_into` writes for step."""
    t, b, w, r, p, c = _counts(step)
    return HEADER + 3 * t + 2 * b + 1 + b * w + r + 2 * p + 2 * c


def encode_into(step: StepInput, out: np.ndarray) -> int:
    """Write step's model inputs into out (int32, at least `wire_words(step)` long); returns the words
    written. Sampling rows, sample_from and released seeds are not sent: workers never sample."""
    t, b, w, r, p, c = _counts(step)
    out[:HEADER] = 0
    out[:9] = (MAGIC, t, b, w, r, p, c, step.max_query_len, step.max_seq_len)
    pos = HEADER
    for a in (step.input_ids, step.positions, step.slot_mapping, step.seq_lens, step.query_start_loc,
              step.block_tables, step.logit_rows, step.pending_dst, step.pending_src):
        n = a.size
        out[pos : pos + n] = a.reshape(-1)
        pos += n
    if c:
        out[pos : pos + 2 * c] = np.asarray(step.block_copies, dtype=np.int32).reshape(-1)
        pos += 2 * c
    return pos


def decode(buf: np.ndarray) -> StepInput:
    """The step in buf (int32, as `encode_into` wrote it); its arrays are views into buf."""
    if buf.size < HEADER or int(buf[0]) != MAGIC:
        raise ValueError("a tensor-parallel step message is corrupt (bad header): rank 0 and the worker disagree")
    t, b, w, r, p, c, max_query_len, max_seq_len = (int(x) for x in buf[1:9])
    pos = HEADER

    def take(n: int) -> np.ndarray:
        nonlocal pos
        pos += n
        return buf[pos - n : pos]

    input_ids, positions, slots = take(t), take(t), take(t)
    seq_lens, qsl = take(b), take(b + 1)
    tables = take(b * w).reshape(b, w)
    logit_rows, pending_dst, pending_src = take(r), take(p), take(p)
    copies = [tuple(pair) for pair in take(2 * c).reshape(c, 2).tolist()]
    return StepInput(
        input_ids=input_ids, positions=positions, slot_mapping=slots, seq_lens=seq_lens, query_start_loc=qsl,
        block_tables=tables, logit_rows=logit_rows, pending_dst=pending_dst, pending_src=pending_src,
        max_query_len=max_query_len, max_seq_len=max_seq_len, block_copies=copies,
    )

"""Where each constrained sequence stands in its grammar, and the step's token bitmask.

A ``SequenceGrammar`` follows one sequence's generated tokens. It is synced to the sequence's
output (``follow``) rather than fed token by token, so whatever the engine does with a sequence —
a token dropped after a stop, a preemption that recomputes — the matcher ends where the tokens
are: it rolls back what the sequence no longer has and accepts what it has not seen.

The bitmask is plain numpy (int32, one bit per token of the model's vocabulary, 1 = allowed), one
row per logits row: the runtime hands the engine its buffer (page-locked on a GPU), the engine fills
the constrained rows in place, the runtime applies them to the logits on their device.
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

import numpy as np
import xgrammar as xgr


class SequenceGrammar:
    def __init__(self, compiled: xgr.CompiledGrammar):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.accepted: list[int] = []  # the output tokens the matcher has consumed, in order
        self.rejected = False  # a token the grammar does not allow reached it (should not happen)
        # The grammar is complete and its stop token accepted: nothing more may follow. Kept here
        # rather than asked of the matcher each time: only accepting a stop token can change it.
        self.terminated = False
        self._stop = frozenset(self.matcher.stop_token_ids)

    def follow(self, token_ids: Sequence[int], start: int = 0, pending: Optional[int] = None) -> bool:
        """Bring the matcher to the end of the output token_ids[start:] (+ [pending] when given);
        False if a token is not allowed.

        A sequence's tokens only ever grow, so in the usual case (the accepted tokens are a prefix of
        the output: its last one is where it should be) this costs only the new tokens, not the whole
        output: it runs for every constrained row twice a step.
        """
        if self.synced(token_ids, start, pending):
            return True  # nothing new (post-processing, after the mask fill took the pending token)
        acc = self.accepted
        n_acc = len(acc)
        n_out = len(token_ids) - start + (pending is not None)

        def at(i: int) -> int:  # output token i
            return pending if start + i == len(token_ids) else token_ids[start + i]

        if n_acc > n_out or (n_acc and at(n_acc - 1) != acc[-1]):
            common = 0  # something was dropped or replaced: roll back to the common prefix
            while common < min(n_acc, n_out) and acc[common] == at(common):
                common += 1
            self.matcher.rollback(n_acc - common)
            del acc[common:]
            self.terminated = self.matcher.is_terminated()
        for i in range(len(acc), n_out):
            token = at(i)
            if not self.took(token, not self.terminated and self.matcher.accept_token(token)):
                return False
        return True

    def synced(self, token_ids: Sequence[int], start: int = 0, pending: Optional[int] = None) -> bool:
        """Whether the matcher already stands at the end of the output (as in `follow`): `follow`
        then returns at once without touching the matcher."""
        acc = self.accepted
        n_acc = len(acc)
        return n_acc == len(token_ids) - start + (pending is not None) and (
            not n_acc or acc[-1] == (token_ids[-1] if pending is None else pending)
        )

    def lacks_one(self, token_ids: Sequence[int], start: int, pending: Optional[int]) -> Optional[int]:
        """The output's last token (as in `follow`) when it is all the matcher lacks — every step's
        usual case, which `accept_each` then does for many rows at once — else None."""
        acc = self.accepted
        n = len(acc)
        if self.terminated or n + 1 != len(token_ids) - start + (pending is not None):
            return None
        if n and token_ids[start + n - 1] != acc[-1]:
            return None
        return token_ids[-1] if pending is None else pending

    def took(self, token: int, ok: bool) -> bool:
        """Record the matcher's answer to token (accepted or not); returns ok."""
        if not ok:
            self.rejected = True
            return False
        self.accepted.append(token)
        self.terminated = token in self._stop and self.matcher.is_terminated()
        return True


def accept_each(grammars: list[SequenceGrammar], tokens: list[int]) -> list[bool]:
    """grammars[i] accepts tokens[i], for every i in one call; whether each was allowed."""
    oks = xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g in grammars], tokens)
    return [g.took(t, ok) for g, t, ok in zip(grammars, tokens, oks)]


def bitmask_width(vocab_size: int) -> int:
    return xgr.get_bitmask_shape(1, vocab_size)[1]


def _num_threads() -> int:
    """The cores this process may run on (xgrammar's default, half the machine's hardware threads,
    counts cores outside a container's CPU set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # (no sched_getaffinity: macOS, Windows)
        return max(1, os.cpu_count() or 1)


class BitmaskFiller:
    """Fills the bitmask rows of a step's constrained sequences (in parallel threads for many)."""

    def __init__(self, vocab_size: int):
        self.width = bitmask_width(vocab_size)
        self._batch = xgr.BatchGrammarMatcher(max_threads=_num_threads())

    def fill(self, grammars: list[SequenceGrammar], out: np.ndarray, rows: list[int]) -> None:
        """Row rows[i] of out (int32, [>= max(rows) + 1, width]) gets grammars[i]'s mask; the other
        rows are left as they are (the mask is applied to the listed rows only)."""
        if out.shape[1] != self.width or out.dtype != np.int32:
            raise ValueError(f"bitmask buffer must be int32 [rows, {self.width}], got {out.dtype} {out.shape}")
        if len(grammars) == 1:
            grammars[0].matcher.fill_next_token_bitmask(out, rows[0])
        else:
            self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], out, rows)


class MaskFill:
    """One step's `BitmaskFiller.fill` running in its own thread while the caller does other host
    work; `join` waits for it and re-raises what it raised.

    A thread per fill rather than a persistent worker: `start` returns only once the new thread is
    running, and it holds the GIL until xgrammar's fill releases it microseconds later, so the fill
    begins at once. A worker woken from a queue would instead wait for the GIL while the caller runs
    Python (up to the interpreter's 5 ms switch interval), which made an earlier version slower than
    no overlap at all."""

    def __init__(self, filler: BitmaskFiller, grammars: list[SequenceGrammar], out: np.ndarray, rows: list[int]):
        self._ids = {id(g) for g in grammars}
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(
            target=self._run, args=(filler, grammars, out, rows), name="paged-backend-mask-fill", daemon=True
        )
        self._thread.start()

    def _run(self, filler, grammars, out, rows) -> None:
        try:
            filler.fill(grammars, out, rows)
        except BaseException as exc:  # re-raised on the engine's thread by join
            self._error = exc

    def uses(self, grammar: SequenceGrammar) -> bool:
        return id(grammar) in self._ids

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

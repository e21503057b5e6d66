"""Where each constrained sequence stands in its grammar, and the step's token bitmask.

A ``SequenceGrammar`` follows one sequence's generated tokens. It is synced to the sequence's
output (``follow``) rather than fed token by token, so whatever the engine does with a sequence —
a token dropped after a stop, a preemption that recomputes — the matcher ends where the tokens
are: it rolls back what the sequence no longer has and accepts what it has not seen.

The bitmask is plain numpy (int32, one bit per token of the model's vocabulary, 1 = allowed):
the engine fills it on the host, the runtime applies it to the logits on their device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xgrammar as xgr


class SequenceGrammar:
    def __init__(self, compiled: xgr.CompiledGrammar):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.accepted: list[int] = []  # the output tokens the matcher has consumed, in order
        self.rejected = False  # a token the grammar does not allow reached it (should not happen)

    def follow(self, output_token_ids: Sequence[int]) -> bool:
        """Bring the matcher to the end of output_token_ids; False if a token is not allowed."""
        acc = self.accepted
        common = 0
        limit = min(len(acc), len(output_token_ids))
        while common < limit and acc[common] == output_token_ids[common]:
            common += 1
        if common < len(acc):
            self.matcher.rollback(len(acc) - common)
            del acc[common:]
        for token in output_token_ids[common:]:
            if self.matcher.is_terminated() or not self.matcher.accept_token(token):
                self.rejected = True
                return False
            acc.append(token)
        return True

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token accepted: nothing more may follow."""
        return self.matcher.is_terminated()


def bitmask_width(vocab_size: int) -> int:
    return xgr.get_bitmask_shape(1, vocab_size)[1]


class BitmaskFiller:
    """Fills one bitmask row per constrained sequence of a step (in parallel threads for many)."""

    def __init__(self, vocab_size: int):
        self.width = bitmask_width(vocab_size)
        self._batch = xgr.BatchGrammarMatcher()

    def fill(self, grammars: list[SequenceGrammar]) -> np.ndarray:
        bitmask = np.empty((len(grammars), self.width), dtype=np.int32)
        if len(grammars) == 1:
            grammars[0].matcher.fill_next_token_bitmask(bitmask, 0)
        else:
            self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)
        return bitmask

"""The engine's side of structured outputs: requests wait for their grammar, rows get their mask.

A constrained request is held here, outside the scheduler's queue, until its grammar has compiled
(so the scheduler never has to skip it, and nothing else waits for it). Each constrained sequence
gets its own matcher the first time it is sampled — forked siblings included — and the matcher
follows the sequence's output tokens after every appended token.

The step's masks are filled in a worker thread while the engine post-processes the previous step
(xgrammar's fill releases the GIL): between the start of a fill and its join the worker owns the
matchers it fills, and nothing else touches them (see `bitmask`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import Optional

import numpy as np

from paged_backend.structured.compiler import GrammarCompiler
from paged_backend.structured.matcher import BitmaskFiller, MaskFill, SequenceGrammar, accept_each
from paged_backend.structured.spec import StructuredOutputs

logger = logging.getLogger("paged_backend")


class StructuredRequests:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        self.compiler = GrammarCompiler(tokenizer, vocab_size, list(stop_token_ids))
        self._filler: Optional[BitmaskFiller] = None
        self._filling: Optional[MaskFill] = None  # the fill running while the engine post-processes
        self.compiling: list = []  # sequences whose grammar is not compiled yet

    def submit(self, spec: Optional[StructuredOutputs]) -> Optional[cf.Future]:
        """The compiled grammar's future (ValueError now if the spec is bad), None if unconstrained."""
        return None if spec is None else self.compiler.submit(spec)

    def hold(self, seq) -> bool:
        """Keep seq back while its grammar compiles; False if it may be scheduled now."""
        future = seq.request.grammar
        if future is None or (future.done() and future.exception() is None):
            return False
        self.compiling.append(seq)
        return True

    def take_ready(self, wait_s: float = 0.0) -> tuple[list, list]:
        """(sequences whose grammar is ready, sequences whose grammar failed to compile); waits up
        to wait_s for one to finish compiling when none has (the engine has nothing else to do)."""
        if wait_s and self.compiling and not any(s.request.grammar.done() for s in self.compiling):
            cf.wait({s.request.grammar for s in self.compiling}, timeout=wait_s, return_when=cf.FIRST_COMPLETED)
        ready, failed, still = [], [], []
        for seq in self.compiling:
            if seq.finished:  # aborted while it waited
                continue
            future = seq.request.grammar
            if not future.done():
                still.append(seq)
            elif future.exception() is not None:
                logger.error("request %s: its grammar did not compile: %s", seq.request.request_id, future.exception())
                failed.append(seq)
            else:
                ready.append(seq)
        self.compiling = still
        return ready, failed

    def _grammar(self, seq) -> SequenceGrammar:
        if seq.grammar is None:
            seq.grammar = SequenceGrammar(seq.request.grammar.result())
        return seq.grammar

    @staticmethod
    def any(row_seqs: list) -> bool:
        return any(seq.request.grammar is not None for seq in row_seqs)

    def bitmask(self, row_seqs: list, pending_token, out: np.ndarray, meanwhile=None) -> Optional[list[int]]:
        """Fill row i of out (int32 [len(row_seqs), width]) with row_seqs[i]'s mask for each
        constrained row; the rows filled (None if there are none).

        pending_token(seq): the token seq sampled last step that the host has not appended yet, or
        None. Asking for it waits only for last step's sampling, not for this step's forward pass
        (already launched): the host fills the masks while the device computes the logits.

        meanwhile(): host work to run while the masks are filled (the engine post-processes the step
        whose tokens were just synced here); the fill then runs in the worker thread, joined before
        this returns. meanwhile must not touch the matchers being filled: `follow` of a row synced
        here does not (its matcher already has the token, nothing is new); a row that ends in
        meanwhile keeps its filled mask row, which its dropped sample alone reads.
        """
        grammars, live = self._sync(row_seqs, pending_token)
        if not live:
            if meanwhile is not None:
                meanwhile()
            return None
        if self._filler is None:
            self._filler = BitmaskFiller(self.compiler.vocab_size)
        if meanwhile is None:
            self._filler.fill(grammars, out, live)
            return live
        self._filling = MaskFill(self._filler, grammars, out, live)
        try:
            meanwhile()
        finally:
            self._join_fill()  # (also when meanwhile raised: the worker lets go of the matchers first)
        return live

    def _join_fill(self) -> None:
        filling, self._filling = self._filling, None
        if filling is not None:
            filling.join()

    def _sync(self, row_seqs: list, pending_token) -> tuple[list[SequenceGrammar], list[int]]:
        """Bring each constrained row's matcher to its output + pending token; (the matchers that go
        on, their rows)."""
        grammars, live = [], []
        one_behind, tokens, rows = [], [], []
        for i, seq in enumerate(row_seqs):
            if seq.request.grammar is None:
                continue
            g = seq.grammar or self._grammar(seq)
            pending = pending_token(seq)
            token = g.lacks_one(seq.token_ids, seq.num_prompt_tokens, pending)
            if token is not None:  # the usual case: accepted below, every such row in one call
                one_behind.append(g)
                tokens.append(token)
                rows.append(i)
            elif g.follow(seq.token_ids, seq.num_prompt_tokens, pending) and not g.terminated:
                grammars.append(g)
                live.append(i)
            # else: its last token ends it (or breaks the grammar): what it samples now is dropped
        if one_behind:
            for g, ok, i in zip(one_behind, accept_each(one_behind, tokens), rows):
                if ok and not g.terminated:
                    grammars.append(g)
                    live.append(i)
        return grammars, live

    def follow(self, seq) -> Optional[str]:
        """Advance seq's matcher over its newest token: "stop" once the grammar has ended (its stop
        token accepted), "abort" if the token breaks the grammar, None otherwise."""
        g = self._grammar(seq)
        if self._filling is not None and self._filling.uses(g) and not g.synced(seq.token_ids, seq.num_prompt_tokens):
            self._join_fill()  # (never in practice: a row being filled was synced before its fill began)
        if not g.follow(seq.token_ids, seq.num_prompt_tokens):
            logger.error("request %s: sampled token %d is outside its grammar", seq.request.request_id, seq.token_ids[-1])
            return "abort"
        return "stop" if g.terminated else None

    def shutdown(self) -> None:
        self.compiler.shutdown()
        self._join_fill()
        self.compiling = []

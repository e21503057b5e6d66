"""The engine's side of structured outputs: requests wait for their grammar, rows get their mask.

A constrained request is held here, outside the scheduler's queue, until its grammar has compiled
(so the scheduler never has to skip it, and nothing else waits for it). Each constrained sequence
gets its own matcher the first time it is sampled — forked siblings included — and the matcher
follows the sequence's output tokens after every appended token.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import Optional

import numpy as np

from paged_backend.structured.compiler import GrammarCompiler
from paged_backend.structured.matcher import BitmaskFiller, SequenceGrammar, accept_each
from paged_backend.structured.spec import StructuredOutputs

logger = logging.getLogger("paged_backend")


class StructuredRequests:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        self.compiler = GrammarCompiler(tokenizer, vocab_size, list(stop_token_ids))
        self._filler: Optional[BitmaskFiller] = None
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

    def bitmask(self, row_seqs: list, pending_token, out: np.ndarray) -> Optional[list[int]]:
        """Fill row i of out (int32 [len(row_seqs), width]) with row_seqs[i]'s mask for each
        constrained row; the rows filled (None if there are none).

        pending_token(seq): the token seq sampled last step that the host has not appended yet, or
        None. Asking for it waits only for last step's sampling, not for this step's forward pass
        (already launched): the host fills the masks while the device computes the logits.
        """
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
        if not live:
            return None
        if self._filler is None:
            self._filler = BitmaskFiller(self.compiler.vocab_size)
        self._filler.fill(grammars, out, live)
        return live

    def follow(self, seq) -> Optional[str]:
        """Advance seq's matcher over its newest token: "stop" once the grammar has ended (its stop
        token accepted), "abort" if the token breaks the grammar, None otherwise."""
        g = self._grammar(seq)
        if not g.follow(seq.token_ids, seq.num_prompt_tokens):
            logger.error("request %s: sampled token %d is outside its grammar", seq.request.request_id, seq.token_ids[-1])
            return "abort"
        return "stop" if g.terminated else None

    def shutdown(self) -> None:
        self.compiler.shutdown()
        self.compiling = []

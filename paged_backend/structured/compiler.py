"""Grammars for constrained requests: checked when a request is added, compiled off the step loop.

Turning a spec into an xgrammar ``Grammar`` (JSON schema -> EBNF, regex -> EBNF, EBNF parsing) is
fast and is where bad input shows, so it runs in ``add_request`` and raises ValueError there. The
slow part — compiling the grammar against the vocabulary (the per-token mask tables: tens of ms
for a 49k vocabulary, more for 128k) — runs in one background thread; the request waits until its
future is done and every other request keeps running meanwhile. Compiled grammars are cached per
distinct spec (``StructuredOutputs.key``), so a schema shared by many requests compiles once.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import xgrammar as xgr

from paged_backend.structured.spec import StructuredOutputs

# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: "; the user needs only the rest.
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
_CACHE_SIZE = 512


def xgrammar_message(e: Exception) -> str:
    return _XGR_PREFIX.sub("", str(e)).strip()


def build_grammar(spec: StructuredOutputs) -> xgr.Grammar:
    """The spec as an xgrammar Grammar; ValueError naming the field when it does not convert."""
    kind = spec.kind
    try:
        if kind == "json":
            # Compact JSON: a weak model given free whitespace can emit newlines until max_tokens.
            return xgr.Grammar.from_json_schema(json.dumps(spec.json), any_whitespace=False)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        return xgr.Grammar.from_ebnf(spec.grammar)
    except RuntimeError as e:  # xgrammar reports every conversion failure as RuntimeError
        raise ValueError(f"structured_outputs.{kind} is not usable: {xgrammar_message(e)}") from None


class GrammarCompiler:
    """Compiles specs for one tokenizer; ``submit`` returns a future of an ``xgr.CompiledGrammar``."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the model's (logits width), which may exceed the tokenizer's
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: Optional[xgr.GrammarCompiler] = None  # built on first use, in the thread
        self._pool: Optional[ThreadPoolExecutor] = None
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def submit(self, spec: StructuredOutputs) -> Future:
        """Validate now (ValueError), compile in the background (or reuse the cached result)."""
        key = spec.key
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        grammar = build_grammar(spec)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="paged-backend-grammar")
        future = self._pool.submit(self._compile, grammar)
        self._cache[key] = future
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return future

    def _compile(self, grammar: xgr.Grammar) -> xgr.CompiledGrammar:
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler.compile_grammar(grammar)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

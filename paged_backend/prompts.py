"""Prompts (text, token ids or a conversation) as the engine's token ids, refusing what cannot fit
before tokenising it. The facades call this on the caller's thread, off the engine's lock.

Tokenising a multi-megabyte text takes seconds only to learn that it is too long. A text of C
characters has at least C / k tokens when no token stands for more than k characters of the input,
so C > k * max_model_len proves the prompt too long without tokenising it. k is the longest vocabulary
entry (its stored form is never shorter than the text it matches: byte-level BPE stores one char per
byte, SentencePiece one char per char, byte-fallback and WordPiece pieces are longer), times how
much the tokenizer's normaliser can shrink the text. Tokenizers that can drop characters outright
(whitespace-splitting pre-tokenizers, accent or control-char stripping, an unknown-token that swallows
a whole run or word) have no such k: for them nothing is refused before tokenising.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from paged_backend.chat import render_chat_text

# Normalisers that never shrink the text, and by how much the others can at most: canonical
# composition (NFC/NFKC) merges at most 4 code points into one (the longest canonical decomposition).
_NORMALIZER_SHRINK = {"Prepend": 1, "NFD": 1, "NFKD": 1, "Lowercase": 1, "NFC": 4, "NFKC": 4}
# Pre-tokenizers that split without removing anything.
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"}


def max_chars_per_token(tokenizer) -> Optional[int]:
    """An upper bound on the characters of prompt text one token can stand for; None if there is none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: its rules are not inspectable
        return None
    shrink = _normalizer_shrink(_state(backend.normalizer))
    if shrink is None or not _pre_tokenizer_keeps_text(_state(backend.pre_tokenizer)):
        return None
    model = _state(backend.model)
    if model.get("type") != "BPE":  # WordPiece/WordLevel map a whole word to [UNK]; Unigram fuses unknowns
        return None
    if model.get("unk_token") is not None and model.get("fuse_unk") and not model.get("byte_fallback"):
        return None  # a run of unknown characters of any length becomes one token
    return shrink * max(len(piece) for piece in tokenizer.get_vocab())


def check_prompt_chars(text: str, max_model_len: int, chars_per_token: Optional[int]) -> None:
    """ValueError if text is certainly longer than max_model_len tokens (see the module docstring)."""
    if chars_per_token is not None and len(text) > chars_per_token * max_model_len:
        raise ValueError(
            f"prompt has {len(text)} characters, more than max_model_len={max_model_len} tokens can hold "
            f"(a token of this tokenizer covers at most {chars_per_token} characters): shorten it or raise max_model_len"
        )


def check_prompt_tokens(num_tokens: int, max_model_len: int) -> None:
    if num_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {num_tokens} tokens but max_model_len is {max_model_len}; the prompt "
            f"must leave room for at least one generated token: shorten it or raise max_model_len"
        )


def prompt_from_dict(prompt: dict) -> Union[str, list[int]]:
    """vLLM's prompt dicts: {"prompt": text} (TextPrompt) or {"prompt_token_ids": ids} (TokensPrompt)."""
    keys = set(prompt)
    if keys == {"prompt"} and isinstance(prompt["prompt"], str):
        return prompt["prompt"]
    if keys == {"prompt_token_ids"} and isinstance(prompt["prompt_token_ids"], (list, tuple)):
        return list(prompt["prompt_token_ids"])
    extra = sorted(keys - {"prompt", "prompt_token_ids"})
    raise TypeError(
        "a prompt dict must be {'prompt': str} or {'prompt_token_ids': list of ints}"
        + (f"; unsupported key(s): {', '.join(map(repr, extra))}" if extra else f"; got keys {sorted(keys)}")
    )


class PromptPreparer:
    """(text, token ids) of prompts for one engine; safe to call from any thread (reads the tokenizer only)."""

    def __init__(self, engine):
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.chars_per_token = max_chars_per_token(engine.tokenizer)

    def prompt(self, prompt: Union[str, list[int], dict]) -> tuple[Optional[str], Any]:
        if isinstance(prompt, dict):
            prompt = prompt_from_dict(prompt)
        if isinstance(prompt, str):
            check_prompt_chars(prompt, self.max_model_len, self.chars_per_token)
            text, ids = self.engine.tokenize(prompt)
            check_prompt_tokens(len(ids), self.max_model_len)
            return text, ids
        if isinstance(prompt, (list, tuple)):  # the engine checks the ids themselves when adding them
            check_prompt_tokens(len(prompt), self.max_model_len)
        return None, prompt

    def chat(self, conversation: Any, add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template: Optional[str] = None, tools: Optional[list[dict]] = None) -> tuple[str, list[int]]:
        """A conversation through the chat template, tokenised without adding special tokens again: the
        template wrote them (as transformers' apply_chat_template does)."""
        tokenizer = self.engine.tokenizer
        text = render_chat_text(tokenizer, conversation, add_generation_prompt, continue_final_message, chat_template,
                                tools)
        check_prompt_chars(text, self.max_model_len, self.chars_per_token)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        check_prompt_tokens(len(ids), self.max_model_len)
        return text, ids


def _state(component) -> Optional[dict]:
    return None if component is None else json.loads(component.__getstate__())


def _normalizer_shrink(n: Optional[dict]) -> Optional[int]:
    if n is None:
        return 1
    kind = n.get("type")
    if kind == "Sequence":
        total = 1
        for part in n["normalizers"]:
            factor = _normalizer_shrink(part)
            if factor is None:
                return None
            total *= factor
        return total
    if kind == "Replace":  # a literal pattern replaced by a non-empty string shrinks by at most their ratio
        pattern, content = n.get("pattern", {}).get("String"), n.get("content") or ""
        if pattern is None or not content:
            return None
        return max(1, -(-len(pattern) // len(content)))
    return _NORMALIZER_SHRINK.get(kind)


def _pre_tokenizer_keeps_text(p: Optional[dict]) -> bool:
    if p is None:
        return True
    kind = p.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps_text(part) for part in p["pretokenizers"])
    if kind == "Split":
        return p.get("behavior") != "Removed"
    return kind in _KEEPING_PRE_TOKENIZERS

"""Incremental detokenization with stop strings.

Each update decodes only a small window of token ids: the text of ids[prefix_offset:] minus the text
of ids[prefix_offset:read_offset]. The window starts inside the prompt, so the first generated
token gets the spacing it has in context (what `pipeline(...)` returns as the continuation), and
a token that ends inside a multi-byte character waits until the character is complete.

A sequence with stop strings is decoded after every token (the stop check reads the text). Any
other sequence is decoded only when its text is wanted (an output is built, or it ends): one
update then covers every token since the last one, which at hundreds of sequences a step saves
the engine's loop a quarter of its time when outputs are not streamed.
"""

from __future__ import annotations

from dataclasses import dataclass

from paged_backend.engine.sequence import Sequence

_PROMPT_CONTEXT_TOKENS = 5


@dataclass
class DecodeState:
    """One sequence's text so far and where decoding and streaming stand (written only here)."""

    prefix_offset: int
    read_offset: int
    text: str = ""
    emitted_text_len: int = 0  # characters already handed out as deltas
    emitted_token_len: int = 0
    done: bool = False  # the sequence ended: its text is final


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Fast tokenizers: call the Rust decoder directly (the Python wrapper costs more than the
        # decoding itself at hundreds of sequences a step), with the same clean-up as decode().
        self._backend = getattr(tokenizer, "_tokenizer", None)
        self._cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))

    def start(self, seq: Sequence) -> None:
        n = seq.num_prompt_tokens
        seq.detok = DecodeState(prefix_offset=max(0, n - _PROMPT_CONTEXT_TOKENS), read_offset=n)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self._backend is None:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.clean_up_tokenization(text) if self._cleanup else text

    def update(self, seq: Sequence, end: int | None = None) -> str | None:
        """Decode seq's tokens not decoded yet (those before `end` only, if given) into seq.text.
        Returns the stop string that ends seq, if any. Nothing once the sequence's text is final."""
        ids, st = seq.token_ids, seq.detok
        end = len(ids) if end is None else end
        if st.done or st.read_offset >= end:
            return None
        skip = seq.params.skip_special_tokens
        prefix_text = self._decode(ids[st.prefix_offset : st.read_offset], skip)
        new_text = self._decode(ids[st.prefix_offset : end], skip)
        old_len = len(st.text)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            st.text += new_text[len(prefix_text) :]
            st.prefix_offset, st.read_offset = st.read_offset, end
        return self._check_stop(seq, old_len)

    def finish(self, seq: Sequence, drop_last: bool = False) -> None:
        """seq ended: decode what is left (without its last token when that token is a stop token
        not shown in the text), then keep the text as it is."""
        self.update(seq, len(seq.token_ids) - 1 if drop_last else None)
        seq.detok.done = True

    def _check_stop(self, seq: Sequence, old_len: int) -> str | None:
        params, st = seq.params, seq.detok
        stops = params.stop_strings
        if not stops or len(st.text) == old_len or seq.num_output_tokens < params.min_tokens:
            return None
        longest = max(len(s) for s in stops)
        search_from = max(0, old_len - longest + 1)
        best: tuple[int, str] | None = None
        for s in stops:
            idx = st.text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        st.text = st.text[: idx + len(s)] if params.include_stop_str_in_output else st.text[:idx]
        return s

    def take_delta(self, seq: Sequence) -> tuple[str, list[int]]:
        """Text and token ids produced since the last call (the tokens not decoded yet are decoded
        first). While seq runs, the last characters that could still turn out to start a stop
        string are held back."""
        self.update(seq)
        stops, st = seq.params.stop_strings, seq.detok
        hold = 0 if seq.finished or not stops else max(len(s) for s in stops) - 1
        end = max(st.emitted_text_len, len(st.text) - hold)
        text = st.text[st.emitted_text_len : end]
        st.emitted_text_len = end
        ids = seq.token_ids[seq.num_prompt_tokens + st.emitted_token_len :]
        st.emitted_token_len = seq.num_output_tokens
        return text, ids

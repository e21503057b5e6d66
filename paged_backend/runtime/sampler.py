"""The sampler: from the last-token logits of each running sequence to one new token per sequence.

Order of operations (vLLM's): min_tokens mask (EOS + stop_token_ids -> -inf) -> repetition penalty
(prompt + output tokens) -> presence / frequency penalties (output tokens) -> greedy rows take the
argmax here -> temperature -> top-k -> top-p -> min-p -> softmax -> sample.

Everything is one batched pass over ``[N, V]`` with per-row parameter tensors; a transform no row
uses is skipped. Random rows pick token i with probability ``probs[i]``:
- on CUDA with the exponential race: ``argmax(probs / q)`` with ``q ~ Exp(1)`` i.i.d. per token
  (one fused pass, nothing waits for the host);
- on the CPU by the inverse CDF: the first token whose running sum of probs (fp64) exceeds
  ``u * total`` for one ``u ~ U[0, 1)`` per row. torch draws exponentials there at ~22 ns each,
  so the race cost 17 ms a step at 16 rows of a 49k vocabulary; this costs ~0.5 ms.
Rows with a seed draw their own ``q`` of shape ``[V]`` (CUDA) or their own ``u`` (CPU) from their
sequence's ``torch.Generator`` (kept by the sampler per ``SamplingRow.key``), so their tokens
depend only on their seed, their logits and how many steps they have taken — never on the batch
size or on their position in it. Unseeded rows share one draw from the default generator.

Logprobs are those of the RAW model distribution (``log_softmax`` of the logits as given, before
penalties, temperature and filters), as vLLM v1 returns by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paged_backend import kernels
from paged_backend.params import SamplingParams
from paged_backend.runtime import logits_processors as lp
from paged_backend.runtime.grammar_mask import GrammarMasks, apply_grammar_bitmask
from paged_backend.runtime.sampling_row import SamplingRow
from paged_backend.runtime.transfer import HostResult, to_device

# Temperatures below this are treated as greedy (as vLLM does): dividing by them overflows.
GREEDY_EPS = 1e-5


@dataclass
class SamplerOutput:
    token_ids: list[int]                        # one per row
    logprobs: list[float]                       # raw-model logprob of the sampled token
    top_logprobs: list[dict[int, float] | None]  # params.logprobs=k: top-k ids + the sampled id


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_EPS


def _top_k_of(params: SamplingParams, vocab_size: int) -> int:
    """0 = off; otherwise clamped to the vocabulary."""
    k = params.top_k
    return 0 if k is None or k <= 0 or k >= vocab_size else k


@dataclass
class _RowParams:
    """Per-row parameters as device tensors plus host-side facts used to skip unused transforms."""

    greedy: torch.Tensor            # bool [N]
    temperature: torch.Tensor       # [N], 1.0 for greedy rows
    top_k: torch.Tensor             # long [N], 0 = off
    max_top_k: int
    top_p: torch.Tensor             # [N]
    min_p: torch.Tensor             # [N]
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device) -> "_RowParams":
        greedy = [_is_greedy(r.params) for r in rows]
        top_k = [0 if g else _top_k_of(r.params, vocab_size) for r, g in zip(rows, greedy)]
        top_p = [1.0 if g else r.params.top_p for r, g in zip(rows, greedy)]
        min_p = [0.0 if g else r.params.min_p for r, g in zip(rows, greedy)]
        temp = [1.0 if g else r.params.temperature for r, g in zip(rows, greedy)]
        f32 = torch.float32
        return cls(
            greedy=to_device(greedy, torch.bool, device),
            temperature=to_device(temp, f32, device),
            top_k=to_device(top_k, torch.long, device),
            max_top_k=max(top_k, default=0),
            top_p=to_device(top_p, f32, device),
            min_p=to_device(min_p, f32, device),
            any_top_p=any(p < 1.0 for p in top_p),
            any_min_p=any(p > 0.0 for p in min_p),
        )


def _allowed_and_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Rows with allowed_token_ids keep only those ids; logit_bias adds its biases (as vLLM does,
    before the penalties and temperature). Only the rows that ask are touched: no [N, V] host work."""
    device = logits.device

    def on_device(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    only = [(i, r.params.allowed_token_ids) for i, r in enumerate(rows) if r.params.allowed_token_ids]
    if only:
        local = on_device([k for k, (_, ids) in enumerate(only) for _ in ids])
        cols = on_device([t for _, ids in only for t in ids])
        which = on_device([i for i, _ in only])
        kept = torch.full((len(only), logits.shape[1]), float("-inf"), dtype=logits.dtype, device=device)
        kept[local, cols] = logits[which[local], cols]
        logits = logits.index_copy(0, which, kept)
    biased = [(i, r.params.logit_bias) for i, r in enumerate(rows) if r.params.logit_bias]
    if biased:
        index = (on_device([i for i, b in biased for _ in b]), on_device([t for _, b in biased for t in b]))
        logits = logits.index_put(index, on_device([v for _, b in biased for v in b.values()], logits.dtype),
                                  accumulate=True)
    return logits


def _any_penalty_or_mask(rows: list[SamplingRow]) -> bool:
    distinct = {id(r.params): r.params for r in rows}.values()  # rows mostly share a few params
    return any(p.min_tokens or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
               or p.logit_bias or p.allowed_token_ids for p in distinct)


def apply_penalties_and_masks(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """allowed_token_ids and logit_bias, min_tokens masking, repetition penalty, presence and
    frequency penalties (no temperature)."""
    n, vocab = logits.shape
    device = logits.device
    if not _any_penalty_or_mask(rows):
        return logits
    logits = _allowed_and_bias(logits, rows)

    masked_rows, masked_ids = [], []
    for i, r in enumerate(rows):
        # (under a grammar the grammar decides where the output ends: min_tokens does not hold EOS back)
        if len(r.output_token_ids) < r.params.min_tokens and r.params.structured_outputs is None:
            ids = set(r.params.stop_token_ids or ())
            if not r.params.ignore_eos:
                ids |= set(r.eos_token_ids)
            if ids:
                masked_rows.append(i)
                masked_ids.append(sorted(ids))
    logits = lp.apply_token_mask(logits, masked_rows, masked_ids)

    rep = [r.params.repetition_penalty for r in rows]
    if any(p != 1.0 for p in rep):
        seen = lp.token_counts(
            [r.prompt_token_ids + r.output_token_ids if p != 1.0 else [] for r, p in zip(rows, rep)],
            vocab, device,
        ) > 0
        logits = lp.apply_repetition_penalty(logits, seen, torch.tensor(rep, dtype=logits.dtype, device=device))

    pres = [r.params.presence_penalty for r in rows]
    freq = [r.params.frequency_penalty for r in rows]
    if any(p != 0.0 for p in pres) or any(f != 0.0 for f in freq):
        counts = lp.token_counts(
            [r.output_token_ids if (p != 0.0 or f != 0.0) else [] for r, p, f in zip(rows, pres, freq)],
            vocab, device,
        )
        logits = lp.apply_presence_frequency(
            logits, counts,
            torch.tensor(pres, dtype=logits.dtype, device=device),
            torch.tensor(freq, dtype=logits.dtype, device=device),
        )
    return logits


def _filter(logits: torch.Tensor, batch: _RowParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on penalised logits (greedy rows pass through unchanged)."""
    logits = lp.apply_temperature(logits, batch.temperature)
    logits = lp.apply_top_k(logits, batch.top_k, batch.max_top_k)
    if batch.any_top_p:
        logits = lp.apply_top_p(logits, batch.top_p)
    if batch.any_min_p:
        logits = lp.apply_min_p(logits, batch.min_p)
    return logits


def sampling_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The exact ``[N, V]`` distribution each row is sampled from (greedy rows: one-hot at argmax).

    Exposed so tests can compare it with an independent reference; ``Sampler`` computes the same.
    """
    logits = logits.float()
    batch = _RowParams.build(rows, logits.shape[1], logits.device)
    penalised = apply_penalties_and_masks(logits, rows)
    probs = _filter(penalised, batch).softmax(dim=1)
    one_hot = torch.zeros_like(probs).scatter_(1, penalised.argmax(dim=1, keepdim=True), 1.0)
    return torch.where(batch.greedy.unsqueeze(1), one_hot, probs)


def _exponential_noise(probs: torch.Tensor, greedy: list[bool], generators: list[torch.Generator | None]) -> torch.Tensor:
    """``q ~ Exp(1)`` per token; seeded rows draw from their own generator, shape ``[V]`` each."""
    n, vocab = probs.shape
    seeded = [i for i, g in enumerate(generators) if g is not None and not greedy[i]]
    if len(seeded) < n - sum(greedy):
        q = torch.empty_like(probs).exponential_()
    else:
        q = torch.ones_like(probs)
    for i in seeded:
        q[i] = torch.empty(vocab, dtype=probs.dtype, device=probs.device).exponential_(generator=generators[i])
    # Exp(1) can return exactly 0; 0/0 would be NaN, which argmax would pick.
    return q.clamp_min_(torch.finfo(probs.dtype).tiny)


def _inverse_cdf_draw(probs: torch.Tensor, greedy: list[bool], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row with probability probs[i]: the first index whose fp64 running sum exceeds
    u * total, u ~ U[0, 1) (seeded rows: from their own generator). A token of probability 0 never
    ends the search: its running sum equals the one before it."""
    n = probs.shape[0]
    u = torch.rand(n, 1, dtype=torch.float64)
    for i, g in enumerate(generators):
        if g is not None and not greedy[i]:
            u[i] = torch.rand(1, dtype=torch.float64, generator=g)
    cdf = probs.double().cumsum_(1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze_(1)
    vocab = probs.shape[1]
    if bool((idx == vocab).any()):  # u * total rounded up to total (u within 2^-53 of 1): the last possible token
        idx = torch.minimum(idx, vocab - 1 - (probs.flip(1) > 0).to(torch.uint8).argmax(dim=1))
    return idx


@dataclass
class _BatchFacts:
    """What the sampler derives from a step's rows alone. Built once while the batch stays the same
    rows (the same row objects in the same order, step after step: vLLM's persistent batch), so a
    steady decode batch costs no per-row Python here; rebuilt when it changes."""

    greedy: list[bool]
    all_greedy: bool
    want: list[int | None]  # logprobs asked per row
    max_k: int
    penalised: bool  # some row has penalties, min_tokens, logit_bias or allowed_token_ids
    row_params: _RowParams | None  # the filters' per-row tensors (None when every row is greedy)

    @classmethod
    def of(cls, rows: list[SamplingRow], vocab: int, device: torch.device) -> "_BatchFacts":
        greedy = [_is_greedy(r.params) for r in rows]
        want = [r.params.logprobs for r in rows]
        all_greedy = all(greedy)
        return cls(
            greedy=greedy, all_greedy=all_greedy, want=want,
            max_k=min(max((k for k in want if k is not None), default=0), vocab),
            penalised=_any_penalty_or_mask(rows),
            row_params=None if all_greedy else _RowParams.build(rows, vocab, device),
        )


class SampledTokens:
    """One step's samples: the token ids on the device at once (the next step can read them
    there), everything on the host when `resolve()` is called (it waits for the copy)."""

    def __init__(self, token_ids: torch.Tensor, logprobs: torch.Tensor, top, want: list[int | None]):
        self.token_ids = token_ids
        self._want = want
        self._host = HostResult([token_ids, logprobs, *top])
        self._resolved: SamplerOutput | None = None

    def resolve(self) -> SamplerOutput:
        if self._resolved is None:  # (read twice when a grammar needs the tokens before post-processing)
            self._resolved = self._resolve()
        return self._resolved

    def _resolve(self) -> SamplerOutput:
        host = self._host.get()
        ids_list, lp_list = host[0].tolist(), host[1].tolist()
        top_vals, top_ids = (host[2].tolist(), host[3].tolist()) if len(host) > 2 else (None, None)
        top_logprobs: list[dict[int, float] | None] = []
        for i, k in enumerate(self._want):
            if k is None:
                top_logprobs.append(None)
                continue
            entry = {} if k == 0 else dict(zip(top_ids[i][:k], top_vals[i][:k]))
            entry[ids_list[i]] = lp_list[i]
            top_logprobs.append(entry)
        return SamplerOutput(token_ids=ids_list, logprobs=lp_list, top_logprobs=top_logprobs)


class Sampler:
    """``Sampler()(logits[N, V], rows) -> SamplerOutput``; ``sample`` is the same without waiting for
    the device. Its only state is the generator of each seeded sequence, created from the row's seed
    the first time its key is seen and dropped by ``release``."""

    def __init__(self):
        self._generators: dict[int, torch.Generator] = {}
        self._grammar_masks = GrammarMasks()
        # the last batch's facts, its rows (kept alive: their ids key the cache) and the key
        self._facts: tuple[tuple[int, ...], list[SamplingRow], _BatchFacts] | None = None

    def _facts_for(self, rows: list[SamplingRow], vocab: int, device: torch.device) -> _BatchFacts:
        key = tuple(map(id, rows))
        if self._facts is not None and self._facts[0] == key:
            return self._facts[2]
        facts = _BatchFacts.of(rows, vocab, device)
        self._facts = (key, rows, facts)
        return facts

    def _generators_for(self, rows: list[SamplingRow], device: torch.device) -> list[torch.Generator | None]:
        gens: list[torch.Generator | None] = []
        for r in rows:
            if r.seed is None:
                gens.append(None)
                continue
            g = self._generators.get(r.key)
            if g is None:
                g = self._generators[r.key] = torch.Generator(device=device).manual_seed(r.seed)
            gens.append(g)
        return gens

    def release(self, keys) -> None:
        """Forget the generators of sequences that ended."""
        for k in keys:
            self._generators.pop(k, None)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        return self.sample(logits, rows).resolve()

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow], grammar_mask=None, greedy=None) -> SampledTokens:
        """greedy: (argmax ids, their logprobs) of these logits if already chosen (a CUDA graph chose
        them with `kernels.greedy_sample`): used when every row is plainly greedy.

        grammar_mask (structured outputs): ``fill(bitmask) -> rows`` fills row r of the int32
        host bitmask [N, ceil(V / 32)] for each row r under a grammar and returns those rows (None
        if none). It is called only once this step's kernels are queued, so the host fills the
        masks while the device computes; the tokens they forbid are removed before greedy choice,
        temperature and the filters. The logits may be masked in place."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"Sampler expects logits [N, V] with one SamplingRow per row; got logits of shape "
                f"{tuple(logits.shape)} and {len(rows)} rows"
            )
        vocab = logits.shape[1]
        facts = self._facts_for(rows, vocab, logits.device)
        max_k = facts.max_k
        if facts.all_greedy and not facts.penalised and max_k == 0 and grammar_mask is None:
            # argmax and its fp32 logprob in one pass over the logits as they are (on CUDA; on CPU the
            # same ops as below)
            token_ids, chosen_lp = greedy if greedy is not None else kernels.greedy_sample(logits)
            return SampledTokens(token_ids, chosen_lp, (), facts.want)
        logits = logits.float()
        # Logprobs are of the raw logits: what they need of them is taken before any in-place mask.
        raw_logprobs = logits.log_softmax(dim=1) if max_k > 0 else None
        raw_lse = logits.logsumexp(dim=1) if max_k == 0 else None

        penalised = apply_penalties_and_masks(logits, rows) if facts.penalised else logits
        if grammar_mask is not None:
            bitmask = self._grammar_masks.buffer(len(rows), -(-vocab // 32), logits.device)
            masked_rows = grammar_mask(bitmask.numpy())
            if masked_rows:
                apply_grammar_bitmask(penalised, bitmask, masked_rows)
        token_ids = penalised.argmax(dim=1)
        if not facts.all_greedy:
            batch = facts.row_params
            probs = _filter(penalised, batch).softmax(dim=1)
            generators = self._generators_for(rows, logits.device)
            if probs.device.type == "cpu":
                sampled = _inverse_cdf_draw(probs, facts.greedy, generators)
            else:
                sampled = (probs / _exponential_noise(probs, facts.greedy, generators)).argmax(dim=1)
            token_ids = torch.where(batch.greedy, token_ids, sampled)

        if max_k > 0:
            chosen_lp = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            top = raw_logprobs.topk(max_k, dim=1)
            return SampledTokens(token_ids, chosen_lp, (top.values, top.indices), facts.want)
        # Only the chosen token's log-probability: logit - logsumexp, without a [N, V] log_softmax.
        # (A masked row's chosen token is one its mask allows: its logit there is still the raw one.)
        chosen_lp = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1) - raw_lse
        return SampledTokens(token_ids, chosen_lp, (), facts.want)

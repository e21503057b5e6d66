"""Sampler tests against an independent, plainly written per-row reference (numpy + python loops)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_backend.runtime.sampler import Sampler, SamplingRow, sampling_probs
from paged_backend.params import SamplingParams

# Distinct values, some negative (repetition penalty multiplies those), no ties.
BASE = [2.0, 1.5, -0.5, 0.75, 3.0, -2.0, 0.1, 1.0, -1.0, 2.5, 0.4, -0.2]
V = len(BASE)
PROMPT = [0, 2, 2, 5]
OUTPUT = [1, 1, 4, 2, 9, 1]
EOS = {4}


# ----------------------------------------------------------------------------- reference
def _softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [0.0 if v == -math.inf else math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def reference_probs(logits, params: SamplingParams, prompt, output, eos=frozenset()) -> np.ndarray:
    """What vLLM's sampler does to one row, written as loops over tokens."""
    x = [float(v) for v in logits]
    if len(output) < params.min_tokens:
        banned = set(params.stop_token_ids or []) | (set() if params.ignore_eos else set(eos))
        for t in banned:
            x[t] = -math.inf
    if params.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    for t, c in Counter(output).items():
        x[t] -= params.frequency_penalty * c + params.presence_penalty
    if params.temperature == 0.0:
        out = np.zeros(len(x))
        out[max(range(len(x)), key=lambda i: (x[i], -i))] = 1.0   # first index among ties
        return out
    x = [v / params.temperature for v in x]
    if params.top_k > 0:
        kth = sorted(x, reverse=True)[params.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    if params.top_p < 1.0:
        p = _softmax(x)
        order = sorted(range(len(x)), key=lambda i: (-p[i], i))
        keep, mass = set(), 0.0
        for i in order:
            keep.add(i)
            mass += p[i]
            if mass >= params.top_p:
                break
        x = [v if i in keep else -math.inf for i, v in enumerate(x)]
    if params.min_p > 0.0:
        p = _softmax(x)
        x = [v if p[i] >= params.min_p * max(p) else -math.inf for i, v in enumerate(x)]
    return np.array(_softmax(x))


def row(params, prompt=PROMPT, output=OUTPUT, eos=EOS, seed=None, key=0) -> SamplingRow:
    return SamplingRow(params=params, prompt_token_ids=list(prompt), output_token_ids=list(output),
                       seed=seed, eos_token_ids=set(eos), key=key)


def ours(params_list, logits=None, **kw) -> np.ndarray:
    n = len(params_list)
    t = torch.tensor([BASE] * n if logits is None else logits, dtype=torch.float32)
    return sampling_probs(t, [row(p, **kw) for p in params_list]).double().numpy()


CASES = {
    "plain": SamplingParams(),
    "temperature_low": SamplingParams(temperature=0.5),
    "temperature_high": SamplingParams(temperature=2.0),
    "repetition": SamplingParams(repetition_penalty=1.7),
    "repetition_below_1": SamplingParams(repetition_penalty=0.6),
    "presence": SamplingParams(presence_penalty=1.3),
    "frequency": SamplingParams(frequency_penalty=0.7),
    "negative_penalties": SamplingParams(presence_penalty=-0.5, frequency_penalty=-0.3),
    "top_k": SamplingParams(top_k=4),
    "top_k_1": SamplingParams(top_k=1),
    "top_p": SamplingParams(top_p=0.6),
    "top_p_tiny": SamplingParams(top_p=0.01),
    "min_p": SamplingParams(min_p=0.2),
    "combined": SamplingParams(temperature=0.8, top_k=7, top_p=0.85, min_p=0.05, repetition_penalty=1.3,
                               presence_penalty=0.4, frequency_penalty=0.25),
    "combined_hot": SamplingParams(temperature=1.6, top_k=10, top_p=0.9, min_p=0.1, repetition_penalty=0.8),
    "greedy": SamplingParams(temperature=0.0),
    "greedy_penalised": SamplingParams(temperature=0.0, repetition_penalty=3.0, frequency_penalty=1.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_processed_probs_match_reference(name):
    params = CASES[name]
    np.testing.assert_allclose(ours([params])[0], reference_probs(BASE, params, PROMPT, OUTPUT, EOS), atol=1e-6)


def test_filters_actually_filter():
    """Guards the reference itself: each filter removes what it should on these logits."""
    support = lambda p: set(np.flatnonzero(ours([p])[0] > 0))
    assert support(CASES["top_k"]) == {4, 9, 0, 1}
    assert len(support(CASES["top_p"])) < V and support(CASES["top_p_tiny"]) == {4}
    assert support(CASES["top_k_1"]) == {4}
    assert 0 < len(support(CASES["min_p"])) < V
    assert support(CASES["greedy_penalised"]) == {7}   # 4 (3.0) and 9 (2.5) penalised below unseen 7 (1.0)


def test_mixed_batch_each_row_uses_its_own_params():
    names = list(CASES)
    probs = ours([CASES[n] for n in names])
    for i, name in enumerate(names):
        np.testing.assert_allclose(probs[i], reference_probs(BASE, CASES[name], PROMPT, OUTPUT, EOS), atol=1e-6,
                                   err_msg=name)


def test_repetition_penalty_direction():
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    logits = torch.tensor([[3.0, 2.0, -1.0, -0.6]])
    # token 0 seen: 3 -> 1.5 < 2 so greedy picks 1; token 2 seen: -1 -> -2 stays below 3's -0.6
    r = SamplingRow(params=p, prompt_token_ids=[0, 2], output_token_ids=[], seed=None, eos_token_ids=set())
    assert Sampler()(logits, [r]).token_ids == [1]
    probs = sampling_probs(logits, [SamplingRow(SamplingParams(repetition_penalty=2.0), [0, 2], [], None, set())])
    np.testing.assert_allclose(probs[0].numpy(), _softmax([1.5, 2.0, -2.0, -0.6]), atol=1e-6)


def test_greedy_ties_pick_first_index_and_ignore_filters():
    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rows = [SamplingRow(SamplingParams(temperature=0.0, top_k=1, top_p=0.1), [], [], None, set()) for _ in range(2)]
    assert Sampler()(logits, rows).token_ids == [1, 0]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]])            # 1 = eos, 2 = stop id, 3 = next best
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2])
    step = lambda out, p=params: Sampler()(logits, [SamplingRow(p, [0], out, None, {1})]).token_ids[0]
    assert step([]) == 3 and step([3, 3]) == 3
    assert step([3, 3, 3]) == 1                                     # min_tokens reached: eos allowed again
    # random rows never sample a masked id, even when it holds almost all the mass
    rand = SamplingParams(min_tokens=2, stop_token_ids=[2])
    out = Sampler()(logits.repeat(2000, 1), [SamplingRow(rand, [0], [], None, {1}) for _ in range(2000)])
    assert not {1, 2} & set(out.token_ids)
    # ignore_eos: EOS is not a stop token for this request, so it is not masked (vLLM)
    ign = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert step([], ign) == 1


def test_allowed_token_ids_and_logit_bias_touch_only_their_rows():
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]] * 4)
    rows = [SamplingRow(SamplingParams(temperature=0.0, **kw), [0], [], None, set()) for kw in (
        {}, {"allowed_token_ids": [0, 3]}, {"logit_bias": {"4": 100, 1: -100}}, {"logit_bias": {2: 1.5}})]
    assert Sampler()(logits, rows).token_ids == [1, 3, 4, 2]
    assert logits[0].tolist() == [0.0, 9.0, 8.0, 7.0, 1.0]  # the caller's logits are left as they were
    # random rows never leave the allowed ids, however much mass the others hold
    rand = SamplingParams(allowed_token_ids=[0, 4], temperature=1.0)
    out = Sampler()(logits[:1].repeat(2000, 1), [SamplingRow(rand, [0], [], None, set()) for _ in range(2000)])
    assert set(out.token_ids) == {0, 4}


def test_logprobs_are_raw_and_topk_contains_sampled():
    logits = torch.tensor([BASE, BASE, BASE])
    rows = [row(SamplingParams(temperature=0.7, repetition_penalty=1.5, logprobs=3)),
            row(SamplingParams(temperature=0.0, logprobs=0)),
            row(SamplingParams(top_k=2))]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(torch.tensor(BASE, dtype=torch.float64), 0).numpy()
    top3 = list(np.argsort(-raw)[:3])
    for i in range(3):
        assert out.logprobs[i] == pytest.approx(raw[out.token_ids[i]], abs=1e-5)
    first = out.top_logprobs[0]
    assert set(first) == set(top3) | {out.token_ids[0]}
    for t, v in first.items():
        assert v == pytest.approx(raw[t], abs=1e-5)
    assert out.top_logprobs[1] == {out.token_ids[1]: pytest.approx(raw[out.token_ids[1]], abs=1e-5)}
    assert out.top_logprobs[2] is None


def _frequencies(params, n, seeded=False):
    logits = torch.tensor([BASE] * n)
    seeds = [1000 + i if seeded else None for i in range(n)]
    torch.manual_seed(0)
    out = Sampler()(logits, [row(params, seed=s, key=i) for i, s in enumerate(seeds)])
    return np.bincount(out.token_ids, minlength=V) / n


@pytest.mark.parametrize("name", ["plain", "temperature_high", "top_p", "combined", "combined_hot", "min_p"])
@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_frequencies(name, seeded):
    n = 20000 if not seeded else 4000
    params = CASES[name]
    expected = reference_probs(BASE, params, PROMPT, OUTPUT, EOS)
    freq = _frequencies(params, n, seeded)
    assert np.all(freq[expected == 0] == 0), "sampled a token the filters removed"
    tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-3
    assert np.all(np.abs(freq - expected) <= tol), (freq, expected)


# ----------------------------------------------------------------------------- seeded determinism
def _run_steps(batches, steps=6, vocab=500):
    """batches: per step, a list of (name, params, seed|None). Returns tokens per named sequence."""
    g = torch.Generator().manual_seed(123)
    base_logits = torch.randn(vocab, generator=g) * 0.5
    state: dict[str, list[int]] = {}
    sampler = Sampler()  # keeps each seeded sequence's generator by key across steps
    for step in range(steps):
        entries = batches(step)
        rows, names = [], []
        for name, params, seed in entries:
            out = state.setdefault(name, [])
            rows.append(SamplingRow(params, [1, 2, 3], list(out), seed, {0}, key=hash(name)))
            names.append(name)
        logits = base_logits.repeat(len(rows), 1)
        for name, tok in zip(names, sampler(logits, rows).token_ids):
            state[name].append(tok)
    return state


def test_seeded_sampling_independent_of_batch():
    p = SamplingParams(temperature=1.0, top_p=0.95, frequency_penalty=0.3, seed=42)
    alone = _run_steps(lambda s: [("a", p, 42)])["a"]
    other = SamplingParams(temperature=1.3, top_k=50)

    def crowded(step):
        others = [(f"o{j}", other, 7 + j if j % 2 else None) for j in range(step % 4 + 1)]
        pos = step % (len(others) + 1)                      # the seeded row moves around
        return others[:pos] + [("a", p, 42)] + others[pos:]

    torch.manual_seed(99)
    assert _run_steps(crowded)["a"] == alone
    greedy_neighbours = lambda s: [("g", SamplingParams(temperature=0.0), None), ("a", p, 42)]
    assert _run_steps(greedy_neighbours)["a"] == alone
    assert len(set(alone)) > 1
    assert _run_steps(lambda s: [("a", p, 43)])["a"] != alone   # the seed matters


def test_unseeded_rows_vary():
    p = SamplingParams(temperature=1.0)
    runs = {tuple(_run_steps(lambda s: [("u", p, None)], steps=5)["u"]) for _ in range(4)}
    assert len(runs) > 1


# ----------------------------------------------------------------------------- properties
logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40, unique=True)


@settings(max_examples=150, deadline=None)
@given(
    logits=logit_rows,
    temperature=st.floats(0.05, 3.0),
    top_k=st.integers(-1, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    rep=st.floats(0.5, 2.0),
)
def test_property_processed_distribution(logits, temperature, top_k, top_p, min_p, rep):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep)
    n = len(logits)
    r = SamplingRow(params, [0], [], None, set())
    probs = sampling_probs(torch.tensor([logits]), [r])[0].double().numpy()
    assert np.all(probs >= 0) and abs(probs.sum() - 1.0) < 1e-5
    support = np.flatnonzero(probs > 0)
    x = np.array(logits, dtype=np.float32)
    x[0] = x[0] / rep if x[0] > 0 else x[0] * rep
    best = int(np.argmax(x))
    assert best in support                                         # the mode always survives
    if 0 < top_k < n:
        assert len(support) <= top_k                               # distinct logits: no ties at k
        assert set(support) <= set(np.argsort(-x)[:top_k])
    if min_p > 0:
        assert probs[support].min() >= min_p * probs.max() * (1 - 1e-5)
    # ordering is preserved: every survivor outranks every removed token
    if len(support) < n:
        removed = np.setdiff1d(np.arange(n), support)
        assert x[support].min() >= x[removed].max()
    token = Sampler()(torch.tensor([logits]), [r]).token_ids[0]
    assert token in support


@settings(max_examples=60, deadline=None)
@given(logits=logit_rows, top_p=st.floats(0.05, 0.99))
def test_property_top_p_is_minimal(logits, top_p):
    r = SamplingRow(SamplingParams(top_p=top_p), [], [], None, set())
    probs = sampling_probs(torch.tensor([logits]), [r])[0].double().numpy()
    full = _softmax([float(np.float32(v)) for v in logits])
    support = sorted(np.flatnonzero(probs > 0), key=lambda i: -full[i])
    kept_mass = sum(full[i] for i in support)
    assert kept_mass >= top_p - 1e-5                               # enough mass
    assert kept_mass - full[support[-1]] < top_p + 1e-5           # and nothing superfluous


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="one SamplingRow per row"):
        Sampler()(torch.zeros(2, 5), [row(SamplingParams())])


def test_a_batch_kept_step_after_step_reuses_nothing_stale():
    """The sampler keeps what it derives from a batch while the same row objects come back in the
    same order; a reordered batch, or one with other rows, must be sampled by its own rows' params."""
    logits = torch.tensor([BASE, BASE[::-1]])
    greedy = SamplingRow(SamplingParams(temperature=0.0), PROMPT, [], key=1)
    hot = SamplingRow(SamplingParams(temperature=1.0, top_k=1), PROMPT, [], key=2)  # top_k=1: its argmax
    cold = SamplingRow(SamplingParams(temperature=1.0, logprobs=2), PROMPT, [], seed=5, key=3)
    s = Sampler()
    expect = [int(np.argmax(BASE)), int(np.argmax(BASE[::-1]))]
    for _ in range(2):
        assert s(logits, [greedy, hot]).token_ids == expect
        assert s(logits, [hot, greedy]).token_ids == expect
    assert s(logits, [greedy, hot]).top_logprobs == [None, None]
    out = s(logits, [greedy, cold])  # a new row: its logprobs are asked for
    assert out.top_logprobs[0] is None and len(out.top_logprobs[1]) >= 2
    fresh = Sampler()(logits, [greedy, cold])
    assert out.token_ids == fresh.token_ids  # the seeded row's first draw, as a fresh sampler's


def test_cpu_inverse_cdf_never_draws_a_zero_probability_token(monkeypatch):
    """The CPU draw (inverse CDF): u at both ends of [0, 1) lands on the first / last token of nonzero
    probability, never on a filtered one, also where u * total rounds up to total."""
    from paged_backend.runtime import sampler as sampler_mod

    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    for u, expected in ((0.0, [1, 2]), (float(np.nextafter(1.0, 0.0)), [3, 2])):
        monkeypatch.setattr(sampler_mod.torch, "rand", lambda *a, _u=u, **k: torch.full(a if a else (1,), _u,
                                                                                          dtype=torch.float64))
        assert sampler_mod._inverse_cdf_draw(probs, [False, False], [None, None]).tolist() == expected
    monkeypatch.setattr(sampler_mod.torch, "rand", lambda *a, **k: torch.ones(a, dtype=torch.float64))  # u = total
    assert sampler_mod._inverse_cdf_draw(probs, [False, False], [None, None]).tolist() == [3, 2]

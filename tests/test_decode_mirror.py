"""The CPU decode mirrors (kernels/decode_mirror.py): a step that extends the previous one appends the new
tokens to each layer's kept batch instead of gathering every context again. An engine with mirrors gives
exactly the tokens and logprobs of one that gathers every step, through joins, finishes, preemption
(a KV cache too small for the batch), forked sequences (n=2), shared prefixes, sliding windows and
soft-capping; and a mirror that missed an append would be caught."""

from __future__ import annotations

import pytest
import torch

from paged_backend import LLM, SamplingParams
from paged_backend.kernels import decode_mirror, reference


def _generate(model_dir, prompts, params, kv_cache_memory: int):
    with LLM(str(model_dir), dtype="float32", device="cpu", max_model_len=256, max_num_seqs=6,
             max_num_batched_tokens=64, kv_cache_memory=kv_cache_memory) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.stats()
        assert stats.num_blocks_used == 0
        return [[(c.token_ids, c.cumulative_logprob, c.logprobs) for c in o.outputs] for o in outs], stats


def _prompts(n: int) -> list[list[int]]:
    shared = [7, 99, 1234, 55, 8, 301, 42, 17] * 3  # a shared prefix: some prompts hit the prefix cache
    return [(shared if i % 3 == 0 else []) + [(i * 37 + j * 11) % 4000 + 5 for j in range(3 + 9 * i)]
            for i in range(n)]


PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=4, n=2, logprobs=2, max_tokens=23, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=9, max_tokens=31, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True),
    SamplingParams(temperature=0.6, seed=1, max_tokens=35, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
]


@pytest.mark.parametrize("kind,kv_cache_memory", [("llama", 1 << 22), ("llama", 1 << 17), ("gemma2", 1 << 22)])
def test_mirrors_give_the_tokens_of_gathering(kind, kv_cache_memory, tiny_model_dir, monkeypatch):
    """1 << 17 bytes hold few blocks: sequences are preempted and recomputed while others decode."""
    model_dir = tiny_model_dir(kind)
    prompts = _prompts(len(PARAMS))
    calls = {"current": 0}
    lookup = decode_mirror.lookup

    def counting(kv_cache, mp):
        m = lookup(kv_cache, mp)
        calls["current"] += bool(m is not None and m.current)
        return m

    monkeypatch.setattr(decode_mirror, "lookup", counting)
    got, stats = _generate(model_dir, prompts, PARAMS, kv_cache_memory)
    assert calls["current"] > 50, "no decode step extended a mirror"
    if kv_cache_memory == 1 << 17:
        assert stats.num_preemptions > 0
    monkeypatch.setattr(decode_mirror, "lookup", lambda kv_cache, mp: None)
    expected, _ = _generate(model_dir, prompts, PARAMS, kv_cache_memory)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i}"


def test_a_missed_append_is_caught(tiny_model_dir, monkeypatch):
    """The comparison above can fail: mirrors that keep their old rows give other tokens."""
    model_dir = tiny_model_dir("llama")
    prompts = _prompts(3)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected, _ = _generate(model_dir, prompts, params, 1 << 22)
    real = torch.Tensor.index_copy_

    def skip_mirror_rows(self, dim, index, source):  # the appends are the only index_copy_ into a mirror
        if any(self.untyped_storage().data_ptr() == m.buf.untyped_storage().data_ptr()
               for m in decode_mirror._state.__dict__.get("entries", {}).values()):
            return self
        return real(self, dim, index, source)

    monkeypatch.setattr(torch.Tensor, "index_copy_", skip_mirror_rows)
    got, _ = _generate(model_dir, prompts, params, 1 << 22)
    assert got != expected


def _cache_and_plan(lens, block_size=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    nblk = 64
    cache = torch.randn(nblk, 2, block_size, hkv, d, generator=g)
    width = max(-(-n // block_size) for n in lens) + 2  # room to grow
    table = torch.randperm(nblk, generator=g)[: len(lens) * width].view(len(lens), width).int()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    return cache, table, seq_lens, qsl


def test_plan_extends_only_the_same_sequences_one_token_longer():
    cache, table, seq_lens, qsl = _cache_and_plan([5, 9])
    first = reference.plan_step(torch.zeros(2, dtype=torch.long), table, seq_lens, qsl, 4).decode.mirror
    grown = reference.plan_step(torch.zeros(2, dtype=torch.long), table, seq_lens + 1, qsl, 4).decode.mirror
    assert first.extends is None and grown.extends == first.serial and grown.capacity == first.capacity
    again = reference.plan_step(torch.zeros(2, dtype=torch.long), table, seq_lens + 1, qsl, 4).decode.mirror
    assert again.extends is None  # not one token longer
    swapped = reference.plan_step(torch.zeros(2, dtype=torch.long), table.flip(0), seq_lens.flip(0) + 2, qsl,
                                  4).decode.mirror
    assert swapped.extends is None  # other blocks


def test_mirror_holds_what_a_gather_reads(monkeypatch):
    """Decode attention over an extended mirror equals the gathered computation, step after step."""
    lens = [5, 11, 3]
    cache, table, seq_lens, qsl = _cache_and_plan(lens, seed=1)
    q = torch.randn(3, 4, 8)
    for step in range(6):
        lens_t = seq_lens + step
        slots = table.long().gather(1, ((lens_t - 1) // 4).long().view(-1, 1)).view(-1) * 4 + (lens_t - 1) % 4
        plan = reference.plan_step(slots, table, lens_t, qsl, 4)
        k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
        reference.store_kv(k, v, cache, slots, plan=plan)
        got = reference.paged_attention(q, cache, table, lens_t, qsl, 0.3, plan=plan)
        assert (plan.decode.mirror.extends is not None) == (step > 0)
        with monkeypatch.context() as m:
            m.setattr(decode_mirror, "lookup", lambda kv_cache, mp: None)
            expected = reference.paged_attention(q, cache, table, lens_t, qsl, 0.3)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_mirrors_stay_within_their_budget(monkeypatch):
    cache, table, seq_lens, qsl = _cache_and_plan([5, 9])
    plan = reference.plan_step(torch.zeros(2, dtype=torch.long), table, seq_lens, qsl, 4)
    # the budget is per thread: mirrors of earlier tests' engines still alive on this thread count too
    held = sum(e.buf.numel() * e.buf.element_size() for e in getattr(decode_mirror._state, "entries", {}).values())
    monkeypatch.setattr(decode_mirror, "MAX_BYTES", held + 1024)
    assert decode_mirror.lookup(cache, plan.decode.mirror) is None
    monkeypatch.setattr(decode_mirror, "MAX_BYTES", held + (1 << 20))
    assert decode_mirror.lookup(cache, plan.decode.mirror) is not None


def test_a_mirror_is_freed_with_its_cache():
    cache, table, seq_lens, qsl = _cache_and_plan([5, 9])
    plan = reference.plan_step(torch.zeros(2, dtype=torch.long), table, seq_lens, qsl, 4)
    assert decode_mirror.lookup(cache, plan.decode.mirror) is not None
    key = id(cache)
    assert key in decode_mirror._state.entries
    del cache
    assert key not in decode_mirror._state.entries

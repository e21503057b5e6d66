"""Property test: block manager + scheduler under random arrivals, lengths, forks, aborts and
memory pressure. After every step the block accounting must be exact; at the end nothing leaks."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.scheduler import Scheduler
from paged_backend.engine.sequence import Request, Sequence, SequenceStatus
from paged_backend.params import SamplingParams

BLOCK = 4


def _check(bm: BlockManager, sched: Scheduler, live: list[Sequence], out, budget: int, max_seqs: int,
           was_running: set[int]) -> None:
    bm.check_invariants(live)
    # the running sequences' decodes (one new token) lead the batch: the attention's decode launch takes them
    ones = [seq.seq_id in was_running and num_new == 1 for seq, num_new in zip(out.seqs, out.num_new_tokens)]
    assert ones == sorted(ones, reverse=True), "a running sequence's decode after a prompt chunk"
    assert out.num_tokens <= budget
    assert len(sched.running) <= max_seqs
    ids = [seq.seq_id for seq in out.seqs]
    assert len(ids) == len(set(ids)), "a sequence was scheduled twice in one step"
    assert len(out.num_new_tokens) == len(out.completes_prompt) == len(out.seqs)
    for seq, num_new, completes in zip(out.seqs, out.num_new_tokens, out.completes_prompt):
        assert seq.status == SequenceStatus.RUNNING
        assert num_new >= 1
        assert seq.num_computed_tokens + num_new <= seq.num_tokens
        assert completes == (seq.num_computed_tokens + num_new == seq.num_tokens)
        # every slot written this step has a block, and that block is not shared with anyone
        assert len(seq.block_table) * BLOCK >= seq.num_computed_tokens + num_new
        first = seq.num_computed_tokens // BLOCK
        if first < len(seq.block_table):
            assert bm.ref_counts[seq.block_table[first]] == 1, "write into a shared block"
    for seq in sched.waiting:
        assert not seq.block_table and seq.num_computed_tokens == 0


request_st = st.tuples(
    st.integers(1, 40),  # prompt length
    st.integers(1, 12),  # max new tokens
    st.integers(1, 3),  # n
    st.integers(0, 2),  # which shared prefix family (for prefix-cache hits)
)


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.lists(request_st, max_size=3), min_size=1, max_size=25),
    abort_p=st.floats(0, 0.3),
    num_blocks=st.integers(12, 40),
    budget=st.integers(4, 48),
    max_seqs=st.integers(1, 8),
    caching=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_workload_keeps_block_accounting_exact(arrivals, abort_p, num_blocks, budget, max_seqs, caching, seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, BLOCK, enable_prefix_caching=caching)
    sched = Scheduler(bm, max_seqs, budget)
    prefixes = [[rng.randrange(50) for _ in range(40)] for _ in range(3)]
    live: list[Sequence] = []
    max_len = (num_blocks - 1) * BLOCK  # what one sequence may reach (one block spare for COW)
    steps = 0
    pending = list(arrivals)
    while pending or sched.has_work():
        steps += 1
        assert steps < 2000, "no progress"
        if pending:
            for plen, max_new, n, fam in pending.pop(0):
                plen, n = min(plen, max_len - max_new), min(n, max_seqs)  # the engine rejects n > max_num_seqs
                req = Request(str(steps), None, prefixes[fam][:plen], SamplingParams(max_tokens=max_new, n=n))
                seq = Sequence(req, 0, list(req.prompt_token_ids), pending_forks=n - 1)
                req.seqs.append(seq)
                live.append(seq)
                sched.add(seq)
        if live and rng.random() < abort_p:  # abort a whole request
            req = rng.choice(live).request
            for s in req.seqs:
                if not s.finished:
                    sched.finish(s)
            req.seqs[0].pending_forks = 0
            live = [s for s in live if not s.finished]
        was_running = {seq.seq_id for seq in sched.running}
        out = sched.schedule()
        _check(bm, sched, live, out, budget, max_seqs, was_running)
        if sched.has_work():
            assert out.seqs, "work waiting but nothing scheduled"
        # what the engine does after the forward pass
        for seq, num_new, completes in zip(out.seqs, out.num_new_tokens, out.completes_prompt):
            seq.num_computed_tokens += num_new
            bm.cache_full_blocks(seq)
            if not completes:
                continue
            members = [seq]
            for i in range(seq.pending_forks):
                child = Sequence(seq.request, i + 1, list(seq.token_ids))
                sched.add_forked(seq, child)
                seq.request.seqs.append(child)
                live.append(child)
                members.append(child)
            seq.pending_forks = 0
            for m in members:
                m.token_ids.append(rng.randrange(50))
                if len(m.output_token_ids) >= m.params.max_tokens:
                    sched.finish(m)
        live = [s for s in live if not s.finished]
        bm.check_invariants(live)
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks == num_blocks
    bm.check_invariants([])


def test_prefix_cache_hit_reuses_blocks_and_leaves_last_token():
    bm = BlockManager(16, BLOCK)
    sched = Scheduler(bm, 8, 64)
    toks = list(range(12))  # exactly 3 blocks
    a = Sequence(Request("a", None, toks, SamplingParams()), 0, list(toks))
    sched.add(a)
    out = sched.schedule()
    assert out.num_new_tokens[0] == 12
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 3
    b = Sequence(Request("b", None, toks, SamplingParams()), 0, list(toks))
    sched.add(b)
    out = sched.schedule()
    (num_new,) = [n for seq, n in zip(out.seqs, out.num_new_tokens) if seq is b]
    # the last block is recomputed so that the last prompt token yields logits
    assert b.num_computed_tokens == 8 and num_new == 4
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]


def test_fork_shares_blocks_then_copies_partial_block_on_write():
    bm = BlockManager(16, BLOCK)
    sched = Scheduler(bm, 8, 64)
    toks = list(range(6))  # one full block + a partial one
    parent = Sequence(Request("p", None, toks, SamplingParams(n=2)), 0, list(toks), pending_forks=1)
    sched.add(parent)
    sched.schedule()
    parent.num_computed_tokens = 6
    child = Sequence(parent.request, 1, list(toks))
    sched.add_forked(parent, child)
    assert bm.num_used_blocks == 2
    parent.token_ids.append(7)
    child.token_ids.append(8)
    out = sched.schedule()
    assert {seq.seq_id for seq in out.seqs} == {parent.seq_id, child.seq_id}
    assert parent.block_table[0] == child.block_table[0]
    assert parent.block_table[1] != child.block_table[1]
    assert len(out.block_copies) == 1
    assert bm.num_used_blocks == 3
    bm.check_invariants([parent, child])


def test_preemption_frees_newest_and_requeues_it_first():
    bm = BlockManager(4, BLOCK)
    sched = Scheduler(bm, 8, 64)
    seqs = []
    for name in "ab":
        toks = list(range(7))
        s = Sequence(Request(name, None, toks, SamplingParams()), 0, list(toks))
        sched.add(s)
        seqs.append(s)
    sched.schedule()  # both admitted: 2 blocks each
    assert bm.num_free_blocks == 0
    for s in seqs:
        s.num_computed_tokens = 7
        s.token_ids += [1, 2]  # both now need a third block
    out = sched.schedule()
    assert out.seqs == [seqs[0]]
    assert out.num_preempted == 1 and sched.waiting[0] is seqs[1]
    assert seqs[1].block_table == [] and seqs[1].num_computed_tokens == 0
    bm.check_invariants([seqs[0]])

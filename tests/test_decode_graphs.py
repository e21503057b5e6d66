"""The CUDA-graph decode path's own work, run eagerly on the CPU: `DecodeGraphs` not captured runs the
same inputs buffer, pending-token gather, LM head and greedy choice that its graphs replay on a GPU.
An engine whose runner uses it gives exactly the tokens (and logprobs) of the plain eager runner,
with steps overlapped as on a GPU (pending tokens fed on the device, from the graphs' own greedy
choice or copied in from an eager step's samples)."""

from __future__ import annotations

import pytest
import torch

from paged_backend import LLM, SamplingParams
from paged_backend.runtime import cuda_graphs
from paged_backend.runtime.cuda_graphs import DecodeGraphs


def _generate(model_dir, prompts, params, graphs: bool, max_num_seqs: int = 8):
    with LLM(str(model_dir), dtype="float32", device="cpu", max_model_len=256, max_num_seqs=max_num_seqs,
             max_num_batched_tokens=64, kv_cache_memory=1 << 22) as llm:
        engine = llm.engine
        engine.overlap_steps = True
        runner = engine.runner
        used = []
        if graphs:
            runner.graphs = DecodeGraphs(runner.model, runner.device, max_num_seqs, 256, runner.block_size,
                                         sample=True)
            replay = runner.graphs.replay
            runner.graphs.replay = lambda b: used.append(b) or replay(b)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.stats().num_blocks_used == 0
        return [[(c.token_ids, c.cumulative_logprob, c.logprobs) for c in o.outputs] for o in outs], used


def _prompts(n: int) -> list[list[int]]:
    return [[(i * 37 + j * 11) % 4000 + 5 for j in range(3 + 5 * i)] for i in range(n)]


@pytest.mark.parametrize("case", ["greedy", "seeded", "mixed", "n2-logprobs", "grammar"])
def test_graph_decode_path_matches_the_eager_runner(case, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = _prompts(6)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    params = {
        "greedy": greedy,
        "seeded": SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True),
        # greedy and sampled rows in one batch: the graph's greedy ids are not the step's samples
        "mixed": [greedy if i % 2 else SamplingParams(temperature=1.0, seed=i, max_tokens=9 + i, ignore_eos=True)
                  for i in range(len(prompts))],
        "n2-logprobs": SamplingParams(temperature=0.7, n=2, seed=5, logprobs=3, max_tokens=10, ignore_eos=True),
        # grammar masks applied to the graphs' logits (in place: the buffer is rewritten every step)
        "grammar": [SamplingParams(temperature=0.0, max_tokens=12, structured_outputs={"regex": "[a-z ]{4,30}"}),
                    greedy, SamplingParams(temperature=0.8, seed=2, max_tokens=12,
                                           structured_outputs={"regex": "[0-9]{2,8}"})] * 2,
    }[case]
    expected, _ = _generate(model_dir, prompts, params, graphs=False)
    got, used = _generate(model_dir, prompts, params, graphs=True)
    assert used, "no decode step ran through the graphs' path"
    for i, (g, e) in enumerate(zip(got, expected)):
        for (g_ids, g_lp, g_top), (e_ids, e_lp, e_top) in zip(g, e):
            assert g_ids == e_ids, f"{case}: prompt {i}"
            assert g_lp == pytest.approx(e_lp, rel=1e-5, abs=1e-5)
            if e_top is not None:
                assert [sorted(t) for t in g_top] == [sorted(t) for t in e_top]


def test_graph_decode_path_with_tables_copied_at_their_own_width(tiny_model_dir, monkeypatch):
    """Long max_model_len: whole table rows are too large to copy each step, so a step copies only its
    own table width (a second copy). Same tokens; a padded batch (5 sequences in a graph of 8)."""
    monkeypatch.setattr(cuda_graphs, "_ONE_COPY_TABLE_ENTRIES", 0)
    model_dir = tiny_model_dir("llama")
    prompts = _prompts(5)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected, _ = _generate(model_dir, prompts, params, graphs=False)
    got, used = _generate(model_dir, prompts, params, graphs=True)
    assert got == expected and 5 in used


def test_fits_only_decode_steps_within_the_graphs(tiny_model_dir):
    import numpy as np

    from paged_backend.runtime.step_input import StepInput

    with LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", max_model_len=64,
             kv_cache_memory=1 << 20) as llm:
        runner = llm.engine.runner
        graphs = DecodeGraphs(runner.model, runner.device, 4, 64, runner.block_size, sample=True)

    def step(b, max_query_len=1, rows=None, pending=()):
        z = np.zeros(b, np.int64)
        return StepInput(input_ids=z, positions=z, slot_mapping=z, seq_lens=z + 1, query_start_loc=np.arange(b + 1),
                         block_tables=np.zeros((b, 16), np.int64), logit_rows=np.arange(b if rows is None else rows),
                         pending_dst=np.array(pending, np.int64), pending_src=np.array(pending, np.int64),
                         max_query_len=max_query_len, max_seq_len=1)

    assert graphs.fits(step(4)) and graphs.fits(step(3, pending=[0, 2]))
    assert not graphs.fits(step(5))  # more sequences than the largest graph
    assert not graphs.fits(step(2, max_query_len=3))  # prompt tokens
    assert not graphs.fits(step(3, rows=2))  # a row that does not sample
    assert not graphs.fits(step(3, pending=[4]))  # a pending token from a row the graphs do not hold
    assert torch.equal(graphs.prev_tokens, torch.zeros(4, dtype=torch.int64))

"""The LLM API: sampling through the engine, n > 1 block sharing, stop handling, stats, and clear
errors for bad input that leave the same LLM working."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from pydantic import ValidationError

from paged_backend import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", max_model_len=256) as llm:
        yield llm


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49152) for _ in range(n)]


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    target = _ids(10, 0)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [_ids(5 + i, 100 + i) for i in range(6)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(others[:3] + [target] + others[3:], [unseeded] * 3 + [params] + [unseeded] * 3, use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone
    other_seed = llm.generate([target], params.model_copy(update={"seed": 99}), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_blocks(llm):
    prompt = _ids(40, 1)  # 2 full blocks + a partial one (block_size 16)
    n = 4
    params = SamplingParams(n=n, temperature=1.0, seed=7, max_tokens=30, ignore_eos=True)
    engine = llm.engine
    engine.add_request(prompt, params, request_id="fork")
    engine.step()  # prefill + fork: every sibling shares all 3 prompt blocks
    s = llm.stats()
    assert s.num_running == n
    assert s.num_blocks_used == 3, "siblings must share the prompt's blocks"
    engine.step()  # each sibling writes into the shared partial block: copy-on-write
    s = llm.stats()
    assert s.num_blocks_used == 2 + n, "2 shared full blocks + one private copy of the partial block each"
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.finished)
    (out,) = outs
    assert [c.index for c in out.outputs] == list(range(n))
    assert all(len(c.token_ids) == 30 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "siblings sampled identically"
    assert llm.stats().num_blocks_used == 0


def test_greedy_n_and_logprobs(llm):
    out = llm.generate([_ids(8, 2)], SamplingParams(temperature=0, max_tokens=5, logprobs=3, n=2), use_tqdm=False)[0]
    a, b = out.outputs
    assert a.token_ids == b.token_ids
    assert len(a.logprobs) == 5 and all(len(d) >= 3 for d in a.logprobs)
    for tok, d in zip(a.token_ids, a.logprobs):
        assert tok in d and d[tok] == max(d.values())  # greedy picks the most likely token
    assert a.cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(a.token_ids, a.logprobs)), rel=1e-4)


def test_steps_are_pipelined_and_ends_are_exact(llm):
    """Step N+1 is launched before step N's token is read back; a sequence that stops still ends with
    exactly its tokens (the position computed after its last one is dropped) and frees its blocks."""
    engine = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    expected = llm.generate([_ids(20, 7)], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = expected[2]
    assert not engine.overlap_steps  # the CPU default; the GPU's pipelining is forced here
    engine.overlap_steps = True
    try:
        req = engine.add_request(_ids(20, 7), SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=[stop_at]))
        seq = req.seqs[0]
        assert engine.step() == []  # prefill launched, its token still on the device
        assert seq.pending is not None and seq.num_output_tokens == 0
        engine.step()  # the next decode step is launched first, then the first token is read back
        assert seq.num_output_tokens == 1 and seq.pending is not None
        finals = []
        while engine.has_unfinished_requests():
            finals += [o for o in engine.step() if o.finished]
    finally:
        engine.overlap_steps = False
    out = finals[-1].outputs[0]
    assert out.token_ids == expected[: expected.index(stop_at) + 1] and out.finish_reason == "stop"
    assert llm.stats().num_blocks_used == 0


def test_cpu_steps_return_their_own_tokens(llm):
    """On the CPU nothing overlaps: each step returns the token it computed (the first with the prefill)
    and the step that samples a sequence's last token ends it."""
    engine = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    expected = llm.generate([_ids(20, 8)], greedy, use_tqdm=False)[0].outputs[0].token_ids
    req = engine.add_request(_ids(20, 8), greedy)
    steps_before = engine.num_steps
    for n in (1, 2):
        (out,) = engine.step()
        assert out.outputs[0].token_ids == expected[:n] and not out.finished and req.seqs[0].pending is None
    (out,) = engine.step()
    assert out.finished and out.outputs[0].token_ids == expected
    assert engine.num_steps - steps_before == 3 and not engine.has_unfinished_requests()


def test_stop_strings_and_token_ids(llm):
    base = llm.generate([_ids(6, 3)], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    stop_tok = ids[5]
    out = llm.generate([_ids(6, 3)], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                    stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == ids[: ids.index(stop_tok) + 1]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        out = llm.generate([_ids(6, 3)], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: text.index(stop)]


def test_text_is_the_same_decoded_lazily_per_step_or_streamed(llm):
    """Without stop strings an offline request's text is decoded only when it ends (one update over
    all its tokens); with one (never matching) after every token; streamed in deltas each step. All
    three give the same text, also around stop tokens shown or not and multi-byte characters."""
    engine = llm.engine
    rng = random.Random(7)
    for trial in range(6):
        prompt = _ids(8, 50 + trial)
        base = SamplingParams(temperature=1.0, seed=trial, max_tokens=40, ignore_eos=True)
        free = llm.generate([prompt], base, use_tqdm=False)[0].outputs[0]
        stop_tok = free.token_ids[rng.randrange(5, 30)]
        for extra in ({}, dict(stop_token_ids=[stop_tok]),
                      dict(stop_token_ids=[stop_tok], include_stop_str_in_output=True)):
            params = base.model_copy(update=extra)
            lazy = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
            eager = llm.generate([prompt], params.model_copy(update=dict(stop=["\x00never\x00"])),
                                 use_tqdm=False)[0].outputs[0]
            rid = f"stream-{trial}-{len(extra)}"
            engine.add_request(prompt, params, request_id=rid)
            deltas, final = [], None
            while final is None:
                for out in engine.step():
                    if out.request_id == rid:
                        deltas.append(out.outputs[0].text_delta)
                        final = out if out.finished else None
            assert lazy.token_ids == eager.token_ids == final.outputs[0].token_ids
            assert lazy.text == eager.text == final.outputs[0].text == "".join(deltas), (trial, extra)
            # the same tokens ended by length instead: a stop token not shown leaves the text of the others
            shown = len(lazy.token_ids) - (1 if extra and not extra.get("include_stop_str_in_output") else 0)
            by_length = llm.generate([prompt], base.model_copy(update=dict(max_tokens=shown)), use_tqdm=False)[0]
            assert lazy.text == by_length.outputs[0].text, (trial, extra)


@pytest.mark.parametrize("n,stop", [(1, None), (2, ["\x00never\x00"])])
def test_output_kinds_delta_and_final_only(llm, n, stop):
    """delta: each streamed output carries only what is new (text, token_ids, logprobs), and the pieces add
    up to the complete output; final_only: one output, when the request ends; LLM.generate returns complete
    outputs whatever output_kind says (as vLLM's LLM does)."""
    prompt = _ids(9, 77)
    base = SamplingParams(temperature=1.0, seed=5, n=n, max_tokens=24, ignore_eos=True, logprobs=2, stop=stop)
    want = llm.generate([prompt], base, use_tqdm=False)[0].outputs
    streamed = list(llm.generate_stream(prompt, base.model_copy(update={"output_kind": "delta"})))
    assert streamed[-1].finished and len(streamed) > 2
    for c in want:
        pieces = [p for o in streamed for p in o.outputs if p.index == c.index]
        assert all(p.token_ids == p.token_ids_delta and p.text == p.text_delta for p in pieces)
        assert [t for p in pieces for t in p.token_ids] == c.token_ids
        assert "".join(p.text for p in pieces) == c.text
        assert [lp for p in pieces for lp in p.logprobs] == c.logprobs
        assert pieces[-1].cumulative_logprob == pytest.approx(c.cumulative_logprob)
    once = list(llm.generate_stream(prompt, base.model_copy(update={"output_kind": "final_only"})))
    assert len(once) == 1 and once[0].finished
    assert [(c.token_ids, c.text, c.logprobs) for c in once[0].outputs] == [(c.token_ids, c.text, c.logprobs) for c in want]
    for kind in ("delta", "final_only"):
        again = llm.generate([prompt], base.model_copy(update={"output_kind": kind}), use_tqdm=False)[0].outputs
        assert [(c.token_ids, c.text) for c in again] == [(c.token_ids, c.text) for c in want]
    with pytest.raises(ValidationError, match="output_kind"):
        SamplingParams(output_kind="deltas")


def test_outputs_are_what_model_construct_and_validation_give(llm):
    """The engine builds its outputs with outputs.trusted (no validation, no per-field loop): every field is
    set, they equal pydantic's own model_construct of the same values, and they validate unchanged."""
    from paged_backend.outputs import CompletionOutput, RequestMetrics, RequestOutput, trusted

    engine = llm.engine
    engine.add_request(_ids(8, 3), SamplingParams(max_tokens=5, ignore_eos=True, logprobs=2), request_id="trusted")
    outs = []
    while not outs or not outs[-1].finished:
        outs += [o for o in engine.step() if o.request_id == "trusted"]
    for out in outs:
        for obj, cls in ((out, RequestOutput), (out.outputs[0], CompletionOutput), (out.metrics, RequestMetrics)):
            assert set(obj.__dict__) == set(cls.model_fields)
            values = dict(obj.__dict__)
            assert trusted(cls, **values) == cls.model_construct(**values)
            assert trusted(cls, **values).model_fields_set == cls.model_construct(**values).model_fields_set
        assert RequestOutput.model_validate(out.model_dump()) == out
    assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].outputs[0].logprobs) == 5


def test_stats_report_kv_waste_and_prefix_hits(llm):
    p = _ids(50, 4)
    llm.generate([p], SamplingParams(max_tokens=2), use_tqdm=False)
    before = llm.stats().prefix_cache_hit_tokens
    out = llm.generate([p + [5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.num_cached_tokens == 48
    s = llm.stats()
    assert s.prefix_cache_hit_tokens - before == 48 and 0 < s.prefix_cache_hit_rate <= 1
    assert s.num_blocks_cached >= 3 and s.num_blocks_used == 0
    llm.engine.add_request(_ids(20, 5), SamplingParams(max_tokens=3), request_id="w")
    llm.engine.step()
    s = llm.stats()
    assert s.kv_slots_allocated == 32 and s.kv_slots_holding_tokens == 20
    llm.engine.abort_request("w")
    assert llm.stats().num_blocks_used == 0


BAD = [
    ("", None, "empty"),
    ([], None, "empty"),
    ("x " * 300, None, "max_model_len"),
    ("hi", dict(max_tokens=0), "max_tokens"),
    ("hi", dict(temperature=-0.5), "temperature"),
    ("hi", dict(top_p=0.0), "top_p"),
    ("hi", dict(top_p=1.5), "top_p"),
    ("hi", dict(n=0), "n"),
    ("hi", dict(stop=5), "stop"),
    ("hi", dict(stop=["ok", 3]), "stop"),
    ([10**9], None, "token ids"),
    ("hi", dict(seed=2**64 - 1, n=2, temperature=1.0), "seed"),
    ("hi", dict(seed=-1), "seed"),
    ("a lone surrogate \ud800 here", None, "prompt is not valid Unicode"),
    ("x" * 10**7, None, "characters"),  # refused before tokenising it
]


@pytest.mark.parametrize("prompt,params,word", BAD)
def test_bad_input_raises_clearly_and_llm_keeps_working(llm, prompt, params, word):
    with pytest.raises((ValueError, TypeError, ValidationError)) as e:
        llm.generate([prompt], SamplingParams(**params) if params else None, use_tqdm=False)
    assert word in str(e.value)
    assert llm.stats().num_blocks_used == 0 and llm.stats().num_waiting == 0
    ok = llm.generate(["still works"], SamplingParams(max_tokens=3), use_tqdm=False)
    assert ok[0].finished and ok[0].outputs[0].token_ids


def test_largest_seed_with_n_siblings_runs(llm):
    """seed + index would pass 2**63: sibling seeds wrap instead of overflowing the generator."""
    p = SamplingParams(seed=2**63 - 1, n=3, temperature=1.0, max_tokens=4, ignore_eos=True)
    out = llm.generate([_ids(5, 2)], p, use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [4, 4, 4]
    assert out.outputs == llm.generate([_ids(5, 2)], p, use_tqdm=False)[0].outputs  # seeded: reproducible


def test_vllm_prompt_dicts(llm):
    """vLLM's TextPrompt / TokensPrompt dicts give the same outputs as the plain str / id list;
    a dict with other keys is refused by name."""
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ids = _ids(7, 4)
    plain = llm.generate(["a text prompt", ids], greedy, use_tqdm=False)
    dicts = llm.generate([{"prompt": "a text prompt"}, {"prompt_token_ids": ids}], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    assert dicts[0].prompt == "a text prompt" and dicts[1].prompt_token_ids == ids
    single = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)
    assert single[0].outputs[0].token_ids == plain[1].outputs[0].token_ids
    with pytest.raises(TypeError, match="multi_modal_data"):
        llm.generate([{"prompt": "x", "multi_modal_data": {}}], greedy, use_tqdm=False)
    assert llm.stats().num_blocks_used == 0


def test_logit_bias_and_allowed_token_ids(llm):
    """OpenAI's logit_bias and vLLM's allowed_token_ids steer greedy decoding per request; ids past
    the vocabulary are refused when the request is added."""
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    ids = _ids(9, 6)
    base = llm.generate([ids], SamplingParams(**greedy), use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate([ids] * 3, [SamplingParams(**greedy), SamplingParams(**greedy, logit_bias={"77": 100}),
                                    SamplingParams(**greedy, allowed_token_ids=[5, 6])], use_tqdm=False)
    plain, forced, allowed = (o.outputs[0].token_ids for o in outs)
    assert plain == base and forced == [77] * 4 and set(allowed) <= {5, 6}
    banned = llm.generate([ids], SamplingParams(**greedy, logit_bias={base[0]: -100}), use_tqdm=False)
    assert banned[0].outputs[0].token_ids[0] != base[0]
    vocab = llm.engine.vocab_size
    for bad in ({"logit_bias": {vocab: 1.0}}, {"allowed_token_ids": [1, vocab + 5]}):
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            llm.generate([ids], SamplingParams(**bad), use_tqdm=False)
    assert llm.stats().num_blocks_used == 0


def test_prompt_text_is_reported_for_token_ids(llm):
    req = llm.engine.add_request(_ids(4, 3), SamplingParams(max_tokens=2), prompt_text="the rendered text")
    outs = []
    while llm.engine.has_unfinished_requests():
        outs += llm.engine.step()
    assert outs[-1].request_id == req.request_id and outs[-1].prompt == "the rendered text"


def test_a_failing_step_fails_only_its_requests(tiny_model_dir):
    """A request whose parameters skipped validation (model_construct) breaks the sampler inside a
    step: exactly the requests of that step are aborted and named; a request that was not in it
    keeps going, and no block leaks."""
    from paged_backend.engine.engine import StepFailed

    with LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", max_num_seqs=1) as llm:
        engine = llm.engine
        expected = llm.generate([_ids(6, 5)], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
        bad = SamplingParams.model_construct(**{**SamplingParams().model_dump(), "repetition_penalty": "x"})
        engine.add_request(_ids(6, 4), bad, request_id="bad")
        engine.add_request(_ids(6, 5), SamplingParams(temperature=0, max_tokens=6), request_id="good")
        with pytest.raises(StepFailed) as e:
            while engine.has_unfinished_requests():
                engine.step()
        assert e.value.request_ids == ["bad"] and "bad" not in engine.requests
        finals = []
        while engine.has_unfinished_requests():
            finals += [o for o in engine.step() if o.finished]
        assert [o.request_id for o in finals] == ["good"]
        assert finals[0].outputs[0].token_ids == expected.outputs[0].token_ids
        assert llm.stats().num_blocks_used == 0


def test_bad_batch_leaves_no_half_submitted_requests(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", "", "fine too"], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_chat_output_carries_the_rendered_prompt(llm):
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>") and out.prompt.endswith("<|im_start|>assistant\n")
    assert llm.get_tokenizer()(out.prompt, add_special_tokens=False)["input_ids"] == out.prompt_token_ids


@pytest.mark.parametrize(
    "messages,word",
    [
        ([{"content": "hi"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": None}], "content"),
        ([], "conversation"),
        (["hi"], "dict"),
    ],
)
def test_bad_chat_messages(llm, messages, word):
    with pytest.raises(ValueError) as e:
        llm.chat(messages, use_tqdm=False) if messages else llm.chat([messages], use_tqdm=False)
    assert word in str(e.value)


def test_bad_models_are_named(tmp_path):
    with pytest.raises(Exception) as e:
        LLM("no-such-model-anywhere-42", device="cpu")
    assert "no-such-model-anywhere-42" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception) as e:
        LLM(str(tmp_path / "empty"), device="cpu")
    assert "config.json" in str(e.value)


def test_corrupt_safetensors_is_named(tiny_model_dir, tmp_path):
    import shutil

    src = tiny_model_dir("qwen2")
    dst = tmp_path / "corrupt"
    shutil.copytree(src, dst)
    st = next(dst.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(Exception) as e:
        LLM(str(dst), device="cpu")
    assert st.name in str(e.value)


def test_cli_generate_answers_paris():
    r = subprocess.run(
        [sys.executable, "-m", "paged_backend.cli", "generate", "--max-tokens", "24", "What is the capital of France?"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout

"""Structured outputs with the bundled SmolLM2-135M (a weak model: the grammar does the work):
JSON schemas, json_object, regex, choice, EBNF grammars; batched with unconstrained requests;
the same outputs under prefix caching, chunked prefill and preemption; bad specs rejected."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import numpy as np
import pytest
import torch

from paged_backend import LLM, SamplingParams, StructuredOutputs
from structured_schemas import SCHEMAS

MAX_TOKENS = 100  # every schema bounds its strings, arrays and numbers well below this
PROMPT = "Here is an example JSON value:"


def _schema(s) -> dict:
    return s.model_json_schema() if isinstance(s, type) else s


@pytest.fixture(scope="module")
def llm(bundled_llm):
    return bundled_llm("smollm2-135m-instruct")


def _json_params(temperature: float, seed_base: int = 0) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed_base + i,
                       structured_outputs=StructuredOutputs(json=s))
        for i, s in enumerate(SCHEMAS)
    ]


def test_every_schema_validates_greedy_and_sampled_batched_with_unconstrained(llm):
    assert len(SCHEMAS) >= 30
    free = [SamplingParams(max_tokens=20, temperature=0.0), SamplingParams(max_tokens=20, temperature=0.8, seed=3),
            SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.3)]
    params = _json_params(0.0) + _json_params(1.0) + free
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    for i, out in enumerate(outs[: 2 * len(SCHEMAS)]):
        c = out.outputs[0]
        schema = _schema(SCHEMAS[i % len(SCHEMAS)])
        assert c.finish_reason == "stop", f"schema {i % len(SCHEMAS)}: did not finish: {c.text!r}"
        jsonschema.validate(json.loads(c.text), schema)  # raises with the reason if it does not
    # the unconstrained rows of the same batch are what they are alone
    alone = llm.generate([PROMPT] * 3, free, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[-3:]] == [o.outputs[0].token_ids for o in alone]
    # and a constrained greedy row alone is what it was in the batch
    again = llm.generate(PROMPT, _json_params(0.0)[29], use_tqdm=False)[0].outputs[0]
    assert again.token_ids == outs[29].outputs[0].token_ids
    assert llm.stats().num_blocks_used == 0


GRAMMAR = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]?
"""


def test_regex_choice_grammar_json_object(llm):
    regex = r"[A-Z][a-z]{2,6} [0-9]{1,3}(\.[0-9])?"
    choices = ["Paris", "London", "New York", "Tokyo"]
    params = [
        SamplingParams(max_tokens=30, temperature=0.0, structured_outputs={"regex": regex}),
        SamplingParams(max_tokens=30, temperature=1.0, seed=1, structured_outputs={"regex": regex}),
        SamplingParams(max_tokens=10, temperature=1.0, seed=2, n=3, structured_outputs={"choice": choices}),
        SamplingParams(max_tokens=40, temperature=0.7, seed=4, structured_outputs={"grammar": GRAMMAR}),
        SamplingParams(max_tokens=60, temperature=0.0, structured_outputs={"json_object": True}),
        SamplingParams(max_tokens=10, temperature=0.0),
    ]
    prompts = ["Name and number:", "Name and number:", "The capital of France is", "2+2=", "JSON:", "Hello"]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out in outs[:2]:
        assert re.fullmatch(regex, out.outputs[0].text), out.outputs[0].text
    assert len(outs[2].outputs) == 3 and all(c.text in choices for c in outs[2].outputs)
    expr = outs[3].outputs[0]
    if expr.finish_reason == "stop":
        assert re.fullmatch(r"[0-9+\-()]+", expr.text)
        eval(compile(expr.text, "<grammar output>", "eval"), {})  # parses as an arithmetic expression
    else:  # cut by max_tokens: still a prefix the grammar allows
        assert re.fullmatch(r"[0-9+\-()]*", expr.text)
    obj = outs[4].outputs[0]
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    else:  # any JSON object may be longer than max_tokens (a weak model likes long strings)
        assert obj.text.startswith("{")


def test_same_outputs_with_chunked_prefill_preemption_and_prefix_cache(llm):
    """Greedy constrained outputs do not depend on how the scheduler cut the work."""
    from paged_backend.loader import resolve_model
    from paged_backend.models.registry import kv_cache_shape_info

    picks = [0, 11, 21, 27, 29, 30]
    prompts = [f"Record {i} of the customer database, as JSON, with every field filled in:" for i in picks]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, structured_outputs={"json": SCHEMAS[i]})
              for i in picks]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    layers, hkv, d = kv_cache_shape_info(resolve_model("smollm2-135m-instruct").hf_config)
    blocks = 14  # 6 sequences of ~20 prompt + up to ~60 output tokens do not fit: preemption
    with LLM("smollm2-135m-instruct", dtype="float32", device="cpu", max_num_batched_tokens=16,
             kv_cache_memory=blocks * layers * 2 * 16 * hkv * d * 4, max_model_len=blocks * 16) as small:
        for round_ in range(2):  # the second round starts on a warm prefix cache
            got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
            assert got == expected, f"round {round_}"
        stats = small.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0 and stats.num_blocks_used == 0


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"json": {"type": "nonsense"}}, ["structured_outputs.json", "nonsense"]),
        ({"json": {"type": "object", "minProperties": 1}}, ["structured_outputs.json"]),
        ({"json": "{not json"}, ["structured_outputs.json", "not valid JSON"]),
        ({"json": [1, 2]}, ["structured_outputs.json"]),
        ({"regex": "(unclosed"}, ["structured_outputs.regex", "parenthesis"]),
        ({"grammar": "root ::= missing_rule"}, ["structured_outputs.grammar", "missing_rule"]),
        ({"choice": []}, ["structured_outputs.choice"]),
        ({"regex": "a", "choice": ["b"]}, ["exactly one"]),
        ({}, ["exactly one"]),
        ({"jsn": {}}, ["jsn"]),
    ],
)
def test_bad_specs_are_refused_and_the_engine_keeps_serving(llm, spec, words):
    with pytest.raises(ValueError) as e:
        llm.generate("x", SamplingParams(max_tokens=2, structured_outputs=spec), use_tqdm=False)
    for w in words:
        assert w in str(e.value)
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate("x", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_pydantic_class_and_compile_cache(llm):
    from structured_schemas import Pet

    a = StructuredOutputs(json=Pet)
    b = StructuredOutputs(json=Pet.model_json_schema())
    assert a.key == b.key
    compiler = llm.engine.structured.compiler
    assert compiler.submit(a) is compiler.submit(b)  # compiled once per distinct spec
    out = llm.generate("A pet:", SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured_outputs={"json": Pet}),
                       use_tqdm=False)[0].outputs[0]
    Pet.model_validate_json(out.text)


def test_request_waits_for_its_grammar_without_stalling_others(llm):
    """While the compile thread is busy, a constrained request waits outside the queue and an
    unconstrained one runs to the end; once the thread is free the constrained one runs."""
    engine = llm.engine
    gate = threading.Event()
    blocker = engine.structured.compiler._pool.submit(gate.wait)  # occupy the real compile thread
    try:
        constrained = engine.add_request("A number:", SamplingParams(
            max_tokens=8, temperature=0, structured_outputs={"regex": "[0-9]{3} apples"}))
        free = engine.add_request("Hello", SamplingParams(max_tokens=5, temperature=0))
        finished = set()
        for _ in range(40):
            finished |= {o.request_id for o in engine.step() if o.finished}
            if free.request_id in finished:
                break
        assert free.request_id in finished and constrained.request_id not in finished
        assert engine.stats().num_waiting == 1
    finally:
        gate.set()
        blocker.result()
    texts = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            texts[o.request_id] = o.outputs[0].text
    assert re.fullmatch("[0-9]{3} apples", texts[constrained.request_id])


def test_bitmask_covers_a_model_vocab_larger_than_the_tokenizer(smollm_tokenizer):
    """Padded logit ids beyond the tokenizer's vocabulary are never allowed by a grammar."""
    from paged_backend.runtime.grammar_mask import apply_grammar_bitmask
    from paged_backend.structured.compiler import GrammarCompiler
    from paged_backend.structured.matcher import BitmaskFiller, SequenceGrammar

    tok = smollm_tokenizer
    vocab = len(tok) + 100
    compiled = GrammarCompiler(tok, vocab, [tok.eos_token_id]).submit(StructuredOutputs(choice=["yes", "no"])).result()
    mask = torch.zeros(2, -(-vocab // 32), dtype=torch.int32)  # row 0 unconstrained: never read
    BitmaskFiller(vocab).fill([SequenceGrammar(compiled)], mask.numpy(), [1])
    logits = torch.zeros(2, vocab)
    logits[:, len(tok):] = 100.0  # the padded ids would win without the mask
    apply_grammar_bitmask(logits, mask, [1])
    assert torch.isinf(logits[1, len(tok):]).all() and logits[0].isfinite().all()
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(("yes".startswith(tok.decode([t])) or "no".startswith(tok.decode([t]))) for t in allowed)
    with pytest.raises(ValueError, match="bitmask buffer"):
        BitmaskFiller(vocab).fill([SequenceGrammar(compiled)], np.zeros((1, 3), dtype=np.int32), [0])


def test_forced_tool_calls_through_llm_chat(llm):
    """ToolCalling's prompt and constraint through LLM.chat: every call parses and validates."""
    from paged_backend import ToolCalling

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        calling = ToolCalling([weather], choice, chat_template=llm.get_tokenizer().chat_template)
        messages, tools = calling.prepare([{"role": "user", "content": "Forecast for Paris this week?"}])
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured_outputs=calling.structured)
        out = llm.chat(messages, params, tools=tools, use_tqdm=False)[0].outputs[0]
        content, calls = calling.parse(out.text)
        assert content is None and calls and all(c.name == "get_weather" for c in calls)
        for c in calls:
            jsonschema.validate(json.loads(c.arguments), weather["function"]["parameters"])


def test_constrained_rows_do_not_stall_the_pipeline(llm, monkeypatch):
    """A constrained sequence's next step is launched before its previous token is read back (the
    mask is filled while the forward pass runs), like an unconstrained one's."""
    engine = llm.engine
    monkeypatch.setattr(engine, "overlap_steps", True)  # the GPU's pipelining; the CPU's default skips it
    spec = StructuredOutputs(regex="[0-9]{6}")
    engine.structured.compiler.submit(spec).result()  # compiled: the request is queued at once
    req = engine.add_request("A number:", SamplingParams(max_tokens=6, temperature=0, structured_outputs=spec))
    seq = req.seqs[0]
    engine.step()  # prefill launched, its token still on the device
    assert seq.pending is not None and seq.num_output_tokens == 0
    engine.step()  # the next step is launched first, then the first token is read back
    assert seq.num_output_tokens == 1 and seq.pending is not None
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step() if o.finished]
    assert re.fullmatch("[0-9]{6}", texts[-1])


def _random_masks(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """Every kind of row: random bits, one allowed token, all but a few allowed, all allowed."""
    mask = np.zeros((rows, width), dtype=np.int32)
    for i in range(rows):
        kind = i % 4
        if kind == 0:
            mask[i] = rng.integers(-2**31, 2**31 - 1, size=width, dtype=np.int64).astype(np.int32)
        elif kind == 1:
            mask[i, rng.integers(0, width)] = 1 << int(rng.integers(0, 31))
        else:
            mask[i] = -1
            if kind == 2:
                mask[i, rng.integers(0, width)] = 0
    return mask


@pytest.mark.parametrize("vocab", [100, 49152 + 7])
def test_cpu_mask_application_matches_xgrammar_kernel(vocab):
    """The CPU path (a whole row at a time) masks exactly what xgrammar's own kernel masks."""
    import xgrammar as xgr

    from paged_backend.runtime.grammar_mask import apply_grammar_bitmask

    mask = _random_masks(np.random.default_rng(vocab), 12, -(-vocab // 32))
    rows = [0, 1, 2, 3, 5, 6, 9, 11]
    logits = torch.randn(12, vocab)
    expected, got = logits.clone(), logits.clone()
    xgr.apply_token_bitmask_inplace(expected, torch.from_numpy(mask), vocab_size=vocab, indices=rows)
    apply_grammar_bitmask(got, torch.from_numpy(mask), rows)
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mask_from_the_page_locked_buffer_matches_the_cpu():
    """On CUDA: the engine's page-locked buffer, the constrained rows only (padded to one row-count
    class), xgrammar's kernel: the same logits as on the CPU, for every batch size."""
    from paged_backend.runtime.grammar_mask import GrammarMasks, apply_grammar_bitmask

    vocab, masks, rng = 128256, GrammarMasks(), np.random.default_rng(0)
    for n in (1, 5, 16, 33, 256):
        buf = masks.buffer(n, vocab // 32, torch.device("cuda"))
        assert buf.is_pinned()
        buf.numpy()[:] = _random_masks(rng, n, vocab // 32)
        rows = sorted(rng.choice(n, size=max(1, n // 2), replace=False).tolist())
        logits = torch.randn(n, vocab)
        on_gpu = apply_grammar_bitmask(logits.cuda(), buf, rows).cpu()
        assert torch.equal(on_gpu, apply_grammar_bitmask(logits, buf.clone(), rows)), n


def test_masks_fill_while_the_previous_step_is_post_processed(llm, monkeypatch):
    """The fill of step N's masks runs in the structured component's worker thread while the main
    thread post-processes step N-1 (a fill that waited for the post-processing would time out here),
    and the outputs are what they are without the overlap: valid, and a greedy row's tokens those it
    has alone."""
    from paged_backend.engine.engine import Engine
    from paged_backend.structured.matcher import BitmaskFiller
    from paged_backend.structured.requests import StructuredRequests

    main, finishing = threading.get_ident(), threading.Event()
    overlapped = []
    fill, finish, sync = BitmaskFiller.fill, Engine._finish, StructuredRequests._sync

    def sync_then_await_post_processing(self, row_seqs, pending_token):
        finishing.clear()  # (set again only by a post-processing that starts after this sync)
        return sync(self, row_seqs, pending_token)

    def fill_waiting_for_post_processing(self, grammars, out, rows):
        if threading.get_ident() != main:  # (a step with nothing in flight fills on the main thread)
            overlapped.append(finishing.wait(timeout=10))
        return fill(self, grammars, out, rows)

    def finish_announced(self, launched, emit_unfinished):
        finishing.set()
        return finish(self, launched, emit_unfinished)

    params = _json_params(0.0)[:2] + [SamplingParams(max_tokens=30, temperature=0.0)]
    alone = [llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0].token_ids for p in params]
    # Steps overlap as on a GPU (an engine that finishes each CPU step at once has none in flight).
    monkeypatch.setattr(llm.engine, "overlap_steps", True)
    monkeypatch.setattr(BitmaskFiller, "fill", fill_waiting_for_post_processing)
    monkeypatch.setattr(Engine, "_finish", finish_announced)
    monkeypatch.setattr(StructuredRequests, "_sync", sync_then_await_post_processing)
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    assert len(overlapped) > 5 and all(overlapped), overlapped
    for out, p, ids in zip(outs, params, alone):
        assert out.outputs[0].token_ids == ids
        if p.structured_outputs is not None:
            assert out.outputs[0].finish_reason == "stop"
            jsonschema.validate(json.loads(out.outputs[0].text), p.structured_outputs.json)
    assert llm.stats().num_blocks_used == 0

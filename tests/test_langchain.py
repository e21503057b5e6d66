"""LangChain adapters: LCEL chains on PagedBackendLLM (batched, streamed, stop, callbacks) and
ChatPagedBackend on the bundled SmolLM2 (chat template, streaming, usage)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate  # noqa: E402

from conftest import LANGCHAIN_SMOLLM  # noqa: E402
from paged_backend import LLM, AsyncLLM  # noqa: E402
from paged_backend.adapters.langchain import ChatPagedBackend, PagedBackendLLM  # noqa: E402

CPU = dict(dtype="float32", device="cpu")
TOPICS = [{"x": f"topic number {i}"} for i in range(8)]


class TokenCollector(BaseCallbackHandler):
    run_inline = True

    def __init__(self):
        self.tokens: list[str] = []
        self.results = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)

    def on_llm_end(self, response, **kwargs):
        self.results.append(response)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """Greedy, never stopping at EOS: every prompt makes exactly max_tokens tokens."""
    llm = PagedBackendLLM(model=tiny_dir, **CPU, temperature=0, max_tokens=12, ignore_eos=True, max_num_seqs=32)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def chain(tiny):
    return PromptTemplate.from_template("Tell me about {x}.") | tiny | StrOutputParser()


@pytest.fixture(scope="module")
def smol(langchain_smollm_engine):
    llm = PagedBackendLLM(**LANGCHAIN_SMOLLM, temperature=0, max_tokens=24)
    assert llm.async_engine is langchain_smollm_engine  # the session's, shared with the other LangChain modules
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def chat(smol):
    return ChatPagedBackend.from_engine(smol.async_engine, temperature=0, max_tokens=24)


# ---- PagedBackendLLM in an LCEL chain ------------------------------------------------------------
def test_batch_of_8_reaches_the_engine_as_one_batch(tiny_dir):
    llm = PagedBackendLLM(model=tiny_dir, **CPU, temperature=0, max_tokens=16, ignore_eos=True)
    try:
        chain = PromptTemplate.from_template("Tell me about {x}.") | llm | StrOutputParser()
        outs = chain.batch(TOPICS)
        stats = llm.async_engine.stats()
    finally:
        llm.shutdown()
    assert len(outs) == 8 and all(isinstance(o, str) and o for o in outs)
    assert stats.max_seqs_in_step >= 8, stats
    assert stats.total_generated_tokens == 8 * 16
    # One prompt after the other would take 8 * 16 = 128 steps; one batch takes ~16.
    assert stats.num_steps < 2 * 16, stats


def test_invoke_batch_stream_astream_agree(chain):
    expected = [chain.invoke(t) for t in TOPICS[:3]]
    assert all(expected) and len(set(expected)) == 3
    assert chain.batch(TOPICS[:3]) == expected
    assert asyncio.run(chain.abatch(TOPICS[:3])) == expected
    assert asyncio.run(chain.ainvoke(TOPICS[0])) == expected[0]

    chunks = list(chain.stream(TOPICS[0]))
    assert len(chunks) > 1, "not streamed token by token"
    assert "".join(chunks) == expected[0]

    async def collect():
        return [c async for c in chain.astream(TOPICS[1])]

    achunks = asyncio.run(collect())
    assert len(achunks) > 1 and "".join(achunks) == expected[1]


def test_generation_info_usage_and_kwargs_override(tiny):
    res = tiny.generate(["Hello there", "One two three four"])
    assert res.llm_output["model_name"] == tiny.model
    gens = [g[0] for g in res.generations]
    prompt_tokens = [len(tiny.get_token_ids(p)) for p in ["Hello there", "One two three four"]]
    for g, n_prompt in zip(gens, prompt_tokens):
        assert g.generation_info["finish_reason"] == "length"
        assert g.generation_info["completion_tokens"] == 12
        assert g.generation_info["prompt_tokens"] >= n_prompt  # plus a BOS token, if the tokenizer adds one
    usage = res.llm_output["token_usage"]
    assert usage["completion_tokens"] == 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + 24

    # Per-call kwargs override the fields, also through .bind in a chain.
    short = tiny.generate(["Hello there"], max_tokens=3).generations[0][0]
    assert short.generation_info["completion_tokens"] == 3
    assert short.text == gens[0].text[: len(short.text)]
    assert (tiny.bind(max_tokens=3) | StrOutputParser()).invoke("Hello there") == short.text
    # seeded sampling is reproducible
    a = tiny.invoke("Hello there", temperature=1.0, seed=7)
    assert a == tiny.invoke("Hello there", temperature=1.0, seed=7)
    with pytest.raises(ValueError, match="unknown generation argument"):
        tiny.invoke("Hello there", not_a_param=1)
    # n completions per prompt, as n Generations
    two = tiny.generate(["Hello there"], n=2, temperature=1.0, seed=3).generations[0]
    assert len(two) == 2 and all(g.generation_info["completion_tokens"] == 12 for g in two)
    with pytest.raises(ValueError, match="n=1"):
        list(tiny.stream("Hello there", n=2))


def test_stop_sequences_cut_the_output(tiny):
    prompt = "Tell me about topic number 3."
    full = tiny.invoke(prompt)
    stop = full[6:9]
    assert stop.strip(), full
    expected = full[: full.find(stop)]

    assert tiny.invoke(prompt, stop=[stop]) == expected
    assert "".join(tiny.stream(prompt, stop=[stop])) == expected
    gen = tiny.generate([prompt], stop=[stop]).generations[0][0]
    assert gen.text == expected
    assert gen.generation_info["finish_reason"] == "stop"
    assert gen.generation_info["stop_reason"] == stop
    # the field's stop strings apply too, and a call's stop strings add to them
    with_field = tiny.model_copy(update={"stop": [stop]})
    assert with_field.invoke(prompt) == expected
    assert with_field.invoke(prompt, stop=["\x00never"]) == expected


def test_callbacks_receive_every_token(tiny, chain):
    expected = chain.invoke(TOPICS[2])

    h = TokenCollector()
    streamed = "".join(chain.stream(TOPICS[2], config={"callbacks": [h]}))
    assert streamed == expected
    assert len(h.tokens) == 12, "one callback per generated token"
    assert "".join(h.tokens) == expected
    info = h.results[-1].generations[0][0].generation_info
    assert info["completion_tokens"] == 12 and info["finish_reason"] == "length"

    ha = TokenCollector()

    async def consume():
        return "".join([c async for c in chain.astream(TOPICS[2], config={"callbacks": [ha]})])

    assert asyncio.run(consume()) == expected
    assert len(ha.tokens) == 12 and "".join(ha.tokens) == expected

    # streaming=True: invoke (not stream) reports the tokens as they come, sync and async
    streaming = tiny.model_copy(update={"streaming": True})
    hs = TokenCollector()
    streaming_chain = PromptTemplate.from_template("Tell me about {x}.") | streaming | StrOutputParser()
    assert streaming_chain.invoke(TOPICS[2], config={"callbacks": [hs]}) == expected
    assert len(hs.tokens) == 12 and "".join(hs.tokens) == expected
    hsa = TokenCollector()
    assert asyncio.run(streaming_chain.ainvoke(TOPICS[2], config={"callbacks": [hsa]})) == expected
    assert "".join(hsa.tokens) == expected


def test_closing_a_stream_early_aborts_the_request(tiny):
    stream = tiny.stream("Tell me about topic number 5.", max_tokens=200)
    first = [next(stream), next(stream)]
    assert all(isinstance(c, str) for c in first)
    stream.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        stats = tiny.async_engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            break
        time.sleep(0.05)
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_engine_sharing_and_construction(tiny, tiny_dir):
    other = PagedBackendLLM.from_engine(tiny.async_engine, temperature=0, max_tokens=4)
    assert other.async_engine is tiny.async_engine and other.model == tiny.model
    other.shutdown()  # does not own the engine: a no-op
    assert tiny.invoke("Hello", max_tokens=2)
    assert PagedBackendLLM(engine=tiny.async_engine).async_engine is tiny.async_engine
    with pytest.raises(ValueError, match="model="):
        PagedBackendLLM()
    ident = tiny._identifying_params
    assert ident["model"] == tiny_dir and ident["temperature"] == 0 and ident["max_tokens"] == 12
    assert tiny._llm_type == "paged-backend"
    ls = tiny._get_ls_params(stop=["x"])
    assert ls["ls_provider"] == "paged_backend" and ls["ls_model_name"] == tiny_dir and ls["ls_stop"] == ["x"]
    assert isinstance(tiny.async_engine, AsyncLLM)
    with pytest.raises(TypeError, match="AsyncLLM"):  # the offline LLM cannot stream
        PagedBackendLLM(engine=LLM.__new__(LLM))


def _engine_threads() -> int:
    return sum(t.name == "paged-backend-engine" for t in threading.enumerate())


def test_adapters_share_one_engine_per_engine_arguments_and_free_it(tiny_dir):
    """Issue 13, defect 5: every adapter used to start its own engine and thread, never freed."""
    small = dict(CPU, kv_cache_memory=2**24)
    before = _engine_threads()
    a = PagedBackendLLM(model=tiny_dir, **small, max_tokens=3, ignore_eos=True)
    b = ChatPagedBackend(model=tiny_dir, **small, temperature=0)  # other sampling defaults: same engine
    c = PagedBackendLLM(model=tiny_dir, **small, engine_seed=1, enforce_eager=True)  # other engine arguments
    assert a.async_engine is b.async_engine and c.async_engine is not a.async_engine
    assert (c.async_engine.args.seed, c.async_engine.args.enforce_eager) == (1, True)
    assert _engine_threads() == before + 2
    with pytest.raises(ValueError, match="top_p"):  # sampling fields are validated as SamplingParams'
        PagedBackendLLM(model=tiny_dir, **small, top_p=1.5)
    assert _engine_threads() == before + 2

    copy = a.model_copy(update={"max_tokens": 2})  # a copy holds the engine as the original does
    shared = a.async_engine
    del a
    gc.collect()
    assert copy.generate(["Hello"]).generations[0][0].generation_info["completion_tokens"] == 2
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.invoke("Hello")
    assert _engine_threads() == before + 2 and not shared._stopping
    del copy
    gc.collect()
    assert shared._stopping and _engine_threads() == before + 1
    c.close()
    assert _engine_threads() == before


def test_model_call_argument_names_the_served_model(tiny):
    assert tiny.invoke("Hello", model=tiny.model, max_tokens=2) == tiny.invoke("Hello", max_tokens=2)
    with pytest.raises(ValueError, match="serves"):
        tiny.invoke("Hello", model="some-other-model")


def test_prompts_per_call_limit(tiny):
    limited = PagedBackendLLM.from_engine(tiny.async_engine, max_prompts_per_call=2, max_tokens=2)
    assert len(limited.generate(["a", "b"]).generations) == 2
    with pytest.raises(ValueError, match="at most 2"):
        limited.generate(["a", "b", "c"])
    with pytest.raises(ValueError, match="at most 2"):
        asyncio.run(limited.agenerate(["a", "b", "c"]))


# ---- ChatPagedBackend on SmolLM2-135M-Instruct ---------------------------------------------------
MESSAGES = [SystemMessage("You are a helpful assistant."), HumanMessage("What is the capital of France?")]


def test_chat_answers_paris_with_usage(chat, smol):
    assert chat.async_engine is smol.async_engine  # one engine, two adapters
    msg = chat.invoke(MESSAGES)
    assert "Paris" in msg.content, msg.content
    usage = msg.usage_metadata
    assert usage["input_tokens"] == chat.get_num_tokens_from_messages(MESSAGES)
    assert usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert msg.response_metadata["finish_reason"] == "stop"
    assert msg.response_metadata["model_name"] == "smollm2-135m-instruct"


def test_chat_streams_with_usage_on_the_last_chunk(chat):
    expected = chat.invoke(MESSAGES)
    chunks = list(chat.stream(MESSAGES))
    assert len(chunks) > 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.content for c in chunks) == expected.content
    assert all(c.usage_metadata is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.chunk_position == "last"
    assert last.usage_metadata == expected.usage_metadata
    assert last.response_metadata["finish_reason"] == "stop"
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert merged.content == expected.content and merged.usage_metadata == expected.usage_metadata

    h = TokenCollector()

    async def consume():
        return [c async for c in chat.astream(MESSAGES, config={"callbacks": [h]})]

    achunks = asyncio.run(consume())
    assert "".join(c.content for c in achunks) == expected.content
    assert "".join(h.tokens) == expected.content
    assert achunks[-1].usage_metadata == expected.usage_metadata


def test_chat_prompt_chain_stop_and_batch(chat):
    prompt = ChatPromptTemplate.from_messages([("system", "You are a helpful assistant."), ("human", "{q}")])
    chain = prompt | chat | StrOutputParser()
    answer = chain.invoke({"q": "What is the capital of France?"})
    assert "Paris" in answer
    cut = (prompt | chat.bind(stop=[" Paris"]) | StrOutputParser()).invoke({"q": "What is the capital of France?"})
    assert cut == answer[: answer.find(" Paris")]
    # concurrent sync calls (Runnable.batch runs them in threads) share the engine
    both = chain.batch([{"q": "What is the capital of France?"}, {"q": "What is 2+2?"}])
    assert both[0] == answer and both[1]
    assert asyncio.run(chain.abatch([{"q": "What is the capital of France?"}]))[0] == answer


def test_llm_on_the_bundled_model_stops_at_newline(smol):
    out = smol.invoke("Q: What is the capital of France?\nA:", stop=["\n"])
    assert "Paris" in out and "\n" not in out

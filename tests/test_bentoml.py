"""The BentoML service end to end: a real `bentoml serve` process on 127.0.0.1, driven with the
official `openai` client (and httpx for what the client does not expose)."""

from __future__ import annotations

import asyncio
import time

import pytest

bentoml = pytest.importorskip("bentoml")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from service_server import REQUEST_TIMEOUT_S, Server  # noqa: E402
from service_server import wait_idle as _wait_idle  # noqa: E402


@pytest.fixture(scope="module")
def servers(shared_servers):
    """Both servers start at once (their start-up overlaps): a tiny random llama and SmolLM2 (shared with
    the other modules that serve them with the same arguments)."""
    return shared_servers.get("tiny", "smollm")


@pytest.fixture(scope="module")
def tiny(servers) -> Server:
    return servers["tiny"]


@pytest.fixture(scope="module")
def smollm(servers) -> Server:
    return servers["smollm"]


HI = [{"role": "user", "content": "Say hi to the test suite."}]


def test_models_health_and_stats_routes(tiny):
    models = tiny.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(f"{tiny.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    st = tiny.stats()
    assert st["num_blocks_total"] > 0 and st["num_blocks_used"] == 0


def test_chat_stream_deltas_concatenate_to_the_greedy_answer(tiny):
    client = tiny.client()
    full = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0)
    answer = full.choices[0].message.content
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length" and answer
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert len(content) > 3, "not streamed token by token"
    assert "".join(c.choices[0].delta.content or "" for c in content) == answer
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_completions_prompt_forms_echo_logprobs_and_stream(tiny):
    client = tiny.client()
    one = client.completions.create(model="tiny", prompt="The weather today is", max_tokens=6, temperature=0)
    text = one.choices[0].text
    assert one.object == "text_completion" and one.usage.completion_tokens == 6 and text

    streamed = client.completions.create(model="tiny", prompt="The weather today is", max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text

    many = client.completions.create(model="tiny", prompt=["The weather today is", "Once upon"], max_tokens=6,
                                     temperature=0, echo=True)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == "The weather today is" + text
    assert many.choices[1].text.startswith("Once upon")

    ids = [504, 3458, 1789, 314]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, logprobs=2)
    assert by_ids.usage.prompt_tokens == len(ids)
    lp = by_ids.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == by_ids.choices[0].text
    for tok, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok_lp <= 0 and len(top) == 2
        assert tok_lp == pytest.approx(max(top.values())), "greedy: the sampled token is the most likely one"

    # streamed (the engine hands the route only each step's new tokens): the same logprobs, offsets and usage
    parts = list(client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, logprobs=2,
                                           stream=True, stream_options={"include_usage": True}))
    got = [c.choices[0].logprobs for c in parts if c.choices and c.choices[0].logprobs]
    assert [t for g in got for t in g.tokens] == lp.tokens
    assert [x for g in got for x in g.token_logprobs] == pytest.approx(lp.token_logprobs)
    assert [x for g in got for x in g.text_offset] == lp.text_offset
    assert parts[-1].usage.model_dump() == by_ids.usage.model_dump()


def test_n2_chat_and_seeded_stream_reproduces_it(tiny):
    client = tiny.client()
    kw = dict(model="tiny", messages=HI, max_tokens=8, temperature=1.0, seed=1234, n=2)
    full = client.chat.completions.create(**kw)
    assert sorted(c.index for c in full.choices) == [0, 1]
    assert 2 <= full.usage.completion_tokens <= 16
    texts = {c.index: "" for c in full.choices}
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {c.index: c.message.content for c in full.choices}, "same seed, same samples"
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_bad_requests_get_400_while_a_good_request_completes(tiny):
    async def main():
        client = tiny.async_client()
        good = asyncio.ensure_future(client.chat.completions.create(
            model="tiny", messages=HI, max_tokens=48, temperature=0, extra_body={"ignore_eos": True}))
        errors = {}
        for name, kw in {
            "temperature": dict(messages=HI, temperature=-1),
            "messages": dict(messages=[]),
            "top_logprobs": dict(messages=HI, top_logprobs=3),
        }.items():
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(model="tiny", max_tokens=4, **kw)
            errors[name] = e.value
        with pytest.raises(openai.BadRequestError) as too_long:
            await client.completions.create(model="tiny", prompt=[5] * 600, max_tokens=4)
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="gpt-17", messages=HI, max_tokens=4)
        done = await good
        await client.close()
        return errors, too_long.value, unknown.value, done

    errors, too_long, unknown, done = asyncio.run(main())
    for name, err in errors.items():
        assert err.status_code == 400
        body = err.body  # openai gives the "error" object
        assert body["type"] == "invalid_request_error" and name in body["message"], body
    assert "temperature" in errors["temperature"].body["param"]
    assert too_long.status_code == 400 and "512" in too_long.body["message"], too_long.body
    assert unknown.status_code == 404 and unknown.body["code"] == "model_not_found"
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 48
    bad_json = httpx.post(f"{tiny.url}/v1/completions", content=b"{not json", timeout=10,
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    _wait_idle(tiny)


def test_32_concurrent_streams_equal_offline_greedy(tiny):
    from paged_backend import LLM, SamplingParams

    prompts = [f"Request number {i} says" + " hello" * (i % 5) for i in range(32)]
    with LLM(str(tiny.model_dir), dtype="float32", device="cpu") as offline:
        outs = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    expected = [o.outputs[0].text for o in outs]

    async def one(client, prompt):
        text, n_chunks = "", 0
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            n_chunks += 1
            text += chunk.choices[0].text if chunk.choices else ""
        return text, n_chunks

    async def main():
        client = tiny.async_client()
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), REQUEST_TIMEOUT_S)
        finally:
            await client.close()

    before = tiny.stats()["max_seqs_in_step"]
    results = asyncio.run(main())
    assert [t for t, _ in results] == expected
    assert all(n > 2 for _, n in results)
    assert tiny.stats()["max_seqs_in_step"] >= max(before, 8), "the streams did not share batches"
    _wait_idle(tiny)


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(tiny):
    client = tiny.client()
    before = tiny.stats()["total_generated_tokens"]
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=400, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    during = tiny.stats()
    assert during["num_running"] == 1 and during["num_blocks_used"] > 0
    stream.close()  # the client goes away
    after = _wait_idle(tiny)
    assert after["total_generated_tokens"] - before < 400, "the request ran to the end instead of being aborted"

    # A non-streamed request whose client goes away while it runs is aborted too. The client is
    # cancelled once the stats route shows the request generating, so no timing is assumed.
    before = after["total_generated_tokens"]

    async def give_up_mid_request():
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
            task = asyncio.ensure_future(http.post(
                f"{tiny.url}/v1/chat/completions",
                json={"model": "tiny", "messages": HI, "max_tokens": 480, "ignore_eos": True}))
            deadline = time.monotonic() + 30
            while tiny.stats()["total_generated_tokens"] == before:
                assert not task.done(), "the request finished before it was seen running"
                assert time.monotonic() < deadline, "the request never started"
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(give_up_mid_request())
    after = _wait_idle(tiny)
    assert after["total_generated_tokens"] - before < 480, "the request ran to the end instead of being aborted"


def test_bentoml_generate_api_streams_text(tiny):
    r = httpx.post(f"{tiny.url}/generate", json={"prompt": "The weather today is", "max_tokens": 6}, timeout=60)
    assert r.status_code == 200
    same = tiny.client().completions.create(model="tiny", prompt="The weather today is", max_tokens=6, temperature=0)
    assert r.text == same.choices[0].text


def test_smollm_knows_the_capital_of_france(smollm):
    client = smollm.client()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=24,
                                         temperature=0)
    answer = out.choices[0].message.content
    assert "Paris" in answer, answer
    streamed = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=24,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (4, 4), (8, 7)])
def test_server_torch_threads_default_fits_the_cpu_set(monkeypatch, cores, expected):
    """Without CUDA the service uses every core of its CPU set for torch (a 2-core laptop's one
    stream needs both for memory bandwidth), leaving one to the event loop above 4 cores."""
    import torch

    from paged_backend.adapters import bentoml as service

    if torch.cuda.is_available():
        pytest.skip("the CPU default only applies without CUDA")
    monkeypatch.delenv("PAGED_BACKEND_TEST_THREADS", raising=False)
    monkeypatch.setattr(service.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert service._torch_threads(service.ServiceArgs()) == expected
    assert service._torch_threads(service.ServiceArgs(torch_threads=3)) == 3

"""Issue 13, security and operations: API key, CORS, limits, backpressure, timeouts, /metrics,
/tokenize, unsupported fields and no local paths in responses. One real `bentoml serve` process on
127.0.0.1 (key from the environment, as an operator would set it), the `openai` client and httpx."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

bentoml = pytest.importorskip("bentoml")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from service_server import REQUEST_TIMEOUT_S, STARTUP_TIMEOUT_S, Server, wait_idle  # noqa: E402

KEY = "sk-test-0123456789"
ORIGIN = "https://app.example"
# No 480-token request finishes this fast (that would take < 1 ms per engine step), yet the time is
# long enough for a client to see the request start.
TIMEOUT_S = 0.5
HI = [{"role": "user", "content": "Say hi to the test suite."}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_model_dir, request) -> dict[str, Server]:
    """Started together (their start-up overlaps): `guarded` has a key, CORS and tight limits;
    `hurried` aborts every request after TIMEOUT_S (no other test could run there)."""
    tmp = tmp_path_factory.mktemp("guarded")
    model_dir = tiny_model_dir("llama")
    common = {"model": str(model_dir), "dtype": "float32", "device": "cpu", "max_model_len": "512"}
    started: dict[str, Server] = {}
    request.addfinalizer(lambda: [s.stop() for s in started.values()])
    started["guarded"] = Server(tmp, "guarded", {
        **common, "max_num_seqs": "2", "allowed_origins": ORIGIN, "max_request_bytes": "65536",
        "max_prompts_per_request": "4", "max_waiting_requests": "2",
    }, env={"PAGED_BACKEND_API_KEY": KEY}, api_key=KEY, host=None)  # host: the service's own default
    started["hurried"] = Server(tmp, "hurried", {**common, "request_timeout_s": str(TIMEOUT_S)}, api_key=KEY)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    for s in started.values():
        s.wait_ready(deadline)
        s.model_dir = model_dir
    return started


@pytest.fixture(scope="module")
def guarded(servers) -> Server:
    return servers["guarded"]


@pytest.fixture(scope="module")
def hurried(servers) -> Server:
    return servers["hurried"]


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _post(server: Server, path: str, body, headers=None, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={**_auth(), **(headers or {})}, timeout=60, **kw)


def test_binds_loopback_by_default(guarded):
    from paged_backend.adapters.bentoml import PagedLLMService

    assert PagedLLMService.config["http"]["host"] == "127.0.0.1"
    # `guarded` was started without --host: bentoml took the service's default.
    assert f"listening on http://127.0.0.1:{guarded.port}" in guarded.log_path.read_text(errors="replace")


def test_api_key_guards_every_route_but_the_probes(guarded):
    routes = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("GET", "/stats"), ("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/detokenize"),
              ("POST", "/generate"), ("GET", "/")]
    for method, path in routes:
        for headers in ({}, _auth("sk-wrong"), {"Authorization": KEY}):  # none, wrong, not "Bearer"
            r = httpx.request(method, f"{guarded.url}{path}", headers=headers, json={}, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/health", "/readyz", "/livez"):
        assert httpx.get(f"{guarded.url}{path}", timeout=30).status_code == 200, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert guarded.client().models.list().data  # the right key


def test_no_local_paths_in_responses(guarded):
    private = str(guarded.model_dir)
    r = httpx.get(f"{guarded.url}/v1/models", headers=_auth(), timeout=30)
    assert private not in r.text
    card = r.json()["data"][0]
    assert card["id"] == guarded.model_dir.name and card["root"] == card["id"] and card["max_model_len"] == 512
    client = guarded.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert private not in json.dumps(e.value.body) and guarded.model_dir.name in e.value.body["message"]
    # The directory still works as a name (clients written against the old behaviour), answered by
    # the served name.
    out = client.completions.create(model=private, prompt="x", max_tokens=1)
    assert out.model == guarded.model_dir.name


def test_internal_error_names_an_id_and_logs_the_exception(caplog):
    from paged_backend.adapters.openai_server import _internal_error

    with caplog.at_level(logging.ERROR, logger="paged_backend.adapters"):
        err = _internal_error(RuntimeError("boom in /home/secret/model"))
    assert err.status == 500 and "/home/secret" not in err.message and err.code in err.message
    assert err.headers["X-Request-Id"] == err.code
    logged = caplog.records[-1]
    assert err.code in logged.getMessage() and "boom in /home/secret/model" in logged.getMessage()


def test_cors_preflight_and_headers(guarded):
    url = f"{guarded.url}/v1/chat/completions"
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(url, headers=pre, timeout=30)
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    evil = httpx.options(url, headers={**pre, "Origin": "https://evil.example"}, timeout=30)
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    # Actual requests carry the header, a 401 too (so that a browser app can read the error).
    got = httpx.get(f"{guarded.url}/v1/models", headers={**_auth(), "Origin": ORIGIN}, timeout=30)
    assert got.status_code == 200 and got.headers["access-control-allow-origin"] == ORIGIN
    denied = httpx.get(f"{guarded.url}/v1/models", headers={"Origin": ORIGIN}, timeout=30)
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{guarded.url}/v1/models", headers={**_auth(), "Origin": "https://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in other.headers


def test_body_size_prompt_count_and_nesting_limits(guarded):
    big = {"model": None, "prompt": "x" * 70_000, "max_tokens": 1}
    r = _post(guarded, "/v1/completions", big)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(20):
            yield b" " * 4096

    r = httpx.post(f"{guarded.url}/v1/completions", content=chunks(), headers=_auth(), timeout=60)
    assert r.status_code == 413

    r = _post(guarded, "/v1/completions", {"prompt": ["a", "b", "c", "d", "e"], "max_tokens": 1})
    assert r.status_code == 400 and "max_prompts_per_request" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"

    deep = "[" * 20_000 + "]" * 20_000
    r = httpx.post(f"{guarded.url}/v1/completions", content=deep, headers=_auth(), timeout=60)
    assert r.status_code == 400, r.text
    nested = {"prompt": "x", "max_tokens": 1, "user": None}
    inner = nested
    for _ in range(40):
        inner["extra"] = {}
        inner = inner["extra"]
    r = _post(guarded, "/v1/completions", nested)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


def test_unsupported_fields_are_refused_by_name(guarded):
    from paged_backend.adapters.openai_protocol import UNSUPPORTED_FIELDS

    client = guarded.client()
    for field in sorted(UNSUPPORTED_FIELDS):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=guarded.model_dir.name, messages=HI, max_tokens=1,
                                           extra_body={field: ["on"]})
        assert e.value.body["param"] == field and field in e.value.body["message"], e.value.body
    # Their "off" values (what some clients always send) are fine.
    out = client.chat.completions.create(model=guarded.model_dir.name, messages=HI, max_tokens=1,
                                         response_format={"type": "text"}, tool_choice="none",
                                         extra_body={"logit_bias": {}, "priority": 0})
    assert out.choices[0].finish_reason == "length"


def test_tokenize_and_detokenize_like_vllm(guarded):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(guarded.model_dir)
    r = _post(guarded, "/tokenize", {"prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    ids = tok("Hello world")["input_ids"]
    assert r.json() == {"count": len(ids), "max_model_len": 512, "tokens": ids,
                        "token_strs": tok.convert_ids_to_tokens(ids)}
    chat = _post(guarded, "/tokenize", {"messages": HI, "add_generation_prompt": True}).json()
    assert "tokens" in chat, chat
    expected = tok(tok.apply_chat_template(HI, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert chat["tokens"] == expected and chat["token_strs"] is None
    back = _post(guarded, "/detokenize", {"tokens": ids})
    assert back.json() == {"prompt": tok.decode(ids)}
    bad = _post(guarded, "/detokenize", {"tokens": [-1, 10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert _post(guarded, "/tokenize", {"prompt": "x", "model": "nope"}).status_code == 404


def _metrics(server: Server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{server.url}/metrics", headers=_auth(), timeout=30)
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def _value(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_metrics_engine_and_bentoml_side_by_side(guarded):
    before = _metrics(guarded)
    client = guarded.client()
    out = client.completions.create(model=guarded.model_dir.name, prompt="The weather today is", max_tokens=5,
                                    extra_body={"ignore_eos": True})
    wait_idle(guarded)
    after = _metrics(guarded)
    p = "paged_backend:"

    def grew(name: str) -> float:
        return _value(after, p + name) - _value(before, p + name)

    assert grew("generation_tokens_total") == 5 and grew("prompt_tokens_total") == out.usage.prompt_tokens
    assert grew("time_to_first_token_seconds_count") == 1 and grew("e2e_request_latency_seconds_count") == 1
    assert grew("inter_token_latency_seconds_count") == 4
    assert _value(after, p + "request_success_total", finished_reason="length") >= 1
    assert _value(after, p + "num_kv_blocks_total") > 0 and _value(after, p + "num_kv_blocks_used") == 0
    assert _value(after, p + "num_requests_running") == 0 and _value(after, p + "num_requests_waiting") == 0
    for name in ("kv_cache_usage_perc", "prefix_cache_hit_rate", "num_preemptions_total", "prefix_cache_hits_total"):
        assert any(n == p + name for n, _ in after), name
    assert all(dict(ls).get("model_name") == guarded.model_dir.name for n, ls in after if n.startswith(p))
    assert any(n.startswith("bentoml_") or n.startswith("http_") for n, _ in after), "BentoML's own metrics"


def test_waiting_bound_gives_429_with_retry_after(guarded):
    long = dict(model=guarded.model_dir.name, prompt="Once upon a time", max_tokens=480, stream=True,
                extra_body={"ignore_eos": True})

    async def main():
        client = guarded.async_client()
        running = [await client.completions.create(**long) for _ in range(2)]  # max_num_seqs=2: both run
        queued = [asyncio.ensure_future(client.completions.create(**long)) for _ in range(2)]
        deadline = time.monotonic() + 10
        while guarded.stats()["num_waiting"] < 2:
            assert time.monotonic() < deadline, guarded.stats()
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            await client.completions.create(**long)
        for s in running:
            await s.close()
        for t in queued:
            t.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        await client.close()
        return e.value

    err = asyncio.run(main())
    assert err.response.headers["retry-after"] == "1" and "max_waiting_requests" in err.body["message"]
    wait_idle(guarded)
    out = guarded.client().completions.create(model=guarded.model_dir.name, prompt="x", max_tokens=2)
    assert out.usage.completion_tokens == 2, "the queue is free again"


def test_running_requests_do_not_count_as_waiting(guarded):
    """Non-streamed requests leave the queue when they start generating, as streamed ones do: with both
    sequences running, two more requests are admitted (max_waiting_requests=2) and all four complete."""
    long = dict(model=guarded.model_dir.name, prompt="Once upon a time", max_tokens=480,
                extra_body={"ignore_eos": True})

    async def main():
        client = guarded.async_client()
        before = guarded.stats()["total_generated_tokens"]
        running = [asyncio.ensure_future(client.completions.create(**long)) for _ in range(2)]
        deadline = time.monotonic() + 20
        while guarded.stats()["num_running"] < 2 or guarded.stats()["total_generated_tokens"] < before + 8:
            assert time.monotonic() < deadline, guarded.stats()
            await asyncio.sleep(0.01)
        more = [asyncio.ensure_future(client.completions.create(**dict(long, max_tokens=4))) for _ in range(2)]
        outs = await asyncio.gather(*running, *more)
        await client.close()
        return outs

    outs = asyncio.run(main())
    assert [o.usage.completion_tokens for o in outs] == [480, 480, 4, 4]
    assert all(len(o.choices[0].text) > 0 for o in outs)
    wait_idle(guarded)


def test_request_timeout_aborts_and_frees(hurried):
    before = hurried.stats()["total_generated_tokens"]
    body = {"prompt": "Once upon a time", "max_tokens": 480, "n": 2, "ignore_eos": True}
    start = time.monotonic()
    r = _post(hurried, "/v1/completions", body)
    took = time.monotonic() - start
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
    assert f"request_timeout_s={TIMEOUT_S}" in r.json()["error"]["message"]
    assert TIMEOUT_S - 0.1 < took < TIMEOUT_S + 10
    with httpx.stream("POST", f"{hurried.url}/v1/completions", json={**body, "stream": True}, headers=_auth(),
                      timeout=REQUEST_TIMEOUT_S) as s:
        if s.status_code == 504:  # timed out before its first token (a busy machine): not a stream yet
            assert "request_timeout" in s.read().decode()
        else:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and "request_timeout" in events[-2], events[-3:]
    after = wait_idle(hurried)
    assert after["total_generated_tokens"] - before < 2 * 2 * 480, "the requests ran to the end"

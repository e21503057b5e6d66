"""Issue 13: fuzzing what users send. Request bodies against a real `bentoml serve` of a tiny model,
SamplingParams and prompts through the Python API. Every bad input gets a 400 (ValueError/TypeError
in Python) that names the problem; good requests answered concurrently, next to bad ones, get
exactly the output they get alone; afterwards no KV block is held and nothing runs or waits."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

bentoml = pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")

from service_server import Server, wait_idle  # noqa: E402

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# field -> (valid values, invalid values). Valid values are valid in any combination; an invalid one
# must make the request fail naming that field. Lax JSON coercions ("4" for 4) count as valid.
COMMON = {
    "max_tokens": ([1, 3, "2"], [0, -3, "many", 1.5, [4]]),
    "temperature": ([0, 0.7, 1.5], [-1, "hot", math.inf]),
    "top_p": ([1.0, 0.5], [0, 1.5, -0.1]),
    "top_k": ([-1, 0, 5, 10**6], [-2, "k"]),
    "min_p": ([0, 0.1], [-0.5, 2]),
    "presence_penalty": ([0.5, -1], [3, -2.5]),
    "repetition_penalty": ([1.0, 1.3], [0, -1]),
    "n": ([1, 2], [0, -1, 129]),
    "seed": ([0, 42, 2**63 - 1], [2**64, -5, "s"]),
    "stop": (["\n", ["a b", "zz"]], ["", [""], [1], 5]),
    "stop_token_ids": ([[2], []], [[-1], "x"]),
    "min_tokens": ([0, 1], [-1]),
    "ignore_eos": ([True, False], [3, "maybe"]),
    "guided_regex": ([None, "a+"], ["(unclosed", ""]),
    "logit_bias": ([None, {}, {"5": 1.0}, {"7": -100}], [{"5": 101}, {"x": 1.0}, {"5": "up"}, {"100000000": 1.0}]),
    "allowed_token_ids": ([None, [5, 9]], [[], [-1], "x", [100000000]]),
}
COMPLETION = {
    **COMMON,
    "prompt": (["Hello", "The weather is", [504, 3458], ["a b", "c"], [[1, 2], [3]]],
               ["", [], [[]], None, 5, {"a": 1}, "x\ud800y", [-1], [10**9], "word " * 600, [[1], "a"]]),
    "logprobs": ([0, 2], [21, -1]),
}
CHAT = {
    **COMMON,
    "messages": ([[{"role": "user", "content": "Hi"}],
                  [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
                  [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]],
                 [[], "Hi", [{"content": "x"}], [{"role": "", "content": "x"}],
                  [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                  [{"role": "user", "content": "\udc00"}], [{"role": "user", "content": "go " * 600}]]),
}


@st.composite
def bodies(draw, fields: dict) -> tuple[dict, set[str]]:
    """A request body and the names of the fields given invalid values."""
    body, invalid = {}, set()
    for name, (good, bad) in fields.items():
        required = name in ("prompt", "messages", "max_tokens")  # max_tokens: keep valid ones short
        choice = draw(st.sampled_from(["omit", "good", "good", "bad"] if not required else ["good", "good", "bad"]))
        if choice == "bad" and len(invalid) >= 2:  # at most two invalid fields; a required one stays
            choice = "good" if required else "omit"
        if choice == "omit":
            continue
        if choice == "good":
            body[name] = draw(st.sampled_from(good))
        else:
            body[name] = draw(st.sampled_from(bad))
            invalid.add(name)
    return body, invalid


@pytest.fixture(scope="module")
def server(shared_servers) -> Server:
    """The tiny llama served as "tiny", max_model_len 512 (the session's, shared with test_bentoml)."""
    return shared_servers.get("tiny")["tiny"]


def _post(url: str, body: dict) -> httpx.Response:
    # json.dumps, not httpx's encoder: it writes Infinity and lone-surrogate escapes, as clients may
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=120)


def _check(r: httpx.Response, body: dict, invalid: set[str]) -> None:
    assert r.status_code in (200, 400), (r.status_code, r.text, body)
    if invalid:
        assert r.status_code == 400, (body, invalid, r.text)
        err = r.json()["error"]
        said = f"{err['param']} {err['message']}"
        assert any(name in said for name in invalid), (invalid, err)
        assert err["type"] == "invalid_request_error"
    else:
        assert r.status_code == 200, (body, r.text)
        out = r.json()
        assert out["choices"] and all(c["finish_reason"] in ("stop", "length") for c in out["choices"])


@given(case=bodies(COMPLETION))
@FUZZ
def test_completion_bodies(server, case):
    body, invalid = case
    _check(_post(f"{server.url}/v1/completions", body), body, invalid)


@given(case=bodies(CHAT))
@FUZZ
def test_chat_bodies(server, case):
    body, invalid = case
    _check(_post(f"{server.url}/v1/chat/completions", body), body, invalid)


@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                  lambda kids: st.lists(kids, max_size=3)
                                  | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                                  max_leaves=12).map(lambda v: repr(v).encode())))
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_garbage_bodies_are_400(server, raw):
    for route in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        r = httpx.post(f"{server.url}{route}", content=raw, timeout=60, headers={"content-type": "application/json"})
        assert r.status_code == 400, (route, raw, r.text)
        assert r.json()["error"]["message"]


GOOD = [
    {"prompt": "The weather today is", "max_tokens": 8, "temperature": 0},
    {"prompt": [504, 3458, 1789], "max_tokens": 6, "temperature": 0, "n": 2},
    {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 7, "top_k": 20},
    {"prompt": ["a b", "c d e"], "max_tokens": 5, "temperature": 0, "stop": ["zz"]},
    {"prompt": "Say hi", "max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "seed": 123, "n": 3},
    {"prompt": "Repeat repeat repeat", "max_tokens": 8, "temperature": 0, "repetition_penalty": 1.3,
     "presence_penalty": 0.5},
]
BAD = [
    {"prompt": "x", "max_tokens": 3, "n": 2, "seed": 18446744073709551615, "temperature": 1},
    {"prompt": "word " * 600, "max_tokens": 3},
    {"prompt": "x\ud800", "max_tokens": 3},
    {"prompt": [10**9], "max_tokens": 3},
    {"prompt": "x", "max_tokens": 3, "guided_json": {"type": "nonsense"}},
]


def _texts(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def test_concurrent_good_requests_answer_as_alone_beside_bad_ones(server):
    url = f"{server.url}/v1/completions"
    alone = [_texts(httpx.post(url, json=b, timeout=120)) for b in GOOD]

    async def together():
        async with httpx.AsyncClient(timeout=120) as http:
            jobs = [http.post(url, json=b) for b in GOOD * 3]
            jobs += [http.post(url, content=json.dumps(b), headers={"content-type": "application/json"})
                     for b in BAD * 2]
            return await asyncio.gather(*jobs)

    results = asyncio.run(together())
    good, bad = results[: 3 * len(GOOD)], results[3 * len(GOOD):]
    assert [_texts(r) for r in good] == alone * 3
    assert all(r.status_code == 400 for r in bad), [r.text for r in bad]
    st_ = wait_idle(server)
    assert st_["num_blocks_used"] == 0 and st_["num_running"] == 0 and st_["num_waiting"] == 0


# ---- the Python API ------------------------------------------------------------------------------
SAMPLING = {k: v for k, v in COMMON.items() if k != "guided_regex"}
# (ids past the vocabulary are refused by the engine, which knows it, not by SamplingParams)
SAMPLING["logit_bias"] = (COMMON["logit_bias"][0], COMMON["logit_bias"][1][:3])
SAMPLING["allowed_token_ids"] = (COMMON["allowed_token_ids"][0], COMMON["allowed_token_ids"][1][:3])
SAMPLING["max_tokens"] = ([1, 3, None], [0, -3, "many", 1.5])
SAMPLING["n"] = ([1, 2, 129], [0, -1])  # the server's cap on n is its own; the engine's is max_num_seqs
SAMPLING["logprobs"] = ([None, 0, 20], [21, -1])


@given(case=bodies(SAMPLING))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_sampling_params_name_what_is_wrong(case):
    from paged_backend import SamplingParams

    kwargs, invalid = case
    if not invalid:
        SamplingParams(**kwargs)
        return
    with pytest.raises((ValueError, TypeError)) as e:
        SamplingParams(**kwargs)
    assert any(name in str(e.value) for name in invalid), (invalid, str(e.value))


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    from paged_backend import LLM

    with LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu", max_model_len=512) as llm:
        yield llm


PROMPTS_BAD = ["", [], "x\ud800", "\udfff", [-1], [1.5], [True], [10**9], "word " * 600, None, {"a": 1}, b"bytes"]


@pytest.mark.parametrize("prompt", PROMPTS_BAD, ids=repr)
def test_bad_prompts_through_the_python_api(offline, prompt):
    from paged_backend import SamplingParams

    with pytest.raises((ValueError, TypeError)) as e:
        offline.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert "prompt" in str(e.value), str(e.value)
    st_ = offline.stats()
    assert st_.num_blocks_used == 0 and st_.num_running == 0 and st_.num_waiting == 0
    assert offline.generate(["ok"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@given(prompt=st.one_of(st.text(st.characters(codec=None), max_size=40),
                        st.lists(st.integers(-3, 50_000), max_size=12)))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_any_prompt_is_answered_or_refused_by_name(offline, prompt):
    from paged_backend import SamplingParams

    vocab = len(offline.get_tokenizer())
    if isinstance(prompt, str):
        valid = bool(prompt) and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in prompt)
    else:
        valid = bool(prompt) and all(0 <= t < vocab for t in prompt)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    if valid:
        out = offline.generate([prompt], params, use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 2
    else:
        with pytest.raises((ValueError, TypeError)) as e:
            offline.generate([prompt], params, use_tqdm=False)
        assert "prompt" in str(e.value), str(e.value)
    st_ = offline.stats()
    assert st_.num_blocks_used == 0 and st_.num_running == 0 and st_.num_waiting == 0


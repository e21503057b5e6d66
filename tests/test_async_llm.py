"""AsyncLLM: many concurrent streams on one engine, abort/cancel, per-request errors, idle CPU."""

from __future__ import annotations

import asyncio
import random
import resource
import time

import pytest

from paged_backend import LLM, AsyncLLM, SamplingParams


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(2, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def engine(model_dir):
    llm = AsyncLLM(model_dir, dtype="float32", device="cpu", max_num_seqs=64)
    yield llm
    llm.shutdown()


PARAMS = SamplingParams(temperature=0, max_tokens=12)


def test_64_concurrent_streams_equal_offline_results(engine, model_dir):
    prompts = _prompts(64)
    with LLM(model_dir, dtype="float32", device="cpu") as offline:
        expected = [o.outputs[0].token_ids for o in offline.generate(prompts, PARAMS, use_tqdm=False)]

    async def consume(p):
        outs, deltas = [], []
        async for out in engine.generate(p, PARAMS):
            outs.append(out)
            deltas.extend(out.outputs[0].token_ids_delta)
        return outs, deltas

    async def main():
        return await asyncio.gather(*(consume(p) for p in prompts))

    results = asyncio.run(main())
    for i, (outs, deltas) in enumerate(results):
        final = outs[-1]
        assert final.finished and final.outputs[0].finish_reason in ("length", "stop")
        assert final.outputs[0].token_ids == expected[i], f"stream {i} differs from offline generate"
        assert deltas == expected[i], "the deltas do not add up to the final output"
        assert "".join(o.outputs[0].text_delta for o in outs) == final.outputs[0].text
        assert len(outs) > 1, "not streamed"
        assert final.metrics.time_to_first_token is not None
        assert len(final.metrics.inter_token_latencies) == len(expected[i]) - 1
    stats = engine.stats()
    assert stats.max_seqs_in_step > 32, "the streams did not share batches"
    assert stats.num_blocks_used == 0


def test_abort_and_cancel_half_frees_their_blocks(engine):
    prompts = _prompts(16)
    long_params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def consume(i, p):
        n = 0
        async for out in engine.generate(p, long_params, request_id=f"r{i}"):
            n += 1
            if i % 4 == 0 and n == 3:
                await engine.abort(f"r{i}")  # the stream then ends with finish_reason "abort"
            if i % 4 == 1 and n == 3:
                break  # closing the iterator early aborts too
        return out

    async def main():
        tasks = [asyncio.create_task(consume(i, p)) for i, p in enumerate(prompts)]
        # cancel two more consumers mid-stream
        await asyncio.sleep(0.3)
        for i in (2, 6):
            tasks[i].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    for i, r in enumerate(results):
        if i in (2, 6):
            assert isinstance(r, asyncio.CancelledError) or r.finished
        elif i % 4 == 0:
            assert r.finished and r.outputs[0].finish_reason == "abort"
        elif i % 4 != 1:
            assert r.finished and r.outputs[0].finish_reason == "length"
            assert len(r.outputs[0].token_ids) == 200
    deadline = time.time() + 10
    while engine.stats().num_running and time.time() < deadline:
        time.sleep(0.05)
    stats = engine.stats()
    assert stats.num_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_bad_request_fails_alone(engine):
    prompts = _prompts(6)

    async def good(p):
        last = None
        async for last in engine.generate(p, PARAMS):
            pass
        return last

    async def bad():
        async for _ in engine.generate([], PARAMS):
            pass

    async def bad_params():
        async for _ in engine.generate("hi", {"temperature": -1}):
            pass

    async def main():
        return await asyncio.gather(*(good(p) for p in prompts), bad(), bad_params(), return_exceptions=True)

    *goods, err_empty, err_temp = asyncio.run(main())
    assert all(not isinstance(g, BaseException) and g.finished for g in goods)
    assert isinstance(err_empty, ValueError) and "empty" in str(err_empty)
    assert "temperature" in str(err_temp)
    assert engine.stats().num_blocks_used == 0


def test_idle_engine_uses_no_cpu(engine):
    async def one():
        async for _ in engine.generate("warm up", PARAMS):
            pass

    asyncio.run(one())
    time.sleep(0.2)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    time.sleep(2.0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert time.time() - t0 >= 2.0
    assert cpu < 0.05, f"idle engine burned {cpu:.3f} s of CPU in 2 s"


def test_a_failing_step_fails_only_its_requests(model_dir):
    """A request that breaks its step (parameters that skipped validation) ends with EngineDeadError;
    a request streamed beside it but not in that step finishes normally."""
    from paged_backend import EngineDeadError

    bad = SamplingParams.model_construct(**{**PARAMS.model_dump(), "repetition_penalty": "x"})

    async def run(llm):
        async def consume(p, params):
            outs = [o async for o in llm.generate(p, params)]
            return outs[-1].outputs[0].token_ids

        return await asyncio.gather(consume([5, 6, 7], bad), consume([8, 9, 10], PARAMS), return_exceptions=True)

    with AsyncLLM(model_dir, dtype="float32", device="cpu", max_num_seqs=1) as llm:
        failed, good = asyncio.run(run(llm))
        assert isinstance(failed, EngineDeadError)
        assert isinstance(good, list) and len(good) == PARAMS.max_tokens
        assert llm.stats().num_blocks_used == 0

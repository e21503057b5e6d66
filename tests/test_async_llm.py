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


def test_streams_whose_event_loop_closed_are_aborted(engine):
    """Consumers that vanish with their event loop (closed without closing their streams): the engine
    thread's next delivery to that loop fails, and it aborts every request the loop was reading,
    freeing their blocks, while a request of another loop goes on."""
    prompts = _prompts(4)
    long_params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    gone = asyncio.new_event_loop()
    streams = [engine.generate(p, long_params) for p in prompts[:3]]
    for s in streams:
        gone.run_until_complete(s.__anext__())
    generated = engine.stats().total_generated_tokens
    gone.close()

    async def survivor():
        return [o async for o in engine.generate(prompts[3], PARAMS)][-1]

    final = asyncio.run(survivor())
    assert final.finished and len(final.outputs[0].token_ids) == PARAMS.max_tokens
    deadline = time.time() + 30
    while engine.stats().num_running and time.time() < deadline:
        time.sleep(0.05)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_blocks_used == 0
    # aborted at the first step after the close, not run on to their 300 tokens each
    assert stats.total_generated_tokens - generated < 100


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


# ---- several requests per call, blocking iterators, abort_all ------------------------------------
def test_generate_many_yields_each_request_by_index(engine):
    prompts = _prompts(5)
    params = [SamplingParams(temperature=0, max_tokens=4 + i) for i in range(5)]

    async def alone(p, sp):
        async for out in engine.generate(p, sp):
            pass
        return out.outputs[0].token_ids

    async def many():
        finals, deltas = {}, {i: [] for i in range(5)}
        async for i, out in engine.generate_many(prompts, params):
            deltas[i] += out.outputs[0].token_ids_delta
            if out.finished:
                finals[i] = out
        return finals, deltas

    async def main():
        return [await alone(p, sp) for p, sp in zip(prompts, params)], await many()

    expected, (finals, deltas) = asyncio.run(main())
    assert sorted(finals) == list(range(5))
    for i in range(5):
        assert finals[i].outputs[0].token_ids == expected[i] == deltas[i]
        assert len(expected[i]) == 4 + i

    # the blocking twins, called from a thread that runs an event loop (as in a notebook)
    async def from_a_running_loop():
        many = {i: out for i, out in engine.generate_many_sync(prompts, params) if out.finished}
        chat = list(engine.chat_sync([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=3)))
        return many, chat

    many, chat = asyncio.run(from_a_running_loop())
    assert [many[i].outputs[0].token_ids for i in range(5)] == expected
    assert chat[-1].finished and chat[-1].prompt.startswith("<|im_start|>")  # the rendered conversation
    assert engine.get_tokenizer()(chat[-1].prompt, add_special_tokens=False)["input_ids"] == chat[-1].prompt_token_ids


def test_generate_many_checks_every_prompt_before_queueing_any(engine):
    async def run(*args, **kwargs):
        async for _ in engine.generate_many(*args, **kwargs):
            pass

    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    with pytest.raises(ValueError, match="empty"):
        asyncio.run(run(["fine", "", "fine too"], long))
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(run(["fine", list(range(3, 3 + 600))], long))
    with pytest.raises(ValueError, match="at most 2"):
        asyncio.run(run(["a", "b", "c"], long, max_prompts=2))
    with pytest.raises(ValueError, match="distinct"):
        asyncio.run(run(["a", "b"], long, request_ids=["x", "x"]))
    with pytest.raises(ValueError, match="one per prompt"):
        list(engine.generate_many_sync(["a", "b"], [long]))
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == stats.num_blocks_used == 0


def test_abort_all_and_closing_early_free_everything(engine):
    long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)

    async def main():
        finals, aborted = {}, None
        async for i, out in engine.generate_many(_prompts(4), long):
            if aborted is None:
                aborted = await engine.abort_all()
            if out.finished:
                finals[i] = out
        return finals, aborted

    finals, aborted = asyncio.run(main())
    assert aborted == 4 and sorted(finals) == [0, 1, 2, 3]
    assert all(f.outputs[0].finish_reason == "abort" for f in finals.values())
    outputs = engine.generate_many_sync(_prompts(3), long)
    next(outputs)
    outputs.close()
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == stats.num_blocks_used == 0


# ---- a huge prompt never stalls the other streams (issue 13, defect 3) ---------------------------
def test_huge_prompts_do_not_stall_a_running_stream(engine):
    """Tokenising ~10 MB took ~10 s under the engine lock, freezing every stream; now what cannot fit
    is refused before tokenising (or counting ids), off the engine's thread."""
    huge_text = "The quick brown fox jumps over the lazy dog. " * 230_000
    huge_chat = [{"role": "user", "content": huge_text}]
    huge_ids = [5] * 3_000_000
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)

    async def stream(started: asyncio.Event):
        times = []
        async for out in engine.generate("Tell me a long story.", params):
            times.append(time.perf_counter())
            if len(times) == 5:
                started.set()
        return times

    async def refused(make):
        t0 = time.perf_counter()
        with pytest.raises(ValueError) as e:
            async for _ in make():
                pass
        return time.perf_counter() - t0, str(e.value)

    async def main():
        started = asyncio.Event()
        other = asyncio.create_task(stream(started))
        await started.wait()
        t_submit = time.perf_counter()
        results = await asyncio.gather(
            refused(lambda: engine.generate(huge_text, params)),
            refused(lambda: engine.chat(huge_chat, params)),
            refused(lambda: engine.generate(huge_ids, params)),
        )
        return t_submit, results, await other

    t_submit, results, times = asyncio.run(main())
    (t_text, e_text), (t_chat, e_chat), (t_ids, e_ids) = results
    assert "characters" in e_text and "characters" in e_chat and "3000000 tokens" in e_ids
    assert max(t_text, t_chat, t_ids) < 2.0, results
    gaps = [b - a for a, b in zip(times, times[1:]) if b > t_submit]
    assert len(times) == 120 and gaps
    assert max(gaps) < 2.0, f"the running stream stalled {max(gaps):.2f} s while huge prompts were refused"


def test_character_bound_never_refuses_a_prompt_that_fits(engine):
    """SmolLM2's longest token is a newline and 80 spaces (81 characters): a prompt of such tokens up to
    max_model_len - 1 fits and is served; one character more than 81 per position is refused untokenised."""
    tok = engine.get_tokenizer()
    piece = max((tok.convert_tokens_to_string([t]) for t in tok.get_vocab()), key=len)
    max_len = engine.engine.max_model_len
    fitting = piece * (max_len - 1)
    assert len(tok.encode(fitting)) == max_len - 1

    async def run(prompt):
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1)):
            pass
        return out

    out = asyncio.run(run(fitting))
    assert out.finished and len(out.prompt_token_ids) == max_len - 1
    with pytest.raises(ValueError, match="characters"):
        asyncio.run(run(piece * max_len + " "))


def test_the_event_loop_never_waits_for_a_running_step(model_dir):
    """Starting a stream, aborting one and reading stats while a (slow) step runs: the event loop keeps
    ticking. (Before, a step held the lock the loop took to register a stream: every open stream on
    that loop stalled until the step ended, for seconds on a busy GPU.)"""
    llm = AsyncLLM(model_dir, dtype="float32", device="cpu")
    step = llm.engine.step

    def slow_step():
        time.sleep(0.4)
        return step()

    llm.engine.step = slow_step
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def consume(prompt):
        async for out in llm.generate(prompt, params):
            last = out
        return last

    async def main():
        gaps, stop = [], asyncio.Event()

        async def ticker():
            t = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - t)
                t = now

        tick = asyncio.create_task(ticker())
        first = asyncio.create_task(consume([5, 6, 7]))
        await asyncio.sleep(0.1)  # the engine is inside its first slow step now
        second = asyncio.create_task(consume([8, 9, 10, 11]))
        stats = asyncio.create_task(asyncio.to_thread(llm.stats))
        outs = await asyncio.gather(first, second)
        await stats
        stop.set()
        await tick
        return outs, max(gaps)

    try:
        outs, worst_gap = asyncio.run(main())
    finally:
        llm.shutdown()
    assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
    assert worst_gap < 0.2, f"the event loop stalled for {worst_gap:.2f} s while a step ran"

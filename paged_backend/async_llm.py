"""The asyncio streaming API: many concurrent requests on one engine, each an async iterator.

The engine runs in one background thread that steps while any request is unfinished and sleeps
on a condition variable otherwise (no busy spin, ~0 CPU when idle). Outputs are handed to each
request's own asyncio queue on the event loop that asked for it, so any number of event loops
(a server's, `asyncio.run` per call in a notebook) can share one engine.

Streaming design: every yielded `RequestOutput` carries the cumulative state (`text`, `token_ids`
of each completion) *and* what changed since the previous yield of that request
(`CompletionOutput.text_delta`, `token_ids_delta`). Concatenating the deltas gives the final
text exactly; while stop strings are pending, characters that may start one are held back.

Prompts are tokenised on the caller's side (a worker thread for the async methods, the calling thread
for the `*_sync` ones), never on the engine's thread: a huge prompt delays only its own caller.

Only the engine thread touches the engine. Adding, aborting and `stats()` are calls it runs between two
steps (`_on_engine`), so no other thread ever waits for a lock that a running engine holds; the event
loop itself never waits on the engine at all. (Before, a step ran under a lock that the event loop took
to register a stream: on the GPU, where steps follow each other with no gap, the loop could wait for it
for seconds, and every open stream stalled meanwhile.)
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Sequence, Union

from paged_backend.args import EngineArgs
from paged_backend.engine.engine import Engine, StepFailed
from paged_backend.engine.stats import EngineStats
from paged_backend.errors import EngineDeadError
from paged_backend.llm import ParamsArg, Prompt, per_prompt_params
from paged_backend.outputs import RequestOutput
from paged_backend.params import SamplingParams
from paged_backend.prompts import PromptPreparer

_Job = Callable[[], tuple[Optional[str], list[int]]]  # makes one prompt's (text, token ids)


_ADMISSION_GAP_S = 0.002
_ADMISSION_WINDOW_MAX_S = 0.02


@dataclass
class _Stream:
    """Where one request's outputs go: (tag, output) into its call's queue, which is an asyncio.Queue
    of `loop`, or a thread-safe queue.Queue when loop is None (the sync methods)."""

    queue: Union[asyncio.Queue, queue.Queue]
    tag: int
    loop: Optional[asyncio.AbstractEventLoop]


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, entry in puts:
        q.put_nowait(entry)


class AsyncLLM:
    """Same constructor arguments as `LLM`; `generate`/`chat`/`generate_many` are async iterators of
    outputs, `chat_sync`/`generate_many_sync` their blocking twins for code without an event loop."""

    def __init__(self, model: str, **engine_kwargs: Any):
        self.args = EngineArgs(model=model, **engine_kwargs)
        self._work = threading.Condition()  # wakes the engine thread; never held during a step
        self._inbox: collections.deque[_Call] = collections.deque()  # run by the engine thread between steps
        self._registry = threading.Lock()  # guards the check-and-insert of _streams only
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        # The engine is built on the thread that steps it: on the CPU a forward pass there ran ~15-30 %
        # faster than one on a thread other than the one that loaded the model and first ran torch's
        # (OpenMP/MKL) kernels (BENCHMARKS.md, issue 21). The constructor waits and raises its errors.
        failed: list[BaseException] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._build_and_run, args=(failed, ready), name="paged-backend-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        self._prepare = PromptPreparer(self.engine)

    def _build_and_run(self, failed: list, ready: threading.Event) -> None:
        try:
            self.engine = Engine(self.args)
        except BaseException as e:  # handed to the constructor, which raises it on the caller's thread
            failed.append(e)
            return
        finally:
            ready.set()
        self._run()

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._work:
                if not self._inbox and not self.engine.has_unfinished_requests():
                    while not self._stopping and not self._inbox and not self.engine.has_unfinished_requests():
                        self._work.wait()
                    # Woken from idle: let requests submitted together (a client's batch) join the
                    # first step, for as long as they keep arriving within 2 ms of each other.
                    deadline = time.monotonic() + _ADMISSION_WINDOW_MAX_S
                    while self._work.wait(timeout=_ADMISSION_GAP_S) and time.monotonic() < deadline:
                        pass
                if self._stopping:
                    return
            while self._inbox:
                self._inbox.popleft().run()
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs: list[Union[RequestOutput, BaseException]] = list(self.engine.step())
            except StepFailed as e:  # the engine aborted that step's requests and goes on
                outputs = list(e.outputs)
                for rid in e.request_ids:
                    err = EngineDeadError(f"request {rid} aborted: the engine step failed: {e.cause!r}")
                    err.__cause__ = e.cause
                    outputs.append(_Tagged(rid, err))
            except Exception as e:  # the engine itself is broken: every request ends with the error
                outputs = []
                for rid in list(self.engine.requests):
                    self.engine.abort_request(rid)
                    err = EngineDeadError(f"request {rid} aborted: the engine step failed: {e!r}")
                    err.__cause__ = e
                    outputs.append(_Tagged(rid, err))
            self._deliver_all([(out.request_id, out.error if isinstance(out, _Tagged) else out) for out in outputs])

    def _on_engine(self, fn: Callable[[], Any], wait: bool = True) -> Any:
        """Run fn on the engine thread between two steps (right away when idle) and, with wait, return its
        result or raise its error. Called on the engine thread itself, fn just runs."""
        if threading.current_thread() is self._thread:
            return fn()
        call = _Call(fn)
        with self._work:
            if self._stopping:
                raise RuntimeError("the AsyncLLM is shut down")
            self._inbox.append(call)
            self._work.notify()
        return call.wait() if wait else None

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, Any]]) -> None:
        """Hand each (request id, output or error) to its request's stream: the sync streams' queues
        directly, and one call per event loop for the rest (a step's outputs for many streams of one
        loop wake it once, not once per stream)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, _Stream, Any]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if stream.loop is None:
                stream.queue.put((stream.tag, item))
            else:
                by_loop.setdefault(stream.loop, []).append((request_id, stream, item))
        for loop, entries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(stream.queue, (stream.tag, item)) for _, stream, item in entries])
            except RuntimeError:  # the consumers' event loop is gone: nobody reads these requests
                for request_id, _, _ in entries:
                    self._streams.pop(request_id, None)
                    if threading.current_thread() is self._thread:
                        self.engine.abort_request(request_id)

    # ---- requests ---------------------------------------------------------------------------
    async def generate(
        self,
        prompt: Prompt,
        sampling_params: Optional[SamplingParams] = None,
        request_id: Optional[str] = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as tokens arrive; the last one has finished=True.
        Cancelling the consuming task (or closing the iterator early) aborts the request."""
        calls = self._plan(1, sampling_params, None if request_id is None else [request_id], None)
        async for _, out in self._stream([partial(self._prepare.prompt, prompt)], *calls):
            yield out

    async def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: Optional[SamplingParams] = None,
        request_id: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: Optional[str] = None,
        tools: Optional[list[dict[str, Any]]] = None,
    ) -> AsyncIterator[RequestOutput]:
        """One conversation through the tokenizer's chat template, streamed like `generate`.
        tools: function definitions for a template that takes them."""
        job = partial(self._prepare.chat, messages, add_generation_prompt, continue_final_message, chat_template, tools)
        calls = self._plan(1, sampling_params, None if request_id is None else [request_id], None)
        async for _, out in self._stream([job], *calls):
            yield out

    async def generate_many(
        self,
        prompts: Sequence[Prompt],
        sampling_params: ParamsArg = None,
        *,
        request_ids: Optional[Sequence[str]] = None,
        max_prompts: Optional[int] = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Several requests at once: yields (index into prompts, output) in arrival order until every
        request has finished. sampling_params: one for all, or one per prompt.

        All prompts are tokenised and validated before any is queued, so a bad one raises (ValueError /
        TypeError) at the first `__anext__` and nothing runs; the first output comes only after all of
        them are queued. A request that fails later raises here and aborts the others; closing the
        iterator or cancelling its task aborts every unfinished request. max_prompts: refuse calls with
        more prompts (ValueError), e.g. a server's per-request limit."""
        calls = self._plan(len(prompts), sampling_params, request_ids, max_prompts)
        async for item in self._stream([partial(self._prepare.prompt, p) for p in prompts], *calls):
            yield item

    def generate_many_sync(
        self,
        prompts: Sequence[Prompt],
        sampling_params: ParamsArg = None,
        *,
        request_ids: Optional[Sequence[str]] = None,
        max_prompts: Optional[int] = None,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """`generate_many` for synchronous code: a blocking iterator, no event loop involved (any thread,
        also one that runs an event loop, such as a notebook's). Closing it early aborts the requests."""
        calls = self._plan(len(prompts), sampling_params, request_ids, max_prompts)
        return self._stream_sync([partial(self._prepare.prompt, p) for p in prompts], *calls)

    def chat_sync(
        self,
        messages: list[dict[str, Any]],
        sampling_params: Optional[SamplingParams] = None,
        request_id: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: Optional[str] = None,
        tools: Optional[list[dict[str, Any]]] = None,
    ) -> Iterator[RequestOutput]:
        """`chat` for synchronous code, like `generate_many_sync`."""
        job = partial(self._prepare.chat, messages, add_generation_prompt, continue_final_message, chat_template, tools)
        calls = self._plan(1, sampling_params, None if request_id is None else [request_id], None)
        return (out for _, out in self._stream_sync([job], *calls))

    async def abort(self, request_id: str) -> None:
        """End a request now; its stream receives a final output with finish_reason "abort"."""
        out = await asyncio.to_thread(self._abort_now, request_id)
        if out is not None:
            self._deliver(request_id, out)

    async def abort_all(self) -> int:
        """End every request of this AsyncLLM now (each stream receives its final "abort" output);
        returns how many were running or waiting."""
        outs = await asyncio.to_thread(self._abort_all_now)
        for rid, out in outs:
            self._deliver(rid, out)
        return len(outs)

    # ---- how a call runs: plan, open its streams, submit (tokenise, then add), consume ----------
    def _plan(self, n: int, sampling_params, request_ids, max_prompts) -> tuple[list[SamplingParams], list[str]]:
        if self._stopping:
            raise RuntimeError("this AsyncLLM was shut down")
        if n == 0:
            raise ValueError("no prompts given")
        if max_prompts is not None and n > max_prompts:
            raise ValueError(f"{n} prompts in one call; at most {max_prompts} are accepted")
        params = per_prompt_params(sampling_params, n)
        if request_ids is None:
            return params, [uuid.uuid4().hex for _ in range(n)]
        rids = list(request_ids)
        if len(rids) != n or not all(isinstance(r, str) and r for r in rids):
            raise ValueError(f"request_ids must be {n} non-empty str, one per prompt; got {request_ids!r}")
        if len(set(rids)) != n:
            raise ValueError("request_ids must be distinct")
        return params, rids

    def _open(self, rids: list[str], q, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        with self._registry:
            taken = [r for r in rids if r in self._streams]
            if taken:
                raise ValueError(f"request_id {taken[0]!r} is already in use")
            for tag, rid in enumerate(rids):
                self._streams[rid] = _Stream(q, tag, loop)

    def _submit(self, jobs: list[_Job], params: list[SamplingParams], rids: list[str]) -> None:
        prompts = [job() for job in jobs]  # tokenising: on the caller's side, off the engine thread

        def add() -> None:
            if any(rid not in self._streams for rid in rids):  # the caller gave up meanwhile
                return
            added: list[str] = []
            try:
                for rid, (text, ids), sp in zip(rids, prompts, params):
                    self.engine.add_request(ids, sp, rid, prompt_text=text)
                    added.append(rid)
            except Exception:
                for rid in added:  # all or nothing
                    self.engine.abort_request(rid)
                raise

        self._on_engine(add)

    def _close(self, rids: list[str], unfinished: list[str]) -> None:
        for rid in rids:
            self._streams.pop(rid, None)
        if unfinished:
            try:
                self._on_engine(lambda: [self.engine.abort_request(rid) for rid in unfinished], wait=False)
            except RuntimeError:  # shut down meanwhile: nothing runs any more
                pass

    async def _stream(self, jobs, params, rids) -> AsyncIterator[tuple[int, RequestOutput]]:
        q: asyncio.Queue = asyncio.Queue()
        self._open(rids, q, asyncio.get_running_loop())
        pending = set(range(len(rids)))
        try:
            await asyncio.to_thread(self._submit, jobs, params, rids)
            while pending:
                tag, item = await q.get()
                yield tag, self._received(item, tag, pending)
        finally:
            self._close(rids, [rids[t] for t in pending])

    def _stream_sync(self, jobs, params, rids) -> Iterator[tuple[int, RequestOutput]]:
        q: queue.Queue = queue.Queue()
        self._open(rids, q, None)
        pending = set(range(len(rids)))
        try:
            self._submit(jobs, params, rids)
            while pending:
                tag, item = q.get()
                yield tag, self._received(item, tag, pending)
        finally:
            self._close(rids, [rids[t] for t in pending])

    @staticmethod
    def _received(item, tag: int, pending: set[int]) -> RequestOutput:
        if isinstance(item, BaseException):
            pending.discard(tag)
            raise item
        if item.finished:
            pending.discard(tag)
        return item

    def _abort_now(self, request_id: str) -> Optional[RequestOutput]:
        return self._on_engine(lambda: self.engine.abort_request(request_id))

    def _abort_all_now(self) -> list[tuple[str, RequestOutput]]:
        outs = self._on_engine(lambda: [(rid, self.engine.abort_request(rid)) for rid in list(self._streams)])
        return [(rid, out) for rid, out in outs if out is not None]

    # ---- lifecycle --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        if self._stopping:
            return self.engine.stats()
        return self._on_engine(self.engine.stats)

    def shutdown(self) -> None:
        with self._work:
            if self._stopping:
                return
            self._stopping = True
            self._work.notify_all()
        self._thread.join(timeout=60)
        while self._inbox:  # calls queued as it stopped: their callers are waiting
            self._inbox.popleft().fail(RuntimeError("the AsyncLLM was shut down before this call ran"))
        self.engine.shutdown()
        for rid in list(self._streams):  # nobody would ever answer them
            self._deliver(rid, RuntimeError("the AsyncLLM was shut down before this request finished"))

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.shutdown)


class _Call:
    """A function that the engine thread runs for another thread, and its outcome."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # raised again on the caller's thread
            self.error = e
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def wait(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _Tagged:
    request_id: str
    error: BaseException

"""The asyncio streaming API: many concurrent requests on one engine, each an async iterator.

The engine runs in one background thread that steps while any request is unfinished and sleeps
on a condition variable otherwise (no busy spin, ~0 CPU when idle). Outputs are handed to each
request's own asyncio queue on the event loop that asked for it, so any number of event loops
(a server's, `asyncio.run` per call in a notebook) can share one engine.

Streaming design: every yielded `RequestOutput` carries the cumulative state (`text`, `token_ids`
of each completion) *and* what changed since the previous yield of that request
(`CompletionOutput.text_delta`, `token_ids_delta`). Concatenating the deltas gives the final
text exactly; while stop strings are pending, characters that may start one are held back.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from paged_backend.args import EngineArgs
from paged_backend.chat import render_chat
from paged_backend.engine.engine import Engine, StepFailed
from paged_backend.engine.stats import EngineStats
from paged_backend.errors import EngineDeadError
from paged_backend.params import coerce_params
from paged_backend.outputs import RequestOutput
from paged_backend.params import SamplingParams


_ADMISSION_GAP_S = 0.002
_ADMISSION_WINDOW_MAX_S = 0.02


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    """Same constructor arguments as `LLM`; `generate`/`chat` are async iterators of outputs."""

    def __init__(self, model: str, **engine_kwargs: Any):
        self.args = EngineArgs(model=model, **engine_kwargs)
        self.engine = Engine(self.args)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="paged-backend-engine", daemon=True)
        self._thread.start()

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._work:
                if not self.engine.has_unfinished_requests():
                    while not self._stopping and not self.engine.has_unfinished_requests():
                        self._work.wait()
                    # Woken from idle: let requests submitted together (a client's batch) join the
                    # first step, for as long as they keep arriving within 2 ms of each other.
                    deadline = time.monotonic() + _ADMISSION_WINDOW_MAX_S
                    while self._work.wait(timeout=_ADMISSION_GAP_S) and time.monotonic() < deadline:
                        pass
                if self._stopping:
                    return
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
            for out in outputs:
                self._deliver(out.request_id, out.error if isinstance(out, _Tagged) else out)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone: nobody reads this request
            with self._lock:
                self._streams.pop(request_id, None)
                self.engine.abort_request(request_id)

    # ---- requests ---------------------------------------------------------------------------
    def _add(self, prompt, params: SamplingParams, request_id: str, prompt_text: Optional[str]) -> None:
        with self._work:
            if request_id not in self._streams:  # cancelled before it was added
                return
            req = self.engine.add_request(prompt, params, request_id)
            if prompt_text is not None:
                req.prompt = prompt_text
            self._work.notify()

    def _abort_now(self, request_id: str) -> Optional[RequestOutput]:
        with self._lock:
            return self.engine.abort_request(request_id)

    async def generate(
        self,
        prompt: Union[str, list[int]],
        sampling_params: Optional[SamplingParams] = None,
        request_id: Optional[str] = None,
        *,
        _prompt_text: Optional[str] = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as tokens arrive; the last one has finished=True.
        Cancelling the consuming task (or closing the iterator early) aborts the request."""
        if self._stopping:
            raise RuntimeError("this AsyncLLM was shut down")
        params = coerce_params(sampling_params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        finished = False
        try:
            await asyncio.to_thread(self._add, prompt, params, request_id, _prompt_text)
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: Optional[SamplingParams] = None,
        request_id: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: Optional[str] = None,
    ) -> AsyncIterator[RequestOutput]:
        """One conversation through the tokenizer's chat template, streamed like `generate`."""
        text, ids = render_chat(self.engine.tokenizer, messages, add_generation_prompt, continue_final_message, chat_template)
        async for out in self.generate(ids, sampling_params, request_id, _prompt_text=text):
            yield out

    async def abort(self, request_id: str) -> None:
        """End a request now; its stream receives a final output with finish_reason "abort"."""
        out = await asyncio.to_thread(self._abort_now, request_id)
        if out is not None:
            self._deliver(request_id, out)

    # ---- lifecycle --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        with self._lock:
            return self.engine.stats()

    def shutdown(self) -> None:
        with self._work:
            if self._stopping:
                return
            self._stopping = True
            self._work.notify_all()
        self._thread.join(timeout=60)
        with self._lock:
            self.engine.shutdown()

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.shutdown)


@dataclass
class _Tagged:
    request_id: str
    error: BaseException

"""Streaming plumbing of the OpenAI routes: server-sent events, merging several request streams,
and noticing a client that goes away (which aborts its requests, freeing their KV blocks)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Optional, Union

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from paged_backend import RequestOutput

logger = logging.getLogger("paged_backend.adapters")

Stream = tuple[RequestOutput, AsyncIterator[RequestOutput]]  # (first output, the rest)


def sse(obj: Union[BaseModel, dict, str]) -> str:
    """One server-sent event: `data: <json>\\n\\n` (or the literal [DONE])."""
    if isinstance(obj, BaseModel):
        payload = obj.model_dump_json()
    elif isinstance(obj, dict):
        payload = json.dumps(obj)
    else:
        payload = obj
    return f"data: {payload}\n\n"


async def _iterate(stream: Stream) -> AsyncIterator[RequestOutput]:
    first, rest = stream
    yield first
    if not first.finished:
        async for out in rest:
            yield out


async def merged(streams: list[Stream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) of several streams as they arrive (one stream: no tasks needed).
    Closing it closes every stream, which aborts the unfinished requests."""
    if len(streams) == 1:
        try:
            async for out in _iterate(streams[0]):
                yield 0, out
        finally:
            await streams[0][1].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int) -> None:
        try:
            async for out in _iterate(streams[k]):
                queue.put_nowait((k, out))
            queue.put_nowait((k, None))
        except Exception as e:
            queue.put_nowait((k, e))

    tasks = [asyncio.ensure_future(pump(k)) for k in range(len(streams))]
    try:
        remaining = len(streams)
        while remaining:
            k, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all([rest for _, rest in streams])


class Joined:
    """One request's complete output from its outputs of output_kind="delta" (each holds only what is
    new), added in order: the text, token ids and logprobs joined, the rest as the last output says."""

    def __init__(self) -> None:
        self.last: Optional[RequestOutput] = None
        self._text: dict[int, list[str]] = {}
        self._ids: dict[int, list[int]] = {}
        self._logprobs: dict[int, list] = {}

    def add(self, out: RequestOutput) -> None:
        for c in out.outputs:
            self._text.setdefault(c.index, []).append(c.text)
            self._ids.setdefault(c.index, []).extend(c.token_ids)
            self._logprobs.setdefault(c.index, []).extend(c.logprobs or [])
        self.last = out

    def output(self) -> RequestOutput:
        outs = [c.model_copy(update={"text": "".join(self._text[c.index]), "token_ids": self._ids[c.index],
                                     "logprobs": None if c.logprobs is None else self._logprobs[c.index]})
                for c in self.last.outputs]
        return self.last.model_copy(update={"outputs": outs})


async def close_all(gens) -> None:
    for g in gens:
        try:
            await g.aclose()
        except Exception:  # closing must not hide the error being reported
            logger.debug("closing a generator failed", exc_info=True)


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Runs `work`; if the client disconnects first, cancels it (aborting its requests) and
    returns None. Call after the body was read, so that receive() only reports the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        logger.info("client disconnected: request aborted")
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class EventStream(Response):
    """Server-sent events from an async iterator of `data: ...\\n\\n` strings. Unlike a plain
    StreamingResponse, a disconnect is noticed at once (not at the next write) and the iterator is
    always closed, so the requests behind it are aborted without waiting for the garbage collector."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                await self.events.aclose()

        streaming = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not streaming.done():
                logger.info("client disconnected mid-stream: request aborted")
                streaming.cancel()
            results = await asyncio.gather(streaming, watcher, return_exceptions=True)
        if isinstance(results[0], Exception) and not isinstance(results[0], OSError):
            logger.error("streaming failed", exc_info=results[0])

"""OpenAI-compatible routes over one `AsyncLLM`, as a Starlette app (what BentoML mounts).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /stats   GET /health

Every request is validated before anything is queued, and its first output is awaited before the
response starts, so bad input (a bad parameter, a prompt longer than the context) is an HTTP 400 in
OpenAI's error format rather than a broken stream. A client that goes away, mid-stream or while
waiting for a non-streamed answer, aborts its requests: their KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from paged_backend import AsyncLLM, RequestOutput, SamplingParams

from .openai_tools import ChatDeltas, assistant_message
from .openai_protocol import (
    APIError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse, LogprobFormatter,
    ModelCard, ModelList, UsageInfo, new_id, parse_request, sse,
)

logger = logging.getLogger("paged_backend.adapters")

_Stream = tuple[RequestOutput, AsyncIterator[RequestOutput]]  # (first output, the rest)


class OpenAIServing:
    """The handlers, holding the engine. One per process (per BentoML worker)."""

    def __init__(self, llm: AsyncLLM, served_model_names: list[str], model_root: Optional[str] = None):
        self.llm = llm
        self.names = list(served_model_names)
        self.root = model_root
        self.tokenizer = llm.get_tokenizer()
        self.fmt = LogprobFormatter(self.tokenizer)
        self.created = int(time.time())

    # ---- helpers ------------------------------------------------------------------------------
    def model_name(self, requested: Optional[str]) -> str:
        if not requested:
            return self.names[0]
        if requested not in self.names:
            raise APIError(f"The model `{requested}` does not exist; this server serves {self.names}",
                           status=404, param="model", code="model_not_found")
        return requested

    async def _start(self, gens: list[AsyncIterator[RequestOutput]]) -> list[_Stream]:
        """Runs every generator to its first output; an error in any (bad prompt) closes them all."""
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:  # cancelled (the client left): close what was started
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_all(gens)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await _close_all(gens)
            e = errors[0]
            if isinstance(e, ValidationError):
                raise APIError.from_validation(e) from e
            if isinstance(e, (ValueError, TypeError)):
                raise APIError(str(e)) from e
            raise e
        return list(zip(results, gens))

    # ---- routes -------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await _json(request))
        model = self.model_name(req.model)
        calling = req.tool_calling(getattr(self.tokenizer, "chat_template", None))
        params = req.to_sampling_params(calling)
        messages = [m.as_template_message() for m in req.messages]
        template_tools = None
        if calling is not None:
            messages, template_tools = calling.prepare(messages)
        rid = new_id("chatcmpl")
        gen = self.llm.chat(messages, params, request_id=rid, add_generation_prompt=req.add_generation_prompt,
                            continue_final_message=req.continue_final_message, tools=template_tools)
        k = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream:
            streams = await _unless_disconnected(request, self._start([gen]))
            if streams is None:
                return Response(status_code=499)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self._chat_events(rid, model, streams, params, k, usage, calling))
        final = await _unless_disconnected(request, self._collect([gen]))
        if final is None:
            return Response(status_code=499)
        out = final[0]
        choices = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            message, called = assistant_message(c.text, calling)
            choices.append(ChatChoice(index=c.index, message=AssistantMessage(**message),
                                      finish_reason="tool_calls" if called else c.finish_reason,
                                      logprobs=None if k is None else self.fmt.chat(c.token_ids, c.logprobs or [], k)))
        usage = UsageInfo.of(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))
        return _json_response(ChatCompletionResponse(id=rid, model=model, choices=choices, usage=usage))

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = parse_request(CompletionRequest, await _json(request))
        model = self.model_name(req.model)
        params = req.to_sampling_params()
        prompts = req.prompts()
        rid = new_id("cmpl")
        gens = [self.llm.generate(p, params, request_id=f"{rid}-{i}") for i, p in enumerate(prompts)]
        if req.stream:
            streams = await _unless_disconnected(request, self._start(gens))
            if streams is None:
                return Response(status_code=499)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self._completion_events(rid, model, streams, prompts, req, params.n, usage))
        finals = await _unless_disconnected(request, self._collect(gens))
        if finals is None:
            return Response(status_code=499)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, (prompt, out) in enumerate(zip(prompts, finals)):
            prompt_tokens += len(out.prompt_token_ids)
            head = self._prompt_text(prompt, out) if req.echo else ""
            for c in sorted(out.outputs, key=lambda c: c.index):
                completion_tokens += len(c.token_ids)
                lps = None if req.logprobs is None else self.fmt.completion(c.token_ids, c.logprobs or [], req.logprobs, 0)
                choices.append(CompletionChoice(index=p * params.n + c.index, text=head + c.text, logprobs=lps,
                                                finish_reason=c.finish_reason))
        usage = UsageInfo.of(prompt_tokens, completion_tokens)
        return _json_response(CompletionResponse(id=rid, model=model, choices=choices, usage=usage))

    async def models(self, request: Request) -> Response:
        cards = [ModelCard(id=name, created=self.created, root=self.root) for name in self.names]
        return _json_response(ModelList(data=cards))

    async def stats(self, request: Request) -> Response:
        return JSONResponse(dataclasses.asdict(self.llm.stats()))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": self.names})

    # ---- generation ---------------------------------------------------------------------------
    async def _collect(self, gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        streams = await self._start(gens)
        finals: list[Optional[RequestOutput]] = [first for first, _ in streams]
        async for k, out in _merged(streams):
            finals[k] = out
        return finals  # type: ignore[return-value]

    def _prompt_text(self, prompt: Union[str, list[int]], out: RequestOutput) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(out.prompt_token_ids)

    async def _chat_events(self, rid: str, model: str, streams: list[_Stream], params: SamplingParams,
                           k: Optional[int], include_usage: bool, calling=None) -> AsyncIterator[str]:
        created = int(time.time())
        deltas = [ChatDeltas(calling) for _ in range(params.n)]  # content / tool-call deltas per choice

        def chunk(choices: list[ChatChunkChoice], usage: Optional[UsageInfo] = None) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

        done: set[int] = set()
        last: Optional[RequestOutput] = None
        try:
            for i in range(params.n):
                yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
            async for _, out in _merged(streams):
                last = out
                choices = []
                for c in out.outputs:
                    if c.index in done or not (c.text_delta or c.finished or (k is not None and c.token_ids_delta)):
                        continue
                    lps = None
                    if k is not None:
                        lo = len(c.token_ids) - len(c.token_ids_delta)
                        lps = self.fmt.chat(c.token_ids_delta, (c.logprobs or [])[lo:len(c.token_ids)], k)
                    d = deltas[c.index]
                    delta = d.feed(c.text_delta, c.finished)
                    if not delta and not c.finished and lps is None:
                        continue  # text held back (it may start a tool call)
                    choices.append(ChatChunkChoice(index=c.index, delta=delta, logprobs=lps,
                                                   finish_reason="tool_calls" if c.finished and d.called else c.finish_reason))
                    if c.finished:
                        done.add(c.index)
                if choices:
                    yield chunk(choices)
            if include_usage and last is not None:
                usage = UsageInfo.of(len(last.prompt_token_ids), sum(len(c.token_ids) for c in last.outputs))
                yield chunk([], usage)
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            yield sse(_internal_error(e).body())
        yield sse("[DONE]")

    async def _completion_events(self, rid: str, model: str, streams: list[_Stream], prompts: list,
                                 req: CompletionRequest, n: int, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[CompletionChoice], usage: Optional[UsageInfo] = None) -> str:
            return sse(CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage))

        offsets: dict[int, int] = {}
        done: set[int] = set()
        finals: list[RequestOutput] = [first for first, _ in streams]
        try:
            if req.echo:
                heads = [self._prompt_text(p, first) for p, (first, _) in zip(prompts, streams)]
                yield chunk([CompletionChoice(index=p * n + i, text=heads[p]) for p in range(len(prompts))
                             for i in range(n)])
                offsets = {p * n + i: len(heads[p]) for p in range(len(prompts)) for i in range(n)}
            async for p, out in _merged(streams):
                finals[p] = out
                choices = []
                for c in out.outputs:
                    idx = p * n + c.index
                    if idx in done or not (c.text_delta or c.finished or (req.logprobs is not None and c.token_ids_delta)):
                        continue
                    lps = None
                    if req.logprobs is not None:
                        lo = len(c.token_ids) - len(c.token_ids_delta)
                        lps = self.fmt.completion(c.token_ids_delta, (c.logprobs or [])[lo:len(c.token_ids)],
                                                  req.logprobs, offsets.get(idx, 0))
                    offsets[idx] = offsets.get(idx, 0) + len(c.text_delta)
                    choices.append(CompletionChoice(index=idx, text=c.text_delta, logprobs=lps,
                                                    finish_reason=c.finish_reason))
                    if c.finished:
                        done.add(idx)
                if choices:
                    yield chunk(choices)
            if include_usage:
                usage = UsageInfo.of(sum(len(o.prompt_token_ids) for o in finals),
                                     sum(len(c.token_ids) for o in finals for c in o.outputs))
                yield chunk([], usage)
        except Exception as e:
            yield sse(_internal_error(e).body())
        yield sse("[DONE]")


# ---- streaming plumbing -----------------------------------------------------------------------
async def _iterate(stream: _Stream) -> AsyncIterator[RequestOutput]:
    first, rest = stream
    yield first
    if not first.finished:
        async for out in rest:
            yield out


async def _merged(streams: list[_Stream]) -> AsyncIterator[tuple[int, RequestOutput]]:
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
        await _close_all([rest for _, rest in streams])


async def _close_all(gens) -> None:
    for g in gens:
        try:
            await g.aclose()
        except Exception:  # closing must not hide the error being reported
            logger.debug("closing a generator failed", exc_info=True)


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
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


# ---- the app ------------------------------------------------------------------------------------
async def _json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None


def _json_response(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _internal_error(e: BaseException) -> APIError:
    logger.error("request failed: %r", e, exc_info=e)
    return APIError(f"the server failed to complete the request: {e}", status=500, type="internal_server_error")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(get_serving: Callable[[], Optional[OpenAIServing]]) -> Starlette:
    """The routes; `get_serving` returns the handlers once the engine is loaded (None before)."""

    def route(path: str, name: str, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            serving = get_serving()
            if serving is None:
                return _error_response(APIError("the engine is still loading", 503, "service_unavailable"))
            try:
                return await getattr(serving, name)(request)
            except APIError as e:
                return _error_response(e)
            except Exception as e:  # one request's failure never takes the server down
                return _error_response(_internal_error(e))

        return Route(path, endpoint, methods=methods, name=f"openai_{name}")

    return Starlette(routes=[
        route("/v1/chat/completions", "chat_completions", ["POST"]),
        route("/v1/completions", "completions", ["POST"]),
        route("/v1/models", "models", ["GET"]),
        route("/stats", "stats", ["GET"]),
        route("/health", "health", ["GET"]),
    ])

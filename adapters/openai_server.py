"""OpenAI-compatible routes over one `AsyncLLM`, as a Starlette app (what BentoML mounts).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    POST /tokenize   POST /detokenize (vLLM's shapes)   GET /stats   GET /health

Every request is validated before anything is queued, and its first output is awaited before the
response starts, so bad input (a bad parameter, a prompt longer than the context) is an HTTP 400 in
OpenAI's error format rather than a broken stream. A client that goes away, mid-stream or while
waiting for a non-streamed answer, aborts its requests: their KV blocks are freed at once; so does
`request_timeout_s`. Beyond `max_waiting_requests` requests without a first token, new ones get 429.
A failure inside the server is a 500 that names a request id; the exception is logged with that id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Union

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from paged_backend import AsyncLLM, RequestOutput, SamplingParams

from .metrics import EngineMetrics
from .openai_tools import ChatDeltas, assistant_message
from .openai_protocol import (
    APIError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, LogprobFormatter, ModelCard, ModelList, TokenizeChatRequest, TokenizeCompletionRequest,
    TokenizeResponse, UsageInfo, new_id, parse_request,
)
from .sse import EventStream, Joined, Stream, close_all, merged, sse, unless_disconnected

logger = logging.getLogger("paged_backend.adapters")


@dataclass(frozen=True)
class ServerLimits:
    max_prompts_per_request: int = 256
    max_waiting_requests: int = 1024  # accepted requests that have no first token yet
    request_timeout_s: Optional[float] = None
    retry_after_s: int = 1


class _Admission:
    """Counts requests accepted but not started (no first output yet): the server's queue."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s, self.waiting = limit, retry_after_s, 0

    def admit(self, k: int) -> None:
        if self.waiting + k > self.limit:
            raise APIError(f"the server has {self.waiting} requests waiting (max_waiting_requests={self.limit}); "
                           "retry later", status=429, type="rate_limit_exceeded", code="server_busy",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.waiting += k


class _Tracked:
    """A request's output stream, counted as waiting until its first output (or until it is closed),
    its latencies recorded when it finishes. A class, not an async generator, so that closing it
    releases its place even if it was never started."""

    def __init__(self, gen: AsyncIterator[RequestOutput], admission: _Admission, metrics: Optional[EngineMetrics]):
        self.gen, self.admission, self.metrics = gen, admission, metrics
        self.waiting = True

    def _started(self) -> None:
        if self.waiting:
            self.waiting = False
            self.admission.waiting -= 1

    def __aiter__(self) -> "_Tracked":
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self.gen.__anext__()
        except BaseException:
            self._started()
            raise
        self._started()
        if out.finished and self.metrics is not None:
            self.metrics.observe(out)
        return out

    async def aclose(self) -> None:
        self._started()
        await self.gen.aclose()


class OpenAIServing:
    """The handlers, holding the engine. One per process (per BentoML worker)."""

    def __init__(self, llm: AsyncLLM, served_model_names: list[str], *, aliases: tuple[str, ...] = (),
                 limits: ServerLimits = ServerLimits(), metrics: Optional[EngineMetrics] = None):
        """`served_model_names` are listed and accepted; `aliases` (the model's local path, say) are
        accepted but never shown."""
        self.llm = llm
        self.names = list(served_model_names)
        self.aliases = set(aliases)
        self.limits = limits
        self.metrics = metrics
        self.admission = _Admission(limits.max_waiting_requests, limits.retry_after_s)
        self.tokenizer = llm.get_tokenizer()
        self.max_model_len = llm.engine.max_model_len  # read only: AsyncLLM has no public max_model_len yet
        self.fmt = LogprobFormatter(self.tokenizer)
        self.created = int(time.time())
        private = self.aliases | {str(getattr(self.tokenizer, "name_or_path", "") or "")}
        # only path-like strings: replacing a short plain word would garble messages
        self._private = sorted((p for p in private if "/" in p or "\\" in p), key=len, reverse=True)

    # ---- helpers ------------------------------------------------------------------------------
    def model_name(self, requested: Optional[str]) -> str:
        if not requested or requested in self.aliases:
            return self.names[0]
        if requested not in self.names:
            raise APIError(f"The model `{_shorten(requested)}` does not exist; this server serves {self.names}",
                           status=404, param="model", code="model_not_found")
        return requested

    def _tracked(self, gen: AsyncIterator[RequestOutput]) -> "_Tracked":
        return _Tracked(gen, self.admission, self.metrics)

    def _public(self, message: str) -> str:
        """`message` with the model's local paths replaced by the served name."""
        for private in self._private:
            message = message.replace(private, self.names[0])
        return message

    def _deadline(self) -> Optional[float]:
        t = self.limits.request_timeout_s
        return None if t is None else asyncio.get_running_loop().time() + t

    async def _start(self, gens: list[AsyncIterator[RequestOutput]]) -> list[Stream]:
        """Runs every generator to its first output; an error in any (bad prompt) closes them all."""
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:  # cancelled (the client left): close what was started
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_all(gens)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await close_all(gens)
            e = errors[0]
            if isinstance(e, ValidationError):
                raise APIError.from_validation(e) from e
            if isinstance(e, (ValueError, TypeError)):
                raise APIError(self._public(str(e))) from e
            raise e
        return list(zip(results, gens))

    # ---- routes -------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await _json(request))
        model = self.model_name(req.model)
        calling = req.tool_calling(getattr(self.tokenizer, "chat_template", None))
        params = req.to_sampling_params(calling)
        params.output_kind = "delta"  # (no per-step copies of the output so far; _collect joins them)
        messages = [m.as_template_message() for m in req.messages]
        template_tools = None
        if calling is not None:
            messages, template_tools = calling.prepare(messages)
        rid = new_id("chatcmpl")
        deadline = self._deadline()
        self.admission.admit(1)
        gen = self._tracked(self.llm.chat(messages, params, request_id=rid,
                                          add_generation_prompt=req.add_generation_prompt,
                                          continue_final_message=req.continue_final_message,
                                          tools=template_tools))
        k = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream:
            streams = await self._until(deadline, unless_disconnected(request, self._start([gen])), [gen])
            if streams is None:
                return Response(status_code=499)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._chat_events(rid, model, streams, params, k, usage, calling)
            return EventStream(_until_deadline(deadline, self.limits.request_timeout_s, events))
        final = await self._until(deadline, unless_disconnected(request, self._collect([gen])), [gen])
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
        params.output_kind = "delta"
        prompts = req.prompts()
        if len(prompts) > self.limits.max_prompts_per_request:
            raise APIError(f"{len(prompts)} prompts in one request; at most {self.limits.max_prompts_per_request} "
                           "(max_prompts_per_request)", param="prompt")
        rid = new_id("cmpl")
        deadline = self._deadline()
        self.admission.admit(len(prompts))
        gens = [self._tracked(self.llm.generate(p, params, request_id=f"{rid}-{i}")) for i, p in enumerate(prompts)]
        if req.stream:
            streams = await self._until(deadline, unless_disconnected(request, self._start(gens)), gens)
            if streams is None:
                return Response(status_code=499)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._completion_events(rid, model, streams, prompts, req, params.n, usage)
            return EventStream(_until_deadline(deadline, self.limits.request_timeout_s, events))
        finals = await self._until(deadline, unless_disconnected(request, self._collect(gens)), gens)
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
        cards = [ModelCard(id=name, created=self.created, root=self.names[0], max_model_len=self.max_model_len)
                 for name in self.names]
        return _json_response(ModelList(data=cards))

    async def tokenize(self, request: Request) -> Response:
        body = await _json(request)
        chat = isinstance(body, dict) and "messages" in body
        req = parse_request(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
        self.model_name(req.model)
        if not chat:
            text = req.prompt
        else:
            from jinja2 import TemplateError  # transformers renders chat templates with jinja2

            messages = [m.as_template_message() for m in req.messages]
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False,
                    add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                    continue_final_message=req.continue_final_message)
            except (TemplateError, ValueError) as e:
                raise APIError(f"the chat template failed: {e}", param="messages") from None
        encoded = await asyncio.to_thread(self.tokenizer, text, add_special_tokens=req.add_special_tokens)
        ids = encoded["input_ids"]
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return _json_response(TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids,
                                               token_strs=strs))

    async def detokenize(self, request: Request) -> Response:
        req: DetokenizeRequest = parse_request(DetokenizeRequest, await _json(request))
        self.model_name(req.model)
        vocab = len(self.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return _json_response(DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens)))

    async def stats(self, request: Request) -> Response:
        return JSONResponse(dataclasses.asdict(self.llm.stats()))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": self.names})

    # ---- generation ---------------------------------------------------------------------------
    async def _collect(self, gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        """Each request's complete output, joined from its delta outputs (params.output_kind)."""
        streams = await self._start(gens)
        joined = [Joined() for _ in streams]
        async for k, out in merged(streams):
            joined[k].add(out)
        return [j.output() for j in joined]

    async def _until(self, deadline: Optional[float], work, gens: list) -> Any:
        """`work` (which owns `gens`), cancelled at the deadline. When it fails, times out or the
        client left (None), `gens` are closed here too: their requests are aborted and their places
        in the queue given back, even if `work` was cancelled before it started them."""
        ok = False
        try:
            if deadline is None:
                result = await work
            else:
                result = await asyncio.wait_for(work, max(0.0, deadline - asyncio.get_running_loop().time()))
            ok = result is not None
            return result
        except asyncio.TimeoutError:
            raise _timeout_error(self.limits.request_timeout_s) from None
        finally:
            if not ok:
                await close_all(gens)

    def _prompt_text(self, prompt: Union[str, list[int]], out: RequestOutput) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(out.prompt_token_ids)

    async def _chat_events(self, rid: str, model: str, streams: list[Stream], params: SamplingParams,
                           k: Optional[int], include_usage: bool, calling=None) -> AsyncIterator[str]:
        created = int(time.time())
        deltas = [ChatDeltas(calling) for _ in range(params.n)]  # content / tool-call deltas per choice

        def chunk(choices: list[ChatChunkChoice], usage: Optional[UsageInfo] = None) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

        done: set[int] = set()
        last: Optional[RequestOutput] = None
        completion_tokens = 0  # (the outputs carry deltas: params.output_kind)
        try:
            for i in range(params.n):
                yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
            async for _, out in merged(streams):
                last = out
                choices = []
                for c in out.outputs:
                    completion_tokens += len(c.token_ids_delta)
                    if c.index in done or not (c.text_delta or c.finished or (k is not None and c.token_ids_delta)):
                        continue
                    lps = None
                    if k is not None:  # (delta outputs: token_ids and logprobs are this output's own)
                        lps = self.fmt.chat(c.token_ids, c.logprobs or [], k)
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
                yield chunk([], UsageInfo.of(len(last.prompt_token_ids), completion_tokens))
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            yield sse(_internal_error(e).body())
        yield sse("[DONE]")

    async def _completion_events(self, rid: str, model: str, streams: list[Stream], prompts: list,
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
            completion_tokens = 0  # (the outputs carry deltas: params.output_kind)
            async for p, out in merged(streams):
                finals[p] = out
                choices = []
                for c in out.outputs:
                    completion_tokens += len(c.token_ids_delta)
                    idx = p * n + c.index
                    if idx in done or not (c.text_delta or c.finished or (req.logprobs is not None and c.token_ids_delta)):
                        continue
                    lps = None
                    if req.logprobs is not None:  # (delta outputs: token_ids and logprobs are this output's own)
                        lps = self.fmt.completion(c.token_ids, c.logprobs or [], req.logprobs, offsets.get(idx, 0))
                    offsets[idx] = offsets.get(idx, 0) + len(c.text_delta)
                    choices.append(CompletionChoice(index=idx, text=c.text_delta, logprobs=lps,
                                                    finish_reason=c.finish_reason))
                    if c.finished:
                        done.add(idx)
                if choices:
                    yield chunk(choices)
            if include_usage:
                usage = UsageInfo.of(sum(len(o.prompt_token_ids) for o in finals), completion_tokens)
                yield chunk([], usage)
        except Exception as e:
            yield sse(_internal_error(e).body())
        yield sse("[DONE]")


def _shorten(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _timeout_error(seconds: Optional[float]) -> APIError:
    return APIError(f"the request did not finish within request_timeout_s={seconds} s and was aborted",
                    status=504, type="timeout", code="request_timeout")


async def _until_deadline(deadline: Optional[float], seconds: Optional[float],
                          events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events of a stream; at the deadline an error event and [DONE] end it (closing `events`
    aborts its requests)."""
    try:
        if deadline is None:
            async for event in events:
                yield event
            return
        loop = asyncio.get_running_loop()
        it = events.__aiter__()
        while True:
            try:
                event = await asyncio.wait_for(it.__anext__(), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                yield sse(_timeout_error(seconds).body())
                yield sse("[DONE]")
                return
            yield event
    finally:
        await events.aclose()


# ---- the app ------------------------------------------------------------------------------------
async def _json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError("the request body is nested too deeply") from None


def _json_response(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _internal_error(e: BaseException) -> APIError:
    """A 500 that names an id to quote, never the exception (it may hold paths or other requests'
    data); the log has the exception under the same id."""
    error_id = new_id("err")
    logger.error("request %s failed: %r", error_id, e, exc_info=e)
    return APIError(f"the server failed to complete the request (request id {error_id}); the server log "
                    "has the details", status=500, type="internal_server_error", code=error_id,
                    headers={"X-Request-Id": error_id})


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(get_serving: Callable[[], Optional[OpenAIServing]]) -> Starlette:
    """The routes; `get_serving` returns the handlers once the engine is loaded (None before)."""

    def route(path: str, name: str, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            serving = get_serving()
            if serving is None:
                return _error_response(APIError("the engine is still loading", 503, "service_unavailable",
                                                headers={"Retry-After": "5"}))
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
        route("/tokenize", "tokenize", ["POST"]),
        route("/detokenize", "detokenize", ["POST"]),
        route("/stats", "stats", ["GET"]),
        route("/health", "health", ["GET"]),
    ])

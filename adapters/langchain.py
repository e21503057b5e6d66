"""LangChain adapters: `PagedBackendLLM` (a `BaseLLM`) and `ChatPagedBackend` (a `BaseChatModel`).

    from paged_backend.adapters.langchain import PagedBackendLLM, ChatPagedBackend
    llm = PagedBackendLLM(model="smollm2-135m-instruct", temperature=0, max_tokens=64)
    chain = PromptTemplate.from_template("Q: {q}\\nA:") | llm | StrOutputParser()
    chat = ChatPagedBackend.from_engine(llm.async_engine)     # a second adapter on the same engine

Design: ONE `AsyncLLM` backs every call of an adapter (and may be shared by several adapters).
Every request goes to that engine concurrently, so whatever runs at the same time shares the
engine's batches (continuous batching):
- `_generate` (sync) submits all prompts at once and waits for all of them; `.batch(...)` of a
  chain therefore reaches the engine as one batch. Sync calls are bridged to asyncio through one
  background event-loop thread of this module; concurrent sync calls from several threads (the
  chat model's `.batch`) all land in the same engine.
- `_agenerate` / `_astream` run on the caller's own event loop.
- `_stream` / `_astream` yield one chunk per engine output (one token per step), built from the
  engine's `text_delta`s, so the chunks concatenate exactly to the final text.
Cancelling a call (closing a stream early, cancelling a task) aborts its engine requests.

Only `paged_backend`'s public names (and `get_tokenizer()`) are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, BaseLLM
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from paged_backend import LLM, AsyncLLM, CompletionOutput, RequestOutput, SamplingParams

__all__ = ["PagedBackendLLM", "ChatPagedBackend"]

# Adapter fields that are SamplingParams fields (a per-call kwarg of the same name overrides them).
_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "stop_token_ids", "ignore_eos", "seed", "logprobs",
    "skip_special_tokens", "include_stop_str_in_output",
)
_ENGINE_FIELDS = (
    "tokenizer", "dtype", "device", "max_model_len", "block_size", "gpu_memory_utilization",
    "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "load_format",
)
_IGNORED_KWARGS = ("stream",)  # BaseChatModel passes stream=True through to _stream

# ---- sync <-> async bridge ----------------------------------------------------------------------
_loop_lock = threading.Lock()
_loop: Optional[asyncio.AbstractEventLoop] = None


def _background_loop() -> asyncio.AbstractEventLoop:
    """One daemon thread running an event loop, for the sync entry points of every adapter."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="paged-backend-langchain", daemon=True).start()
            _loop = loop
        return _loop


_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _iterate_sync(make_agen: Callable[[], AsyncIterator[Any]]) -> Iterator[Any]:
    """Iterate an async iterator (made on the background loop) from a sync caller, item by item.
    Closing this generator early cancels the async side (which aborts the engine requests)."""
    items: queue.Queue = queue.Queue()

    async def pump() -> None:
        try:
            async with contextlib.aclosing(make_agen()) as agen:
                async for item in agen:
                    items.put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            items.put(_Raised(e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            items.put(_DONE)

    future = asyncio.run_coroutine_threadsafe(pump(), _background_loop())
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        if not future.done():
            future.cancel()


async def _merged(jobs: list[Callable[[], AsyncIterator[RequestOutput]]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run every job (an engine request) concurrently; yield (job index, output) as they come."""
    outputs: asyncio.Queue = asyncio.Queue()

    async def one(i: int) -> None:
        try:
            async for out in jobs[i]():
                outputs.put_nowait((i, out, None))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            outputs.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(jobs))]
    try:
        remaining = len(jobs)
        while remaining:
            i, out, err = await outputs.get()
            if err is not None:
                raise err
            yield i, out
            if out.finished:
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- shared fields and helpers ------------------------------------------------------------------
class _PagedBackendBase(BaseModel):
    """Engine arguments, sampling defaults and the engine itself, shared by both adapters."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: Optional[str] = None
    """Model name, local dir, .gguf file or bundled alias. Taken from `async_engine` when given."""
    async_engine: Optional[AsyncLLM] = Field(default=None, exclude=True)
    """An existing engine to run on (several adapters may share one); made from `model` if None."""

    # engine arguments (used only when the adapter makes its engine)
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: Optional[int] = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: bool = True
    load_format: str = "auto"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further `AsyncLLM` keyword arguments (e.g. the engine's own `seed`)."""

    # sampling defaults (SamplingParams meanings; each one can be overridden per call as a kwarg)
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: Optional[int] = 256
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Optional[list[str]] = None
    """Stop strings; the `stop` of a call is added to these."""
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    streaming: bool = False
    """Also report tokens through callbacks (`on_llm_new_token`) on invoke/generate."""

    _owns_engine: bool = PrivateAttr(default=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_sync_llm(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("engine", "async_engine"):
                if isinstance(values.get(key), LLM):
                    raise TypeError(
                        f"{cls.__name__} runs on an AsyncLLM (it serves batches, streams and concurrent calls on "
                        "one engine); the offline LLM cannot stream. Pass async_engine=AsyncLLM(...) instead."
                    )
            if "engine" in values:
                values = {**values}
                values["async_engine"] = values.pop("engine")
        return values

    @model_validator(mode="after")
    def _make_engine(self) -> "_PagedBackendBase":
        if self.async_engine is None:
            if not self.model:
                raise ValueError("give model=... (or async_engine=an existing AsyncLLM)")
            kwargs = {f: getattr(self, f) for f in _ENGINE_FIELDS}
            self.async_engine = AsyncLLM(self.model, **kwargs, **self.engine_kwargs)
            self._owns_engine = True
        elif self.model is None:
            args = getattr(self.async_engine, "args", None)
            self.model = getattr(args, "model", None)
        return self

    @classmethod
    def from_engine(cls, engine: AsyncLLM, **fields: Any):
        """An adapter on an existing engine (shared with whoever else uses it)."""
        return cls(async_engine=engine, **fields)

    def shutdown(self) -> None:
        """Stop the engine if this adapter made it (a shared engine is left to its owner)."""
        if self._owns_engine and self.async_engine is not None:
            self.async_engine.shutdown()

    def _sampling_params(self, stop: Optional[list[str]], kwargs: dict[str, Any], streaming=False) -> SamplingParams:
        values = {f: getattr(self, f) for f in _SAMPLING_FIELDS}
        call = {k: v for k, v in kwargs.items() if k not in _IGNORED_KWARGS}
        call_stop = call.pop("stop", None)
        unknown = sorted(set(call) - set(_SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"unknown generation argument(s) {unknown}; known: {list(_SAMPLING_FIELDS) + ['stop']}")
        values.update(call)
        stops: list[str] = []
        for group in (self.stop, call_stop, stop):
            for s in [group] if isinstance(group, str) else (group or []):
                if s not in stops:
                    stops.append(s)
        if streaming and values["n"] != 1:
            raise ValueError("streaming needs n=1")
        return SamplingParams(**values, stop=stops or None)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, **{f: getattr(self, f) for f in _SAMPLING_FIELDS},
                "stop": self.stop}

    def get_token_ids(self, text: str) -> list[int]:
        if getattr(self, "custom_get_token_ids", None) is not None:
            return self.custom_get_token_ids(text)  # type: ignore[attr-defined]
        return list(self.async_engine.get_tokenizer().encode(text, add_special_tokens=False))

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any):
        return {**super()._get_ls_params(stop=stop, **kwargs), "ls_provider": "paged_backend"}  # type: ignore[misc]


def _completion_info(out: RequestOutput, c: CompletionOutput) -> dict[str, Any]:
    info: dict[str, Any] = {
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(c.token_ids),
    }
    if c.logprobs is not None:
        info["logprobs"] = c.logprobs
    return info


def _usage(outs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- the completion model -----------------------------------------------------------------------
class PagedBackendLLM(_PagedBackendBase, BaseLLM):
    """A LangChain LLM (text in, text out) running on the paged-backend engine."""

    @property
    def _llm_type(self) -> str:
        return "paged-backend"

    def _jobs(self, prompts: list[str], params: SamplingParams):
        engine = self.async_engine
        return [lambda p=p: engine.generate(p, params) for p in prompts]

    def _result(self, finals: list[RequestOutput]) -> LLMResult:
        generations = [[Generation(text=c.text, generation_info=_completion_info(o, c)) for c in o.outputs] for o in finals]
        return LLMResult(generations=generations, llm_output={"token_usage": _usage(finals), "model_name": self.model})

    @staticmethod
    def _token_chunk(i: int, out: RequestOutput, many: bool) -> Optional[GenerationChunk]:
        c = out.outputs[0]
        if not c.text_delta and not c.token_ids_delta:
            return None
        return GenerationChunk(text=c.text_delta, generation_info={"prompt_index": i} if many else None)

    def _generate(
        self, prompts: list[str], stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> LLMResult:
        params = self._sampling_params(stop, kwargs)
        jobs = self._jobs(prompts, params)
        finals: list[Optional[RequestOutput]] = [None] * len(prompts)
        report = self.streaming and run_manager is not None and params.n == 1
        for i, out in _iterate_sync(lambda: _merged(jobs)):
            if report and (chunk := self._token_chunk(i, out, len(prompts) > 1)) is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            if out.finished:
                finals[i] = out
        return self._result(finals)  # type: ignore[arg-type]

    async def _agenerate(
        self, prompts: list[str], stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> LLMResult:
        params = self._sampling_params(stop, kwargs)
        finals: list[Optional[RequestOutput]] = [None] * len(prompts)
        report = self.streaming and run_manager is not None and params.n == 1
        async with contextlib.aclosing(_merged(self._jobs(prompts, params))) as outputs:
            async for i, out in outputs:
                if report and (chunk := self._token_chunk(i, out, len(prompts) > 1)) is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                if out.finished:
                    finals[i] = out
        return self._result(finals)  # type: ignore[arg-type]

    @staticmethod
    def _stream_chunk(out: RequestOutput) -> tuple[Optional[GenerationChunk], bool]:
        """(chunk to yield or None, whether it carries a new token for on_llm_new_token)."""
        c = out.outputs[0]
        new = bool(c.text_delta or c.token_ids_delta)
        info = _completion_info(out, c) if out.finished else None
        return (GenerationChunk(text=c.text_delta, generation_info=info) if new or info else None), new

    def _stream(
        self, prompt: str, stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        params = self._sampling_params(stop, kwargs, streaming=True)
        engine = self.async_engine
        for out in _iterate_sync(lambda: engine.generate(prompt, params)):
            chunk, new = self._stream_chunk(out)
            if run_manager is not None and new:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            if chunk is not None:
                yield chunk

    async def _astream(
        self, prompt: str, stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        params = self._sampling_params(stop, kwargs, streaming=True)
        async with contextlib.aclosing(self.async_engine.generate(prompt, params)) as outputs:
            async for out in outputs:
                chunk, new = self._stream_chunk(out)
                if run_manager is not None and new:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                if chunk is not None:
                    yield chunk


# ---- the chat model -----------------------------------------------------------------------------
def _text_content(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatPagedBackend takes text content only; got a {kind!r} content block")
    return "".join(parts)


def to_chat_messages(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> the role/content dicts of the model's chat template."""
    converted = []
    for m in messages:
        if isinstance(m, SystemMessage):
            d: dict[str, Any] = {"role": "system"}
        elif isinstance(m, HumanMessage):
            d = {"role": "user"}
        elif isinstance(m, AIMessage):
            d = {"role": "assistant"}
        elif isinstance(m, ToolMessage):
            d = {"role": "tool", "tool_call_id": m.tool_call_id}
        elif isinstance(m, ChatMessage):
            d = {"role": m.role}
        else:
            raise ValueError(f"ChatPagedBackend cannot send a {type(m).__name__} to the model")
        d["content"] = _text_content(m)
        converted.append(d)
    return converted


class ChatPagedBackend(_PagedBackendBase, BaseChatModel):
    """A LangChain chat model on the paged-backend engine; messages go through the model's own chat
    template."""

    @property
    def _llm_type(self) -> str:
        return "paged-backend-chat"

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools=None) -> int:
        """Prompt tokens as the engine will see them (the chat template applied)."""
        tok = self.async_engine.get_tokenizer()
        text = tok.apply_chat_template(to_chat_messages(messages), tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def _metadata(self, out: RequestOutput, c: CompletionOutput) -> dict[str, Any]:
        return {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "model_name": self.model,
                "model_provider": "paged_backend", **({"logprobs": c.logprobs} if c.logprobs is not None else {})}

    @staticmethod
    def _usage_metadata(out: RequestOutput, c: CompletionOutput) -> UsageMetadata:
        prompt, completion = len(out.prompt_token_ids), len(c.token_ids)
        return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)

    def _result(self, out: RequestOutput) -> ChatResult:
        generations = [
            ChatGeneration(
                message=AIMessage(content=c.text, usage_metadata=self._usage_metadata(out, c),
                                  response_metadata=self._metadata(out, c)),
                generation_info={"finish_reason": c.finish_reason},
            )
            for c in out.outputs
        ]
        return ChatResult(generations=generations, llm_output={"token_usage": _usage([out]), "model_name": self.model})

    def _chunk(self, out: RequestOutput) -> Optional[ChatGenerationChunk]:
        c = out.outputs[0]
        if out.finished:
            message = AIMessageChunk(content=c.text_delta, usage_metadata=self._usage_metadata(out, c),
                                     chunk_position="last")
            return ChatGenerationChunk(message=message, generation_info=self._metadata(out, c))
        if not c.text_delta and not c.token_ids_delta:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content=c.text_delta))

    def _request(self, messages: list[BaseMessage], stop, kwargs, streaming: bool):
        params = self._sampling_params(stop, kwargs, streaming)
        conversation = to_chat_messages(messages)
        engine = self.async_engine
        return lambda: engine.chat(conversation, params)

    def _generate(
        self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> ChatResult:
        final = None
        for out in _iterate_sync(self._request(messages, stop, kwargs, streaming=False)):
            final = out
        return self._result(final)

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> ChatResult:
        final = None
        async with contextlib.aclosing(self._request(messages, stop, kwargs, streaming=False)()) as outputs:
            async for out in outputs:
                final = out
        return self._result(final)

    def _stream(
        self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel reports each chunk to the callbacks itself (it calls _stream without a run_manager).
        for out in _iterate_sync(self._request(messages, stop, kwargs, streaming=True)):
            chunk = self._chunk(out)
            if chunk is not None:
                if run_manager is not None:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async with contextlib.aclosing(self._request(messages, stop, kwargs, streaming=True)()) as outputs:
            async for out in outputs:
                chunk = self._chunk(out)
                if chunk is not None:
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

"""LangChain adapters: `PagedBackendLLM` (a `BaseLLM`) and `ChatPagedBackend` (a `BaseChatModel`).

    from paged_backend.adapters.langchain import PagedBackendLLM, ChatPagedBackend
    llm = PagedBackendLLM(model="smollm2-135m-instruct", temperature=0, max_tokens=64)
    chain = PromptTemplate.from_template("Q: {q}\\nA:") | llm | StrOutputParser()
    chat = ChatPagedBackend(model="smollm2-135m-instruct")    # the same engine: same engine arguments
    llm.close(); chat.close()                                   # or just drop them

Design: ONE `AsyncLLM` backs every call of an adapter, and adapters made with the same engine
arguments share it (reference counted: it is shut down when the last adapter using it is closed or
garbage-collected; `async_engine=` runs on an engine someone else owns). Every request goes to that
engine concurrently, so whatever runs at the same time shares the engine's batches (continuous batching):
- `_generate` (sync) submits all prompts at once and waits for all of them; `.batch(...)` of a
  chain therefore reaches the engine as one batch. Sync calls use AsyncLLM's blocking iterators
  (no event loop), so they work from any thread, including one running an event loop (notebooks).
- `_agenerate` / `_astream` run on the caller's own event loop.
- `_stream` / `_astream` yield one chunk per engine output (one token per step), built from the
  engine's `text_delta`s, so the chunks concatenate exactly to the final text.
Cancelling a call (closing a stream early, cancelling a task) aborts its engine requests.

The engine arguments and sampling defaults are the fields of `EngineArgs` and `SamplingParams`
(the engine's `seed` is `engine_seed` here: `seed` is the sampling seed); each sampling field can be
overridden per call as a keyword. Only `paged_backend`'s public names are used.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Annotated, Any, AsyncIterator, Iterator, Optional

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
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, model_validator

from paged_backend import (
    LLM, AsyncLLM, CompletionOutput, EngineArgs, RequestOutput, SamplingParams, ToolCalling, ToolCallStream,
)

from .langchain_tools import ToolCallingChatMixin, chunk_message, message_dict, reply_message, tool_calling_from

__all__ = ["PagedBackendLLM", "ChatPagedBackend"]

_ENGINE_RENAMED = {"seed": "engine_seed"}  # SamplingParams.seed keeps the name `seed`
_SAMPLING_DEFAULTS = {"max_tokens": 256}  # room for an answer (SamplingParams' own default is 16)
_IGNORED_KWARGS = ("stream",)  # BaseChatModel passes stream=True through to _stream


def _fields(model: type[BaseModel], skip: set[str], rename: dict[str, str], defaults: dict[str, Any]) -> dict:
    """The fields of `model` (types, constraints, defaults, descriptions) for create_model."""
    out = {}
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        default = defaults.get(name, info.default)
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        out[rename.get(name, name)] = (annotation, Field(default, description=info.description))
    return out


_EngineFields = create_model("_EngineFields", **_fields(EngineArgs, {"model"}, _ENGINE_RENAMED, {}))
_SamplingFields = create_model("_SamplingFields", **_fields(SamplingParams, {"stop"}, {}, _SAMPLING_DEFAULTS))
_ENGINE_FIELDS = {name: _ENGINE_RENAMED.get(name, name) for name in EngineArgs.model_fields if name != "model"}
_SAMPLING_FIELDS = tuple(_SamplingFields.model_fields)


# ---- engines shared between adapters ------------------------------------------------------------
class _Lease:
    """An adapter's hold on a shared engine (copies of the adapter share it). Dropping the last
    reference to it releases the hold; the engine stops when no lease on it is left."""

    def __init__(self, engine: AsyncLLM, key: str):
        self.engine = engine
        weakref.finalize(self, _SHARED.release, key)


class _SharedEngines:
    """One AsyncLLM per distinct EngineArgs, with the number of live leases on it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._engines: dict[str, tuple[AsyncLLM, int]] = {}

    def acquire(self, args: EngineArgs) -> _Lease:
        key = args.model_dump_json()
        with self._lock:  # held while an engine loads, so that two adapters never load the same one twice
            engine, count = self._engines.get(key) or (AsyncLLM(**args.model_dump()), 0)
            self._engines[key] = (engine, count + 1)
        return _Lease(engine, key)

    def release(self, key: str) -> None:
        with self._lock:
            engine, count = self._engines[key]
            if count > 1:
                self._engines[key] = (engine, count - 1)
                return
            del self._engines[key]
        engine.shutdown()

    def __len__(self) -> int:
        return len(self._engines)


_SHARED = _SharedEngines()


# ---- shared fields and helpers ------------------------------------------------------------------
class _PagedBackendBase(_EngineFields, _SamplingFields):
    """Engine arguments, sampling defaults and the engine itself, shared by both adapters."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: Optional[str] = None
    """Model name, local dir, .gguf file or bundled alias. Taken from `async_engine` when given."""
    async_engine: Optional[AsyncLLM] = Field(default=None, exclude=True)
    """An existing engine to run on (owned by the caller); if None, the shared engine for `model` and
    the engine fields."""
    stop: Optional[list[str]] = None
    """Stop strings; the `stop` of a call is added to these."""
    streaming: bool = False
    """Also report tokens through callbacks (`on_llm_new_token`) on invoke/generate."""
    max_prompts_per_call: Optional[int] = Field(None, ge=1)
    """Refuse a generate/batch call with more prompts than this (None: no limit)."""

    _lease: Optional[_Lease] = PrivateAttr(default=None)

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
            args = EngineArgs(model=self.model, **{name: getattr(self, f) for name, f in _ENGINE_FIELDS.items()})
            self._lease = _SHARED.acquire(args)
            self.async_engine = self._lease.engine
        elif self.model is None:
            self.model = self.async_engine.args.model
        return self

    @classmethod
    def from_engine(cls, engine: AsyncLLM, **fields: Any):
        """An adapter on an existing engine (shared with whoever else uses it)."""
        return cls(async_engine=engine, **fields)

    def close(self) -> None:
        """Let go of the engine: a shared one stops when no other adapter (or copy) uses it; one given
        as async_engine is left to its owner. This adapter cannot be called afterwards."""
        self.async_engine = None
        self._lease = None

    shutdown = close  # the name LLM and AsyncLLM use

    def _engine(self) -> AsyncLLM:
        if self.async_engine is None:
            raise RuntimeError(f"this {type(self).__name__} was closed; make a new one")
        return self.async_engine

    def _sampling_params(self, stop: Optional[list[str]], kwargs: dict[str, Any], streaming=False) -> SamplingParams:
        values = {f: getattr(self, f) for f in _SAMPLING_FIELDS}
        call = {k: v for k, v in kwargs.items() if k not in _IGNORED_KWARGS}
        call_stop = call.pop("stop", None)
        model = call.pop("model", None)
        if model is not None and model not in (self.model, self._engine().args.model):
            raise ValueError(f"model={model!r} was asked for, but this {type(self).__name__} serves {self.model!r}")
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
        return list(self._engine().get_tokenizer().encode(text, add_special_tokens=False))

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
        finals: list[Optional[RequestOutput]] = [None] * len(prompts)
        report = self.streaming and run_manager is not None and params.n == 1
        if not report:
            params.output_kind = "final_only"  # only the finished outputs are read
        outputs = self._engine().generate_many_sync(prompts, params, max_prompts=self.max_prompts_per_call)
        with contextlib.closing(outputs):  # an error here aborts the requests at once
            for i, out in outputs:
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
        if not report:
            params.output_kind = "final_only"  # only the finished outputs are read
        outputs = self._engine().generate_many(prompts, params, max_prompts=self.max_prompts_per_call)
        async with contextlib.aclosing(outputs):
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
        with contextlib.closing(self._engine().generate_many_sync([prompt], params)) as outputs:
            for _, out in outputs:
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
        async with contextlib.aclosing(self._engine().generate(prompt, params)) as outputs:
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
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
            continue  # an AIMessage's tool calls travel in its tool_calls (message_dict)
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
        converted.append(message_dict(m, d))
    return converted


class ChatPagedBackend(ToolCallingChatMixin, _PagedBackendBase, BaseChatModel):
    """A LangChain chat model on the paged-backend engine; messages go through the model's own chat
    template. bind_tools / with_structured_output: adapters/langchain_tools.py."""

    @property
    def _llm_type(self) -> str:
        return "paged-backend-chat"

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools=None) -> int:
        """Prompt tokens as the engine will see them (the chat template applied)."""
        tok = self._engine().get_tokenizer()
        text = tok.apply_chat_template(to_chat_messages(messages), tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def _metadata(self, out: RequestOutput, c: CompletionOutput) -> dict[str, Any]:
        return {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "model_name": self.model,
                "model_provider": "paged_backend", **({"logprobs": c.logprobs} if c.logprobs is not None else {})}

    @staticmethod
    def _usage_metadata(out: RequestOutput, c: CompletionOutput) -> UsageMetadata:
        prompt, completion = len(out.prompt_token_ids), len(c.token_ids)
        return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)

    def _result(self, out: RequestOutput, calling: Optional[ToolCalling] = None) -> ChatResult:
        generations = []
        for c in out.outputs:
            message = reply_message(c.text, calling, usage_metadata=self._usage_metadata(out, c))
            finish = "tool_calls" if message.tool_calls else c.finish_reason
            message.response_metadata = {**self._metadata(out, c), "finish_reason": finish}
            generations.append(ChatGeneration(message=message, generation_info={"finish_reason": finish}))
        return ChatResult(generations=generations, llm_output={"token_usage": _usage([out]), "model_name": self.model})

    def _chunk(self, out: RequestOutput, tools: Optional[ToolCallStream] = None) -> Optional[ChatGenerationChunk]:
        c = out.outputs[0]
        content, calls = c.text_delta, []
        if tools is not None:  # text that may start a tool call is held back; calls come as chunks
            content, calls = tools.feed(c.text_delta)
            if out.finished:
                more, more_calls = tools.finish()
                content, calls = content + more, calls + more_calls
        if out.finished:
            message = chunk_message(content, calls, usage_metadata=self._usage_metadata(out, c),
                                    chunk_position="last")
            info = self._metadata(out, c)
            if tools is not None and tools.num_calls:
                info["finish_reason"] = "tool_calls"
            return ChatGenerationChunk(message=message, generation_info=info)
        if not content and not calls and (tools is not None or not c.token_ids_delta):
            return None
        return ChatGenerationChunk(message=chunk_message(content, calls))

    def _request(self, messages: list[BaseMessage], stop, kwargs, streaming: bool) -> tuple:
        """(chat arguments, the call's ToolCalling or None: tools bound with bind_tools)."""
        calling = tool_calling_from(kwargs, self._engine().get_tokenizer().chat_template)
        params = self._sampling_params(stop, kwargs, streaming)
        if not streaming:
            params.output_kind = "final_only"  # only the last output is read: the engine builds no others
        conversation, tools = to_chat_messages(messages), None
        if calling is not None:
            conversation, tools = calling.prepare(conversation)
            if calling.forced:
                if params.structured_outputs is not None:
                    raise ValueError("a forced tool call cannot be combined with structured_outputs")
                params = params.model_copy(update={"structured_outputs": calling.structured})
        return {"messages": conversation, "sampling_params": params, "tools": tools}, calling

    def _generate(
        self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> ChatResult:
        final = None
        args, calling = self._request(messages, stop, kwargs, False)
        with contextlib.closing(self._engine().chat_sync(**args)) as outputs:
            for out in outputs:
                final = out
        return self._result(final, calling)

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> ChatResult:
        final = None
        args, calling = self._request(messages, stop, kwargs, False)
        async with contextlib.aclosing(self._engine().chat(**args)) as outputs:
            async for out in outputs:
                final = out
        return self._result(final, calling)

    def _stream(
        self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel reports each chunk to the callbacks itself (it calls _stream without a run_manager).
        args, calling = self._request(messages, stop, kwargs, True)
        tools = None if calling is None else ToolCallStream(calling)
        with contextlib.closing(self._engine().chat_sync(**args)) as outputs:
            for out in outputs:
                chunk = self._chunk(out, tools)
                if chunk is not None:
                    if run_manager is not None:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

    async def _astream(
        self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        args, calling = self._request(messages, stop, kwargs, True)
        tools = None if calling is None else ToolCallStream(calling)
        async with contextlib.aclosing(self._engine().chat(**args)) as outputs:
            async for out in outputs:
                chunk = self._chunk(out, tools)
                if chunk is not None:
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

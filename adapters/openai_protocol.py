"""The OpenAI HTTP protocol as pydantic models: requests (with vLLM's sampling extras), responses,
errors, and the mapping of a request onto `SamplingParams`.

Framework-free on purpose: the BentoML service mounts the routes of `openai_server`, which use
these models; another framework could reuse both.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from paged_backend import SamplingParams, ToolCalling

from .openai_tools import merge_constraint, structured_from_fields, tool_calling


# ---- errors ---------------------------------------------------------------------------------
class APIError(Exception):
    """An error the client caused (or could act on), rendered in OpenAI's error format."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_validation(cls, e: ValidationError, prefix: str = "") -> "APIError":
        parts, param = [], None
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
            param = param or (prefix + loc if loc else None)
            msg = err.get("msg", "invalid value")
            parts.append(f"{prefix}{loc}: {msg}" if loc else msg)
        return cls("; ".join(parts) or str(e), param=param)


# ---- what the server refuses ------------------------------------------------------------------
# Request fields (OpenAI's or vLLM's) that would change the output and that this server does not
# implement: a request that sets one (to anything but its "off" value) gets a 400 naming it, never a
# silent 200 that ignored it. The one list; remove a name here when it gets implemented.
UNSUPPORTED_FIELDS = frozenset({
    "guided_decoding_backend", "guided_whitespace_pattern",
    "functions", "function_call", "bad_words", "logits_processors",
    "priority", "prompt_logprobs", "truncate_prompt_tokens", "use_beam_search", "length_penalty",
    "chat_template_kwargs", "documents", "suffix",
    # A Jinja template from the client would run on the server (vLLM refuses it too unless told to).
    "chat_template",
})
# Values of those fields that mean "not used" (OpenAI clients send some of them by default).
_OFF_VALUES = {"priority": (0,)}

MAX_JSON_DEPTH = 32  # real requests nest 4-5 levels (messages / content parts / logit_bias)


def check_body(body: Any) -> None:
    """Refuses, with a 400 naming the place: JSON nested deeper than MAX_JSON_DEPTH, strings that
    are not valid Unicode (lone surrogates, which the tokenizer cannot encode), and the fields of
    UNSUPPORTED_FIELDS. One iterative walk, so no depth can overflow the stack here."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    for name in sorted(UNSUPPORTED_FIELDS & body.keys()):
        value = body[name]
        if value in (None, False, "", [], {}) or value in _OFF_VALUES.get(name, ()):
            continue
        raise APIError(f"{name} is not supported by this server (the request would have been answered "
                       f"without it); remove the field", param=name, code="unsupported_field")
    todo: list[tuple[Any, str, int]] = [(body, "", 0)]
    while todo:
        value, where, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep (at {where})",
                           param=where.split(".")[0] or None)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(f"{where or 'the body'} is not valid Unicode: a lone surrogate "
                               f"{value[e.start]!r} at character {e.start}",
                               param=where.split(".")[0] or None) from None
        elif isinstance(value, dict):
            todo.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items())
            todo.extend((k, where or "the body", depth + 1) for k in value if isinstance(k, str))
        elif isinstance(value, list):
            todo.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))


# ---- requests -------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI clients add new ones
    over time; fields that would change the output but are not implemented are refused (check_body)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = Field(1, ge=1, le=128)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)  # as SamplingParams: a non-negative int64
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None  # token id (a JSON key, so a string) -> bias in [-100, 100]
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None
    allowed_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # output constraints (adapters/openai_tools.py): OpenAI's response_format and vLLM's fields
    response_format: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[dict[str, Any], str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structured_outputs: Optional[dict[str, Any]] = None

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int], calling=None) -> SamplingParams:
        given = {
            "n": self.n, "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "stop": self.stop, "seed": self.seed, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens, "stop_token_ids": self.stop_token_ids, "logprobs": logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "logit_bias": self.logit_bias or None, "allowed_token_ids": self.allowed_token_ids,
        }
        kept = {k: v for k, v in given.items() if v is not None or k == "max_tokens"}
        try:
            kept["structured_outputs"] = merge_constraint(structured_from_fields(self.__dict__), calling)
            return SamplingParams(**kept)
        except ValidationError as e:
            raise APIError.from_validation(e) from None
        except ValueError as e:
            raise APIError(str(e)) from None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1)
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: only text is understood by a text model
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(f"message content part of type {part.get('type')!r} is not supported; "
                                   "only {'type': 'text', 'text': ...} parts are", param="messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        msg: dict[str, Any] = {"role": self.role, "content": content}
        if self.name:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def tool_calling(self, chat_template: Optional[str]) -> Optional[ToolCalling]:
        try:
            return tool_calling(self.__dict__, chat_template)
        except ValueError as e:
            raise APIError(str(e), param="tools") from None

    def to_sampling_params(self, calling: Optional[ToolCalling] = None) -> SamplingParams:
        k = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(self.max_completion_tokens or self.max_tokens, k, calling)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _check(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs (prompt logprobs) is not supported by this server")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            out: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = list(p)
        if not out or any(len(x) == 0 for x in out):
            raise APIError("prompt must be a non-empty string, a list of them, or non-empty token id lists",
                           param="prompt")
        return out

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs)


def parse_request(cls: type[BaseModel], body: Any) -> Any:
    check_body(body)
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise APIError.from_validation(e) from None


# ---- responses ------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    """Also each streamed chunk (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "paged-backend"
    root: Optional[str] = None  # the served name: where the weights came from is the operator's business
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- /tokenize and /detokenize (vLLM's shapes) ---------------------------------------------------
class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the chat template writes them
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- logprobs -------------------------------------------------------------------------------
class LogprobFormatter:
    """Per-token logprob dicts (id -> logprob, the sampled id included) in OpenAI's two shapes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def token(self, tid: int) -> str:
        s = self._cache.get(tid)
        if s is None:
            s = self._cache[tid] = self.tokenizer.decode([tid])
        return s

    @staticmethod
    def _top(lps: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(lps.items(), key=lambda kv: -kv[1])[:k]

    def chat(self, ids: list[int], lps: list[dict[int, float]], k: int) -> dict[str, Any]:
        content = []
        for tid, d in zip(ids, lps):
            s = self.token(tid)
            content.append({
                "token": s, "logprob": d.get(tid, float("-inf")), "bytes": list(s.encode("utf-8")),
                "top_logprobs": [{"token": self.token(t), "logprob": lp, "bytes": list(self.token(t).encode("utf-8"))}
                                 for t, lp in self._top(d, k)],
            })
        return {"content": content}

    def completion(self, ids: list[int], lps: list[dict[int, float]], k: int, offset: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, d in zip(ids, lps):
            s = self.token(tid)
            tokens.append(s)
            token_lps.append(d.get(tid, float("-inf")))
            tops.append({self.token(t): lp for t, lp in self._top(d, k)})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

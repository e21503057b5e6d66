"""What comes out of a request: completions, their logprobs, timing metrics."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "abort"]
_set = object.__setattr__


def trusted(cls: type[BaseModel], **values):
    """cls.model_construct(**values) for the engine's own, already valid values naming every field of cls:
    the instance pydantic's model_construct makes (its __dict__, the fields set, no extra or private
    values) without model_construct's per-field loop, 3-4x faster. The engine builds one to three of
    these per streamed request per step, hundreds per step when it serves hundreds of streams."""
    obj = cls.__new__(cls)
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", set(values))
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


class RequestMetrics(BaseModel):
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    inter_token_latencies: list[float] = Field(default_factory=list)

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


class CompletionOutput(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[dict[int, float]]] = None  # per generated token: top-k ids -> logprob (+ the sampled one)
    finish_reason: Optional[FinishReason] = None
    stop_reason: Union[int, str, None] = None  # the stop string or stop token id that ended it
    # Streaming deltas (AsyncLLM): what was added since the previous yield for this request.
    text_delta: str = ""
    token_ids_delta: list[int] = Field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput(BaseModel):
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0

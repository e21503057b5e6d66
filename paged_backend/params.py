"""What goes into a request: sampling parameters, validated, with vLLM's defaults and meanings."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from paged_backend.structured.spec import StructuredOutputs


class SamplingParams(BaseModel):
    """How to sample one request's completions.

    temperature 0 means greedy. top_k -1 (or 0) and top_p 1 and min_p 0 disable those filters.
    Penalties follow vLLM: repetition_penalty (1 = off) divides positive / multiplies negative logits
    of every token seen in prompt or output; presence/frequency penalties subtract from the logits
    of tokens in the output so far.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    n: int = Field(1, ge=1, description="number of completions for the prompt")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: all tokens")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    max_tokens: Optional[int] = Field(16, ge=1, description="None: up to max_model_len")
    min_tokens: int = Field(0, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    seed: Optional[int] = Field(None, ge=0, lt=2**63, description="per-request random stream; 0 <= seed < 2**63")
    logprobs: Optional[int] = Field(None, ge=0, le=20, description="top-k logprobs per generated token")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = Field(
        None, description="token id -> bias in [-100, 100] added to its logit before sampling (OpenAI's logit_bias)"
    )
    allowed_token_ids: Optional[list[int]] = Field(
        None, description="sample only from these token ids (vLLM's allowed_token_ids)"
    )
    output_kind: Literal["cumulative", "delta", "final_only"] = Field(
        "cumulative",
        description="what each streamed output of the request carries (vLLM's RequestOutputKind): cumulative, "
        "the text, token_ids and logprobs so far (and their deltas); delta, only what is new since the previous "
        "output, in text / token_ids / logprobs and in the delta fields (a stream of many long completions then "
        "costs the engine no copy of what came before); final_only, one output when the request ends",
    )
    structured_outputs: Optional[StructuredOutputs] = Field(
        None,
        description="constrain the output (grammar-guided decoding with xgrammar): one of json (a JSON schema "
        "dict or a pydantic model class), json_object, regex, choice, grammar (EBNF); e.g. "
        "{'json': MyModel} or {'choice': ['yes', 'no']}",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return v
        if isinstance(v, str):
            if not v:
                raise ValueError("stop must not be an empty string")
            return v
        if isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
            if any(not s for s in v):
                raise ValueError("stop strings must not be empty")
            return list(v)
        raise ValueError(f"stop must be a str or a list of str, got {type(v).__name__}: {v!r}")

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _check_stop_ids(cls, v):
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in v):
            raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {v!r}")
        return list(v)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, v):
        if v is None:
            return v
        if not isinstance(v, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(v).__name__}")
        out = {}
        for k, b in v.items():
            try:  # OpenAI clients send the ids as JSON object keys, i.e. strings
                tid = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias key {k!r} is not a token id") from None
            if tid < 0 or isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise ValueError(f"logit_bias[{k!r}] = {b!r}: token ids must be >= 0 and biases numbers in [-100, 100]")
            out[tid] = float(b)
        return out

    @field_validator("allowed_token_ids", mode="before")
    @classmethod
    def _check_allowed(cls, v):
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or not v or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v
        ):
            raise ValueError(f"allowed_token_ids must be a non-empty list of non-negative ints, got {v!r}")
        return list(v)

    def check_token_ids(self, vocab_size: int) -> None:
        """ValueError if a token id this request names is not in the model's vocabulary."""
        for name, ids in (("logit_bias", self.logit_bias or ()), ("allowed_token_ids", self.allowed_token_ids or ())):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name} names token id {bad[0]}, outside the model's vocabulary (0..{vocab_size - 1})")

    @model_validator(mode="after")
    def _check_ranges(self):
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is larger than max_tokens={self.max_tokens}")
        return self

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def coerce_params(params) -> SamplingParams:
    """None, a SamplingParams or a dict of its fields -> SamplingParams."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams(**params)
    raise TypeError(f"sampling_params must be SamplingParams or a dict, got {type(params).__name__}")

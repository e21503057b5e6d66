"""What a constrained request asks for: a JSON schema, any JSON object, a regex, a choice or a grammar.

``StructuredOutputs`` is the value of ``SamplingParams.structured_outputs`` (vLLM's name and
meaning). Exactly one of its fields is set. A pydantic model class given as ``json`` is turned into
its JSON schema here, so everything downstream (cache keys, serialisation) sees plain data.
"""

from __future__ import annotations

import json as _json
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic.dataclasses import dataclass

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


# A pydantic dataclass, not a BaseModel: a BaseModel field named `json` would shadow BaseModel.json.
@dataclass(frozen=True, config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class StructuredOutputs:
    """Constrain a request's output; set exactly one field.

    json: a JSON schema (dict, JSON string, or a pydantic model class) the output must validate
        against. json_object: True for any JSON object. regex: the output fully matches it.
    choice: the output is exactly one of these strings. grammar: an EBNF / GBNF grammar
        (llama.cpp syntax, root rule ``root``) the output must derive.
    """

    json: Any = None
    json_object: Optional[bool] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None

    @field_validator("json", mode="before")
    @classmethod
    def _schema_of_model_class(cls, value: Any) -> Any:
        if isinstance(value, type):
            if not issubclass(value, BaseModel):
                raise ValueError(f"structured_outputs.json must be a JSON schema or a pydantic model class, got {value!r}")
            return value.model_json_schema()
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> "StructuredOutputs":
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs takes exactly one of {', '.join(_KINDS)}; got {given or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", _json.loads(self.json))
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(self.json).__name__}")
        if self.choice is not None and (not self.choice or any(not c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if self.regex == "" or self.grammar == "":
            raise ValueError(f"structured_outputs.{self.kind} must not be empty")
        return self

    def check(self) -> "StructuredOutputs":
        """Raise ValueError now if the spec does not convert to a grammar (the engine's add_request
        does the same; this lets a caller name its own field in the error)."""
        from paged_backend.structured.compiler import build_grammar  # (compiler imports this module)

        build_grammar(self)
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """Equal for requests that compile to the same grammar (the compile cache's key)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind in ("json", "choice"):
            return kind, _json.dumps(value, ensure_ascii=False)
        return kind, "" if kind == "json_object" else value

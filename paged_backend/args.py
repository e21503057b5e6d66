"""Engine construction arguments (the `LLM(...)` keyword arguments), validated."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class EngineArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True)

    # A name/path, or an already-loaded transformers causal LM (run in place, through transformers' code).
    model: Union[str, Any]
    # A name/path, or a transformers tokenizer object.
    tokenizer: Union[str, Any, None] = None
    model_impl: Literal["auto", "native", "transformers"] = Field(
        "auto", description="native model code, transformers' modeling code with paged attention, or auto: "
        "native where there is one"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    max_model_len: Optional[int] = Field(None, ge=1)
    block_size: int = Field(16, ge=1, le=256)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    kv_cache_memory: Optional[int] = Field(None, ge=1, description="bytes for the KV cache (CPU default 2 GiB)")
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: Optional[int] = Field(None, ge=1)
    enable_prefix_caching: bool = True
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = "auto"
    seed: int = 0
    enforce_eager: bool = Field(False, description="no CUDA graphs for decode steps (CUDA only)")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs (CPU: gloo processes) one model is split across; one process per rank"
    )
    quantization: Optional[Literal["fp8"]] = Field(
        None,
        description="fp8: linear weights as float8_e4m3fn with per-output-channel scales, activations "
        "scaled per token (quantized at load; FP8 checkpoints select it by themselves)",
    )
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto",
        description="fp8: the KV cache as float8_e4m3fn with per-layer K and V scales (the checkpoint's, "
        "else 1.0); auto: the model's dtype",
    )

    @field_validator("model")
    @classmethod
    def _model_kind(cls, v):
        if isinstance(v, str) or (hasattr(v, "config") and hasattr(v, "base_model") and callable(v)):
            return v
        raise ValueError(
            f"model must be a name/path or a transformers PreTrainedModel (a causal LM); got {type(v).__name__}"
        )

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_kind(cls, v):
        if v is None or isinstance(v, str) or (hasattr(v, "encode") and hasattr(v, "decode")):
            return v
        raise ValueError(f"tokenizer must be a name/path or a transformers tokenizer; got {type(v).__name__}")

    @property
    def model_name(self) -> str:
        """The model as a display name (a model object's name_or_path or class)."""
        if isinstance(self.model, str):
            return self.model
        return getattr(self.model, "name_or_path", None) or type(self.model).__name__

"""Engine construction arguments (the `LLM(...)` keyword arguments), validated."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class EngineArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    tokenizer: Optional[str] = None
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

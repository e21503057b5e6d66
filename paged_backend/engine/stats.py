"""A snapshot of the engine's counters and KV-cache use (what `LLM.stats()` returns)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class EngineStats:
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int
    num_blocks_cached: int
    num_running: int
    num_waiting: int
    kv_slots_allocated: int  # slots in blocks that are in use
    kv_slots_holding_tokens: int  # of which hold a computed token (allocated - holding = waste)
    prefix_cache_hit_rate: float
    prefix_cache_hit_tokens: int
    num_preemptions: int
    num_steps: int
    max_seqs_in_step: int  # the largest batch one forward pass has carried
    total_prompt_tokens: int
    total_generated_tokens: int
    quantization: Optional[str] = None  # "fp8": float8_e4m3fn linear weights
    kv_cache_dtype: str = ""  # e.g. "bfloat16", "float8_e4m3fn"
    weight_bytes: int = 0  # model parameters as stored
    kv_bytes_per_token: int = 0  # K and V of one token, all layers

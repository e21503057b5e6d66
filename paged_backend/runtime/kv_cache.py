"""How many KV blocks fit, and the cache tensors themselves.

On CUDA the budget is gpu_memory_utilization of the card minus what the weights and the largest
forward pass (measured by a profiling run) take; on CPU it is kv_cache_memory bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger("paged_backend")

DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def allocate(self, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
        shape = (num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim)
        return [torch.empty(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]


def num_blocks_for_bytes(spec: KVCacheSpec, budget_bytes: int) -> int:
    return max(0, budget_bytes // spec.bytes_per_block)


def cuda_kv_budget(device: torch.device, gpu_memory_utilization: float, profile) -> int:
    """Bytes left for the KV cache after running `profile()` (a forward pass at the largest batch)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    # Memory held by other processes/contexts counts against us too.
    used_elsewhere = total - free - torch.cuda.memory_reserved(device)
    budget = int(total * gpu_memory_utilization) - peak - max(0, used_elsewhere)
    torch.cuda.empty_cache()
    return budget


def check_fits(spec: KVCacheSpec, num_blocks: int, max_model_len: int, where: str) -> None:
    tokens = num_blocks * spec.block_size
    if tokens < max_model_len:
        need = -(-max_model_len // spec.block_size) * spec.bytes_per_block
        raise ValueError(
            f"The KV cache holds {tokens} tokens ({num_blocks} blocks of {spec.block_size}) but "
            f"max_model_len={max_model_len} needs at least {need / 2**20:.1f} MiB for one sequence. "
            f"Lower max_model_len or give the cache more memory ({where})."
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB); up to %.1f sequences of max_model_len=%d",
        num_blocks, spec.block_size, tokens, num_blocks * spec.bytes_per_block / 2**20,
        tokens / max_model_len, max_model_len,
    )

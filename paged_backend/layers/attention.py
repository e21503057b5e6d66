"""Paged attention as a model layer: store this step's K/V into the paged cache, attend over it.

The runner builds one `AttentionMetadata` per step (one varlen batch for prefill, chunked prefill
and decode alike) and binds each layer's cache tensor once at start-up (`Attention.kv_cache`).
The layer knows nothing about requests; it only computes on the tensors it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paged_backend import kernels


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, -1 = do not store
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step (cached + new)
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative new-token counts
    max_query_len: int
    max_seq_len: int
    plan: object | None = None  # kernels.plan_step of these tensors (CPU): the per-step index work, once
    num_decodes: int = 0  # leading sequences with one new token (kernels.paged_attention); 0: not known


class Attention(nn.Module):
    """Attention over the paged KV cache of one layer (heads already projected and roped)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window, self.softcap = scale, sliding_window, softcap
        self.kv_cache: torch.Tensor | None = None  # [num_blocks, 2, block_size, Hkv, D], bound by the runner
        # An fp8 cache holds K / k_scale and V / v_scale: fixed floats (the checkpoint's, else 1.0), so
        # every request sees the same arithmetic and CUDA graphs capture them as constants.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq*D], k/v [T, Hkv*D] -> [T, Hq*D]."""
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound: the model runner must allocate caches before forward")
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        kernels.store_kv(
            k, v, self.kv_cache, meta.slot_mapping, k_scale=self.k_scale, v_scale=self.v_scale, plan=meta.plan
        )
        out = kernels.paged_attention(
            q,
            self.kv_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            plan=meta.plan,
            num_decodes=meta.num_decodes,
        )
        return out.view(t, self.num_heads * self.head_dim)

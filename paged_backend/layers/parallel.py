"""Megatron-style tensor-parallel layers: each rank holds a slice of a projection and one collective
joins the slices.

- column-parallel (fused q/k/v by heads, fused gate/up): each rank computes its own output rows; no
  communication, the next layer consumes the slice as it is;
- row-parallel (o_proj, down_proj): each rank multiplies its slice of the input features, one
  all-reduce sums the partial products, the bias is added once after it;
- vocab-parallel embedding and LM head: each rank holds a contiguous range of the (padded) vocab;
  the embedding masks ids outside its range and all-reduces, the LM head's logits are gathered to
  rank 0, where the sampler runs.

With one rank every layer is exactly the single-device layer it extends (Linear, nn.Embedding,
MergedLinear) and no collective is issued. Checkpoint tensors arrive whole-shaped (a torch tensor or a
lazy slice of a file with `.shape` and `.narrow`); `shard_of` cuts out this rank's part, so a rank
reads only its own rows/columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from paged_backend import kernels
from paged_backend.layers.linear import Linear, MergedLinear


def materialize(weight) -> torch.Tensor:
    """A checkpoint tensor or lazy file slice as a torch tensor (lazy slices read their bytes now)."""
    return weight if isinstance(weight, torch.Tensor) else weight.narrow(0, 0, weight.shape[0])


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group and the collectives the layers issue.

    `group` is the torch.distributed process group of the tensors (NCCL on CUDA, gloo on CPU); None
    with one rank. `peer`: the engine's all-reduce over NVLink peer memory (runtime/peer_memory.py:
    `fits(x)`, `all_reduce(x)` -> a new tensor) where every rank can run it, else None. Passed
    explicitly to every parallel layer: no process-global TP state."""

    rank: int = 0
    size: int = 1
    group: Any = None
    peer: Any = None

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal part of `total` items; ValueError if they do not divide."""
        if total % self.size:
            raise ValueError(
                f"tensor_parallel_size={self.size} does not divide {what}={total}; choose a size that divides it"
            )
        part = total // self.size
        return self.rank * part, part

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks: in place through NCCL/gloo, or a new tensor from peer memory
        (callers use the return value)."""
        if self.size > 1:
            if self.peer is not None and self.peer.fits(x):
                return self.peer.all_reduce(x)
            dist.all_reduce(x, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (in place)."""
        if self.size > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.group, 0), group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's x concatenated along the last dim; other ranks: None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None


SINGLE = TPGroup()


def qkv_slices(tp: TPGroup, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, tuple[int, int]]:
    """This rank's rows of q, k and v: num_heads / tp query heads; num_kv_heads / tp KV heads, or,
    when there are fewer KV heads than ranks, the one KV head its query heads read (replicated on
    tp / num_kv_heads ranks)."""
    q_start, q_heads = tp.split(num_heads, "num_attention_heads")
    if num_kv_heads >= tp.size:
        kv_start, kv_heads = tp.split(num_kv_heads, "num_key_value_heads")
    else:
        if tp.size % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size={tp.size} is larger than num_key_value_heads={num_kv_heads} and not a "
                "multiple of it: KV heads can only be replicated evenly; choose a size that divides or is a "
                "multiple of the KV head count"
            )
        kv_start, kv_heads = tp.rank * num_kv_heads // tp.size, 1
    return {
        "q": (q_start * head_dim, q_heads * head_dim),
        "k": (kv_start * head_dim, kv_heads * head_dim),
        "v": (kv_start * head_dim, kv_heads * head_dim),
    }


def even_slices(tp: TPGroup, sizes: dict[str, int], what: str) -> dict[str, tuple[int, int]]:
    return {name: tp.split(size, what) for name, size in sizes.items()}


def local_kv_heads(tp: TPGroup, num_heads: int, num_kv_heads: int) -> int:
    return qkv_slices(tp, num_heads, num_kv_heads, 1)["k"][1]


class MergedColumnParallelLinear(MergedLinear):
    """Fused projections (q/k/v, gate/up), each cut to this rank's rows: slices maps a shard name
    to (first row in the checkpoint tensor, number of rows)."""

    def __init__(self, in_features: int, slices: dict[str, tuple[int, int]], bias: bool = False):
        super().__init__(in_features, {name: rows for name, (_, rows) in slices.items()}, bias=bias)
        self.slices = dict(slices)

    def load_shard(self, param_name: str, shard: str, tensor) -> None:
        start, rows = self.slices[shard]
        super().load_shard(param_name, shard, tensor.narrow(0, start, rows))


class RowParallelLinear(Linear):
    """y = all_reduce(x_r @ W_r^T) + b: x_r is this rank's slice of the input features (the output
    of a column-parallel layer), W_r the matching columns of the weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE):
        self.in_start, local_in = tp.split(in_features, "the input features of a row-parallel projection")
        super().__init__(local_in, out_features, bias=bias)
        self.tp = tp

    def shard_of(self, param_name: str, weight) -> torch.Tensor:
        if param_name == "weight":
            return weight.narrow(1, self.in_start, self.in_features)
        return materialize(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        y = self.tp.all_reduce(kernels.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


def _vocab_range(tp: TPGroup, vocab_size: int) -> tuple[int, int]:
    """(start, rows) of this rank's part of the vocab padded up to a multiple of the rank count;
    padding rows are zero in the embedding and their logits are dropped after the gather."""
    padded = -(-vocab_size // tp.size) * tp.size
    return tp.split(padded, "the padded vocab")


def _vocab_rows(weight, start: int, rows: int, vocab_size: int) -> torch.Tensor:
    real = max(0, min(rows, vocab_size - start))
    part = materialize(weight.narrow(0, start, real))
    return F.pad(part, (0, 0, 0, rows - real)) if real < rows else part


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE):
        self.vocab_start, rows = _vocab_range(tp, vocab_size)
        super().__init__(rows, hidden_size)
        self.vocab_size, self.tp = vocab_size, tp

    def shard_of(self, param_name: str, weight) -> torch.Tensor:
        return _vocab_rows(weight, self.vocab_start, self.num_embeddings, self.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        # Ids of other ranks look up row 0 and are zeroed: no data-dependent shapes (CUDA-graph safe).
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.masked_fill(~mine, 0), self.weight)
        return self.tp.all_reduce(out * mine.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(Linear):
    """The LM head over this rank's vocab range; `gather` assembles full logits on rank 0."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup = SINGLE):
        self.vocab_start, rows = _vocab_range(tp, vocab_size)
        super().__init__(hidden_size, rows, bias=False)
        self.vocab_size, self.tp = vocab_size, tp

    def shard_of(self, param_name: str, weight) -> torch.Tensor:
        return _vocab_rows(weight, self.vocab_start, self.out_features, self.vocab_size)

    def gather(self, logits: torch.Tensor) -> torch.Tensor | None:
        """[N, local vocab] on every rank -> [N, vocab] on rank 0 (None elsewhere)."""
        full = self.tp.gather_last_dim(logits)
        return full if full is None or full.shape[-1] == self.vocab_size else full[..., : self.vocab_size]

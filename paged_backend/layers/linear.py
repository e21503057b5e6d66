"""A linear layer that computes several projections of one input with one matmul (fused q/k/v, gate/up)."""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """nn.Linear whose output rows are the concatenation of named shards, e.g. {"q": .., "k": .., "v": ..}.

    Checkpoints store the shards as separate tensors; `load_shard` copies one into its rows.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in self.shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size

    def load_shard(self, param_name: str, shard: str, tensor: torch.Tensor) -> None:
        param = getattr(self, param_name)
        offset, size = self.shard_offsets[shard], self.shard_sizes[shard]
        target = param.data.narrow(0, offset, size)
        if tensor.shape != target.shape:
            raise ValueError(
                f"shard {shard!r} of {param_name}: checkpoint shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(tensor)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The output of forward split back into its shards, in order."""
        return out.split(list(self.shard_sizes.values()), dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shards={self.shard_sizes}"

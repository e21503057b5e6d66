"""The models' linear layers: nn.Linear through `kernels.linear`, and one that computes several
projections of one input with one matmul (fused q/k/v, gate/up)."""

from __future__ import annotations

import torch
from torch import nn

from paged_backend import kernels


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose matmul is `kernels.linear`: on the CPU the
    few rows of a decode step run the project's kernel, which reads the weights once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
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


def use_input_major_weights(model: nn.Module) -> int:
    """Store the fp32 CPU weights of every plain nn.Linear (transformers' own modules, when the model
    runs through the transformers wrapper; the project's `Linear` keeps its layout for its kernel) in
    input-major memory order (the transpose made contiguous, viewed back): same shape and values, so
    nothing else changes, but `F.linear` then hands MKL an untransposed [in, out] operand. For the few
    rows of a decode step (2-15 sequences) MKL's kernels for that layout are 1.3-3x faster on the
    model's shapes (the transposed one goes through a slow small-M path); from 16 rows both give
    bitwise the same results. Returns how many weights changed. Tied weights (an embedding shared with
    the LM head) change once: row lookups read the strided rows just as well."""
    changed = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        # (a tied weight is no longer contiguous once changed: the second module sharing it skips it)
        if isinstance(mod, nn.Linear) and not isinstance(mod, Linear) and w is not None \
                and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
            changed += 1
    return changed

"""FP8 (e4m3) weights: linear layers quantized at load with one scale per output channel, run with
dynamic per-token activation scales.

y = (x_q @ w_q^T) * x_scale[m] * w_scale[n], where x_q = x / x_scale (x_scale = amax of the token's row
/ 448) and w_q = w / w_scale (w_scale = amax of the output channel's row / 448), both float8_e4m3fn.
On CUDA the product runs on fp8 tensor cores with fp32 accumulation (`kernels.fp8_matmul`: our Triton
GEMM at decode batch sizes, cuBLAS's `torch._scaled_mm` above); on the CPU the same fp8 values are
widened to fp32 and multiplied there: the same quantization error, so CPU tests measure what the GPU
computes.

The LM head and the embeddings stay unquantized (as in vLLM): they are a small share of the bytes of
the models we serve and the most sensitive to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from paged_backend import kernels
from paged_backend.layers.parallel import RowParallelLinear, TPGroup

# x [M, K] -> (x_q float8_e4m3fn, scale [M, 1] fp32), x ~= x_q * scale: one kernel on CUDA, torch on CPU.
quantize_rows = kernels.quantize_fp8_rows


class Fp8Rows(NamedTuple):
    """Activations quantized per row (as `quantize_rows` does) by the kernel that produced them: a norm or
    gated activation whose one reader is an Fp8Linear (`fuse_fp8_inputs`) writes these instead of dtype
    values, and the linear skips its own quantization pass."""

    q: torch.Tensor  # [M, K] float8_e4m3fn
    scale: torch.Tensor  # [M, 1] fp32
    dtype: torch.dtype  # of the activations they stand for (the linear's output dtype)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


class Fp8Linear(nn.Module):
    """A linear layer with float8_e4m3fn weights [N, K] and per-output-channel fp32 scales [N].

    Built from a loaded nn.Linear (or MergedLinear: its shard layout and `split` carry over; or
    RowParallelLinear: under tensor parallelism its partial products are all-reduced, the bias added after)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 shard_sizes: dict[str, int] | None = None, row_parallel: TPGroup | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        # [1, N]: the layout kernels.fp8_matmul takes (a broadcast row of the product).
        self.weight_scale = nn.Parameter(weight_scale.reshape(1, -1).float().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.shard_sizes = shard_sizes
        self.row_parallel = row_parallel if row_parallel is not None and row_parallel.size > 1 else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        w_q, w_scale = quantize_rows(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data
        tp = linear.tp if isinstance(linear, RowParallelLinear) else None
        return cls(w_q, w_scale, bias, getattr(linear, "shard_sizes", None), tp)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        lead = x.shape[:-1]
        if isinstance(x, Fp8Rows):  # quantized by the kernel that produced them
            x_q, x_scale, dtype = x
        else:
            x_q, x_scale = quantize_rows(x.reshape(-1, self.in_features))
            dtype = x.dtype
        y = kernels.fp8_matmul(x_q, x_scale, self.weight, self.weight_scale, dtype)
        if self.row_parallel is not None:  # this rank's input features only: sum the ranks' products
            y = self.row_parallel.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The output split back into its shards (for a layer made from a MergedLinear)."""
        return out.split(list(self.shard_sizes.values()), dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3, per-channel scales"


def quantize_linears_fp8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear of a loaded model (except those named in `skip`) by an Fp8Linear, one at a
    time so the peak memory is the unquantized model plus one layer. Returns how many were replaced."""
    targets = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rpartition(".")[2] not in skip
    ]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear.from_linear(linear))
        linear.weight = None  # drop the unquantized copy now, not at the end of the walk
    return len(targets)


def fuse_fp8_inputs(model: nn.Module) -> int:
    """Where a model declares that a producer's output has one reader, a linear (a module's `fp8_feeds()`:
    (producer, linear) pairs), and that linear is an Fp8Linear, the producer (a norm or gated activation,
    `fp8_output`) quantizes its output in its own kernel: one pass over the activations instead of two.
    The same fp8 values and scales either way. Returns how many producers were switched."""
    switched = 0
    for module in model.modules():
        for producer, linear in module.fp8_feeds() if hasattr(module, "fp8_feeds") else ():
            if isinstance(linear, Fp8Linear) and hasattr(producer, "fp8_output"):
                producer.fp8_output = True
                switched += 1
    return switched


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored (fp8 weights count one byte each; tied ones once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total

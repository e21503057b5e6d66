"""``load_format="dummy"``: fill a model's own parameters with small random values in place."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, scale: float = 1e-3) -> None:
    """Fill every parameter: norm weights near 1 (1 ± scale), everything else uniform in ±scale.

    Realistic, non-zero data for benchmarks (no NaN/inf through deep stacks, softmax not
    degenerate), deterministic for a seed, generated on each parameter's own device.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise ValueError(f"parameter {name} is on the meta device; materialize the model first")
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(device=param.device)
            gen.manual_seed(seed)
        data = param.data
        if not data.is_floating_point():
            continue
        data.uniform_(-scale, scale, generator=gen)
        if _is_norm(name, param):
            data.add_(1.0)


def _is_norm(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 1 and "norm" in name.lower() and not name.endswith("bias")

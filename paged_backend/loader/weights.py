"""``iter_weights``: (HF name, CPU tensor) pairs of a resolved model, whatever its file format."""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import ModelLoadError
from .gguf_weights import iter_gguf_weights
from .quantization import dequantize_fp8_weights
from .safetensors_reader import iter_pt_bin, iter_safetensors
from .source import ModelSource


def iter_weights(source: ModelSource, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensor names and HF layouts, CPU tensors in ``dtype`` (floating tensors only are cast).
    FP8 checkpoints come out dequantized, plus their per-layer KV-cache scales (`...k_scale`, fp32) if any."""
    if source.kind == "dummy":
        raise ModelLoadError(
            f"{source.name!r} was resolved with load_format='dummy': it has no weights to read; "
            "call paged_backend.loader.init_dummy_weights(model) instead"
        )
    if source.weights_format == "gguf":
        yield from iter_gguf_weights(source.gguf_file(), source.hf_config, dtype)
        return
    if source.weights_format == "safetensors" and source.quantization == "fp8":
        pairs = dequantize_fp8_weights(iter_safetensors(source.weight_files, None), dtype)
    elif source.weights_format == "safetensors":
        pairs = iter_safetensors(source.weight_files, dtype)
    elif source.weights_format == "pt":
        pairs = iter_pt_bin(source.weight_files, dtype)
    else:
        raise ModelLoadError(f"{source.name!r}: no weight files were found when it was resolved")
    if not source.text_prefixes:
        yield from pairs
        return
    for name, tensor in pairs:
        text_name = _text_model_name(name, source.text_prefixes)
        if text_name is not None:
            yield text_name, tensor


def _text_model_name(name: str, prefixes: tuple[str, ...]) -> str | None:
    """The text-only name of a composite (e.g. vision-language) checkpoint tensor, or None to skip."""
    if name.startswith("lm_head."):
        return name
    for prefix in prefixes:
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            return rest if rest.startswith(("lm_head.", "model.")) else "model." + rest
    return None

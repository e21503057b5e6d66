"""Quantized checkpoints: which `quantization_config` we can load, and FP8 weights read back to floats.

Supported: FP8 (float8_e4m3fn) weights with their scales, in the layouts on the hub:
  - compressed-tensors (llm-compressor, `format: float-quantized`): `X.weight` + `X.weight_scale`
    (per tensor [1], per channel [N, 1] or per block), optional static `X.input_scale`, and with a
    `kv_cache_scheme` the per-layer `self_attn.k_scale` / `v_scale`;
  - `quant_method: fp8` (AutoFP8 / vLLM: `X.weight_scale`; transformers' fine-grained FP8:
    block-wise `X.weight_scale_inv`) and `fbgemm_fp8` (per-channel `X.weight_scale`).
The weights are dequantized here (fp8 value x scale, in fp32, then the model's dtype); the engine then
quantizes them again per output channel (quantization="fp8"), which gives back the checkpoint's fp8
values exactly for per-channel checkpoints and within one fp8 rounding step for per-tensor / block ones.
Static activation scales are not used: activations are always scaled per token, dynamically.

Everything else (AWQ, GPTQ, bitsandbytes, integer compressed-tensors, ...) is refused by name: those are
packed integer formats this engine has no kernels for.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import ModelLoadError

_FP8_METHODS = ("fp8", "fbgemm_fp8")
_FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")
_DROPPED_SUFFIXES = ("input_scale", "weight_zero_point", "input_zero_point")
KV_SCALE_SUFFIXES = ("k_scale", "v_scale")


def _as_dict(qc) -> dict:
    if isinstance(qc, dict):
        return qc
    to_dict = getattr(qc, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(vars(qc))


def checkpoint_quantization(config) -> str | None:
    """"fp8" for a supported FP8 checkpoint, None for an unquantized one; ModelLoadError for the rest."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = _as_dict(qc)
    method = str(qc.get("quant_method", "unknown")).lower()
    if method in _FP8_METHODS:
        return "fp8"
    if method == "compressed-tensors" and _compressed_tensors_is_fp8(qc):
        return "fp8"
    detail = f"quant_method={method!r}"
    if method == "compressed-tensors":
        detail += f" with format={qc.get('format')!r} (not 8-bit float weights)"
    raise ModelLoadError(
        f"the checkpoint is quantized ({detail}), which this engine cannot load: AWQ, GPTQ, bitsandbytes, "
        "AQLM, EXL2, HQQ, integer compressed-tensors and other packed formats have no kernels here. "
        "Supported: unquantized fp32/fp16/bf16 checkpoints (optionally quantized at load with "
        "quantization='fp8') and FP8 checkpoints (compressed-tensors float-quantized, quant_method "
        "'fp8' or 'fbgemm_fp8')."
    )


def _compressed_tensors_is_fp8(qc: dict) -> bool:
    groups = qc.get("config_groups") or {}
    if not groups:
        return False
    for group in groups.values():
        w = (group or {}).get("weights") or {}
        if w.get("num_bits") != 8 or w.get("type") != "float":
            return False
    return True


def dequantize_fp8_weights(
    pairs: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Raw checkpoint tensors -> the same names with fp8 weights times their scales, in `dtype`.

    Scales are consumed, static activation scales dropped, KV-cache scales passed through as fp32.
    A weight and its scale may come in either order and from different shards."""
    weights: dict[str, torch.Tensor] = {}  # prefix -> fp8 weight waiting for its scale
    scales: dict[str, torch.Tensor] = {}  # prefix -> scale waiting for its weight
    for name, t in pairs:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and t.dtype in _FP8_TYPES:
            if prefix in scales:
                yield name, _dequantize(t, scales.pop(prefix), name).to(dtype)
            else:
                weights[prefix] = t
        elif leaf in _SCALE_SUFFIXES:
            if prefix in weights:
                yield f"{prefix}.weight", _dequantize(weights.pop(prefix), t, name).to(dtype)
            else:
                scales[prefix] = t
        elif leaf in _DROPPED_SUFFIXES:
            continue
        elif leaf in KV_SCALE_SUFFIXES:
            yield name, t.float()
        else:
            yield name, t.to(dtype) if t.is_floating_point() else t
    if weights or scales:
        unpaired = sorted([f"{p}.weight" for p in weights] + [f"{p} scale" for p in scales])
        raise ModelLoadError(
            "FP8 checkpoint: weights without a scale or scales without a weight: " + ", ".join(unpaired[:10])
        )


def _dequantize(q: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """q [N, K] fp8 times a per-tensor, per-channel ([N] / [N, 1]) or per-block ([ceil(N/bn), ceil(K/bk)]) scale."""
    n, k = q.shape
    w = q.float()
    s = scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == n and (s.dim() == 1 or s.shape[-1] == 1):
        return w * s.reshape(n, 1)
    if s.dim() == 2:
        bn, bk = -(-n // s.shape[0]), -(-k // s.shape[1])
        full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        if full.shape == (n, k):
            return w * full
    raise ModelLoadError(f"FP8 checkpoint: scale of {name} has shape {tuple(scale.shape)}, for a weight {(n, k)}")

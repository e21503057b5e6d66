"""GGUF tensors as HF-named, HF-layout torch tensors.

Three differences between a llama.cpp GGUF and the HF checkpoint it was converted from are undone:
- names (``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight``, ...);
- llama-arch Q/K rows: llama.cpp's converter interleaves each head's two rotary halves so its
  rope can rotate adjacent pairs; HF rotates the first half against the second;
- Gemma norms: the converter stores ``1 + w`` because llama.cpp multiplies by the weight directly,
  while HF's Gemma RMSNorm multiplies by ``1 + w``.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterator

import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from .errors import CorruptWeightsError
from .gguf_file import GGUFFile

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 2/3 have four norms per layer; the GGUF names shift meaning.
_LAYER_GEMMA2 = {
    **_LAYER,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Tensors llama.cpp adds that have no HF counterpart (llama3 rope factors are in the config).
_SKIPPED = {"rope_freqs.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None for tensors with no HF counterpart."""
    if gguf_name in _SKIPPED:
        return None
    match = _BLOCK.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        table = _LAYER_GEMMA2 if arch in ("gemma2", "gemma3") else _LAYER
        if part not in table:
            return None
        return f"model.layers.{layer}.{table[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{kind}"
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's converter permute: per head, rows (pair, 2) -> (2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(
    gf: GGUFFile, config: transformers.PretrainedConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    arch = gf.architecture
    is_llama = arch in ("llama", "mistral")
    is_gemma = arch in ("gemma", "gemma2", "gemma3")
    unknown = [n for n in gf.tensors if n not in _SKIPPED and hf_name(n, arch) is None]
    if unknown:
        raise CorruptWeightsError(
            f"{gf.path}: tensors with no known HF name for arch {arch!r}: {', '.join(unknown[:8])}"
        )
    for name, info in gf.tensors.items():
        target = hf_name(name, arch)
        if target is None:
            continue
        t = dequantize(gf, name)
        if is_llama and t.ndim >= 1 and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            t = unpermute_qk(t, heads)
        if is_gemma and name.endswith("norm.weight"):
            t = t - 1.0
        yield target, t.to(dtype).contiguous()


def dequantize(gf: GGUFFile, name: str) -> torch.Tensor:
    """A float32 CPU tensor in numpy shape order (outermost dimension first)."""
    info = gf.tensors[name]
    raw = gf.raw(name)
    fast = _FAST.get(info.qtype)
    if fast is not None:
        with warnings.catch_warnings():  # the memory map is read-only; the view is copied at once
            warnings.simplefilter("ignore", UserWarning)
            return fast(torch.from_numpy(raw)).reshape(info.shape)
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, info.qtype))).reshape(info.shape)


# Plain float types are only viewed; every block-quantized type goes through gguf.quants.
def _f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float32).clone()


def _f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).float()


def _bf16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.bfloat16).float()


_FAST = {
    GGMLQuantizationType.F32: _f32,
    GGMLQuantizationType.F16: _f16,
    GGMLQuantizationType.BF16: _bf16,
}

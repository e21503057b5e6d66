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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import transformers
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
    unknown = [n for n in gf.tensors if n not in _SKIPPED and hf_name(n, arch) is None]
    if unknown:
        raise CorruptWeightsError(
            f"{gf.path}: tensors with no known HF name for arch {arch!r}: {', '.join(unknown[:8])}"
        )

    def convert(name: str) -> torch.Tensor:
        return convert_tensor(gf, config, name, dtype)

    names = [n for n in gf.tensors if hf_name(n, arch) is not None]
    # numpy dequantization releases the GIL: keep a couple of tensors in flight while the caller
    # copies the previous one into its model.
    with ThreadPoolExecutor(max_workers=_LOOKAHEAD) as pool:
        pending: deque = deque()
        for name in names:
            pending.append((name, pool.submit(convert, name)))
            if len(pending) > _LOOKAHEAD:
                done_name, future = pending.popleft()
                yield hf_name(done_name, arch), future.result()
        while pending:
            done_name, future = pending.popleft()
            yield hf_name(done_name, arch), future.result()


_LOOKAHEAD = 2


def convert_tensor(
    gf: GGUFFile, config: transformers.PretrainedConfig, name: str, dtype: torch.dtype, rows: slice | None = None
) -> torch.Tensor:
    """One GGUF tensor in HF layout and dtype; `rows` (of a 2-D tensor, head-aligned for Q/K)
    dequantizes only those rows: quantization blocks never cross a row."""
    arch = gf.architecture
    t = dequantize(gf, name, rows)
    if arch in ("llama", "mistral") and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        head_rows = gf.tensors[name].shape[0] // heads
        t = unpermute_qk(t, t.shape[0] // head_rows)
    if arch in ("gemma", "gemma2", "gemma3") and name.endswith("norm.weight"):
        t = t - 1.0
    return t.to(dtype).contiguous()


def dequantize(gf: GGUFFile, name: str, rows: slice | None = None) -> torch.Tensor:
    """A float32 CPU tensor in numpy shape order (outermost dimension first); only `rows` if given."""
    info = gf.tensors[name]
    raw = gf.raw(name)
    shape = info.shape
    if rows is not None:
        raw = raw[rows]
        shape = (raw.shape[0], *info.shape[1:])
    values = gguf_dequantize(raw, info.qtype)
    if not values.flags.writeable or not values.flags.c_contiguous:
        values = np.array(values, dtype=np.float32)  # F32 comes back as a view of the read-only map
    return torch.from_numpy(values).reshape(shape)

"""The transformers config of a GGUF file, built from its metadata.

Values llama.cpp does not store but hard-codes per architecture (Gemma 3's local rope base of 10000
and its 5 local : 1 global layer pattern, Gemma 2's alternating window, the 27B models' query scale)
are filled in the way llama.cpp's own loader does, so the config equals the original HF config.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import transformers

from paged_backend.architectures import MODEL_TYPE_ARCHITECTURES

from .errors import CorruptWeightsError, ModelLoadError
from .gguf_file import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


def gguf_to_hf_config(gf: GGUFFile) -> transformers.PretrainedConfig:
    try:
        return _config(gf)
    except ModelLoadError:
        raise
    # missing keys (int(None)), zero head counts, values of the wrong type or size
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError) as exc:
        raise CorruptWeightsError(f"{gf.path}: its metadata does not describe a usable model ({exc!r})") from exc


def _config(gf: GGUFFile) -> transformers.PretrainedConfig:
    arch = gf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{gf.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def meta(key: str, default: Any = None) -> Any:
        return gf.get(f"{arch}.{key}", default)

    n_layers = int(meta("block_count"))
    hidden = int(meta("embedding_length"))
    n_heads = _scalar(meta("attention.head_count"))
    n_kv_heads = _scalar(meta("attention.head_count_kv", n_heads))
    head_dim = meta("attention.key_length") or meta("rope.dimension_count") or hidden // n_heads
    tied = "output.weight" not in gf.tensors
    vocab = meta("vocab_size")
    if vocab is None:
        vocab = gf.tensors["token_embd.weight"].shape[0]

    common: dict[str, Any] = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=_scalar(meta("feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=int(head_dim),
        max_position_embeddings=int(meta("context_length", 2048)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
        **_special_token_ids(gf),
    )
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is None and "rope_freqs.weight" in gf.tensors:
        rope_scaling = _llama3_rope_scaling(gf, common["rope_theta"], int(head_dim))

    if arch in ("llama", "mistral"):
        is_mistral = arch == "mistral" or "mistral" in str(gf.get("general.name", "")).lower()
        cls = transformers.MistralConfig if is_mistral else transformers.LlamaConfig
        extra: dict[str, Any] = dict(hidden_act="silu", rope_scaling=rope_scaling)
        if is_mistral:
            extra["sliding_window"] = meta("attention.sliding_window")
        config = cls(**common, **extra)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common, hidden_act="silu", rope_scaling=rope_scaling)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**common, hidden_act="silu", rope_scaling=rope_scaling)
    elif arch == "gemma":
        config = transformers.GemmaConfig(**common, hidden_activation="gelu_pytorch_tanh")
    elif arch == "gemma2":
        window = int(meta("attention.sliding_window", 4096))
        config = transformers.Gemma2Config(
            **common,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=window,
            layer_types=_layer_types(meta("attention.sliding_window_pattern"), n_layers, period=2),
            query_pre_attn_scalar=_query_pre_attn_scalar(n_layers, hidden, n_heads, int(head_dim), big=46),
            attn_logit_softcapping=_opt_float(meta("attn_logit_softcapping")),
            final_logit_softcapping=_opt_float(meta("final_logit_softcapping")),
        )
    else:  # gemma3
        config = transformers.Gemma3TextConfig(
            **common,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=int(meta("attention.sliding_window", 4096)),
            layer_types=_layer_types(meta("attention.sliding_window_pattern"), n_layers, period=6),
            query_pre_attn_scalar=_query_pre_attn_scalar(n_layers, hidden, n_heads, int(head_dim), big=62),
            # llama.cpp keeps 10000 for the local layers unless the file says otherwise; the
            # file's rope scaling (4B and up: linear x8) applies to the global layers only.
            rope_local_base_freq=float(meta("rope.freq_base_swa", 10000.0)),
            rope_scaling=rope_scaling,
            attn_logit_softcapping=_opt_float(meta("attn_logit_softcapping")),
            final_logit_softcapping=_opt_float(meta("final_logit_softcapping")),
        )
    config.architectures = [MODEL_TYPE_ARCHITECTURES[config.model_type]]
    return config




def _scalar(value: Any) -> int:
    # Some files store per-layer arrays (e.g. head_count_kv); the HF configs here take one value.
    if isinstance(value, np.ndarray):
        return int(value.max())
    return int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _special_token_ids(gf: GGUFFile) -> dict[str, Any]:
    out = {}
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = gf.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            out[name] = int(value)
    return out


def _rope_scaling(meta) -> dict[str, Any] | None:
    kind = meta("rope.scaling.type")
    factor = meta("rope.scaling.factor")
    if kind in (None, "none") or factor is None or float(factor) == 1.0:
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": float(factor)}
    original = meta("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_rope_scaling(gf: GGUFFile, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Llama 3.1+ files carry per-frequency rope divisors (``rope_freqs``) instead of the llama3
    rope parameters HF needs; find the parameters that reproduce the divisors."""
    from gguf.quants import dequantize

    info = gf.tensors["rope_freqs.weight"]
    stored = dequantize(gf.raw("rope_freqs.weight"), info.qtype).reshape(-1).astype(np.float64)
    factor = float(stored.max())
    for original in (8192, *(2**k for k in range(7, 18) if 2**k != 8192)):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (0.5, 4.0)):
            if np.allclose(_llama3_divisors(theta, head_dim, factor, low, high, original), stored, rtol=1e-4):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
    raise ModelLoadError(
        f"{gf.path}: its rope_freqs tensor matches no llama3 rope parameters this loader knows; "
        "load the original HF checkpoint instead"
    )


def _llama3_divisors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    # Llama 3.1 rope: long wavelengths slowed down by ``factor``, short ones kept, a smooth
    # blend between original/low and original/high wavelengths.
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def _layer_types(pattern: Any, n_layers: int, period: int) -> list[str]:
    """Per-layer attention kind. A stored per-layer bool array wins (True = sliding window);
    otherwise every ``period``-th layer is global, the rest sliding, as llama.cpp assumes."""
    if isinstance(pattern, np.ndarray) and pattern.size == n_layers:
        return ["sliding_attention" if bool(x) else "full_attention" for x in pattern]
    if isinstance(pattern, (int, np.integer)) and int(pattern) > 0:
        period = int(pattern)
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]


def _query_pre_attn_scalar(n_layers: int, hidden: int, n_heads: int, head_dim: int, big: int) -> int:
    # The 27B Gemma 2/3 models scale queries by hidden/heads instead of head_dim (llama.cpp keys
    # this on the layer count, as GGUF does not store it).
    return hidden // n_heads if n_layers == big else head_dim

"""Which native class runs a given HF config, and the KV-cache geometry it needs."""

from __future__ import annotations

import importlib

from paged_backend.architectures import MODEL_TYPE_ARCHITECTURES, NATIVE_ARCHITECTURES
from paged_backend.models.blocks import head_dim_of, num_kv_heads_of


def supported_architectures() -> list[str]:
    return sorted(NATIVE_ARCHITECTURES)


def _architecture(config) -> str | None:
    for arch in getattr(config, "architectures", None) or []:
        if arch in NATIVE_ARCHITECTURES:
            return arch
    return MODEL_TYPE_ARCHITECTURES.get(getattr(config, "model_type", None))


def is_supported(config) -> bool:
    return _architecture(config) is not None


def get_model_class(config) -> type:
    """The native model class for an HF config (by config.architectures, else config.model_type)."""
    arch = _architecture(config)
    if arch is None:
        raise NotImplementedError(
            f"no native implementation for architectures={getattr(config, 'architectures', None)} "
            f"(model_type={getattr(config, 'model_type', None)!r}); natively supported: "
            f"{', '.join(supported_architectures())}"
        )
    module_name, class_name = NATIVE_ARCHITECTURES[arch]
    module = importlib.import_module(f"paged_backend.models.{module_name}")
    return getattr(module, class_name)


def resolve_impl(config, model_impl: str) -> str:
    """ "native" or "transformers" for a config: auto takes native where we have it."""
    if model_impl == "transformers" or (model_impl == "auto" and not is_supported(config)):
        return "transformers"
    if not is_supported(config):
        from paged_backend.loader.errors import ModelLoadError

        raise ModelLoadError(
            f"model_impl='native': no native implementation for architectures={getattr(config, 'architectures', None)} "
            f"(natively supported: {', '.join(supported_architectures())}); model_impl='auto' or 'transformers' "
            "runs it through transformers' modeling code"
        )
    return "native"


def kv_cache_shape_info(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim): each layer's cache is [num_blocks, 2, block_size, Hkv, D]."""
    return config.num_hidden_layers, num_kv_heads_of(config), head_dim_of(config)

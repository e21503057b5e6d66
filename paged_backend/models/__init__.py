"""Native model implementations and the registry that picks one for an HF config."""

from paged_backend.models.registry import get_model_class, is_supported, kv_cache_shape_info, supported_architectures

__all__ = ["get_model_class", "is_supported", "kv_cache_shape_info", "supported_architectures"]

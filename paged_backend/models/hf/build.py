"""Which configs the transformers path can run, and building the wrapped model: from a resolved
checkpoint (transformers' own class and loader, or our dummy / GGUF weights) or from a model object."""

from __future__ import annotations

import logging

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from paged_backend.loader import ModelLoadError, ModelSource, init_dummy_weights, iter_weights
from paged_backend.models.hf.wrapper import TransformersCausalLM

logger = logging.getLogger("paged_backend")

# Architectures whose transformers code does not declare `_supports_attention_backend` but whose
# attention we route anyway (checked by the test matrix): StableLM calls AttentionInterface
# without the flag; Falcon computes attention inline (see falcon.py).
_ROUTED_WITHOUT_FLAG = {"stablelm", "falcon"}
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
WHAT_WORKS = (
    "paged_backend runs decoder-only causal LMs whose layers all attend causally: natively {native}; "
    "any other through transformers' modeling code when that code calls attention through "
    "transformers' AttentionInterface (see docs/models.md)"
)


def architecture_name(config) -> str:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else f"model_type={getattr(config, 'model_type', None)!r}"


def _unsupported(config, why: str) -> ModelLoadError:
    from paged_backend.models.registry import supported_architectures

    return ModelLoadError(
        f"{architecture_name(config)} cannot run in paged_backend: {why}. "
        + WHAT_WORKS.format(native=", ".join(supported_architectures()))
    )


def check_supported(config) -> type:
    """The transformers CausalLM class for config, or ModelLoadError saying why it cannot run."""
    if getattr(config, "is_encoder_decoder", False):
        raise _unsupported(config, "it is an encoder-decoder model")
    if getattr(config, "use_bidirectional_attention", False):
        raise _unsupported(config, "its attention is bidirectional (not causal)")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise _unsupported(config, f"transformers has no causal-LM class for model_type={config.model_type!r}")
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not getattr(cls, "_supports_attention_backend", False) and config.model_type not in _ROUTED_WITHOUT_FLAG:
        raise _unsupported(
            config, f"its transformers code ({cls.__name__}) does not call attention through AttentionInterface "
            "(recurrent/state-space or hybrid layers, ALiBi, or attention written inline)"
        )
    if getattr(config, "num_kv_shared_layers", 0):
        raise _unsupported(config, "some of its layers reuse another layer's KV cache (num_kv_shared_layers)")
    other = set(getattr(config, "layer_types", None) or ()) - _ATTENTION_LAYER_TYPES
    if other:
        raise _unsupported(config, f"it has {', '.join(sorted(other))} layers, which keep state outside a KV cache")
    return cls


def wrap(hf_model: torch.nn.Module) -> TransformersCausalLM:
    """The engine model around a transformers CausalLM (its weights used in place)."""
    config = hf_model.config
    check_supported(config)
    try:
        model = TransformersCausalLM(hf_model)
    except NotImplementedError as exc:
        raise _unsupported(config, str(exc)) from exc
    num_layers = getattr(config, "num_hidden_layers", None)
    if num_layers is not None and len(model.attention_layers()) != num_layers:
        raise _unsupported(
            config, f"only {len(model.attention_layers())} of its {num_layers} layers call attention "
            "(the others keep state outside a KV cache)"
        )
    return model


def build_transformers_model(source: ModelSource, dtype: torch.dtype, device: torch.device, load_format: str,
                             seed: int) -> TransformersCausalLM:
    """transformers' own class for source's config, on device in dtype, with its weights."""
    config = source.hf_config
    check_supported(config)
    logger.info("running %s through transformers' modeling code with paged attention", architecture_name(config))
    if source.kind == "hf_dir" and not source.text_prefixes:
        # transformers' loader: it knows each architecture's checkpoint layout (e.g. the per-expert
        # tensors that its MoE modules hold fused), sharding, tied weights and buffers.
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.path), config=config, dtype=dtype, device_map=str(device)
        )
    else:
        with torch.device(device):
            hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        if load_format == "dummy":
            init_dummy_weights(hf_model, seed=seed)
        else:
            _load_state(hf_model, source, dtype)
    return wrap(hf_model.eval())


@torch.no_grad()
def _load_state(hf_model: torch.nn.Module, source: ModelSource, dtype: torch.dtype) -> None:
    """Our readers (GGUF, composite checkpoints) into the transformers model's own parameters."""
    params = dict(hf_model.named_parameters(remove_duplicate=False))  # tied weights under each name
    loaded, unexpected = set(), []
    for name, tensor in iter_weights(source, dtype):
        if name in params:
            params[name].copy_(tensor)
            loaded.add(id(params[name]))
        elif "rotary_emb." not in name:
            unexpected.append(name)
    missing = [n for n, p in params.items() if id(p) not in loaded]
    if missing or unexpected:
        raise ModelLoadError(
            f"{source.name}: the weights do not fit {type(hf_model).__name__}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )

"""Resolve a model name and read its weights and tokenizer (safetensors, GGUF or dummy).

The engine calls exactly::

    source = resolve_model(model, load_format="auto")      # alias | .gguf | HF dir | hub cache
    tokenizer = load_tokenizer(source, tokenizer=None)
    model.load_weights(iter_weights(source, dtype))        # or init_dummy_weights(model) for dummy
"""

from .aliases import ALIASES
from .dummy import init_dummy_weights
from .errors import CorruptWeightsError, MissingModelPackageError, ModelLoadError, ModelNotFoundError
from .reference_model import transformers_reference_model
from .resolve import resolve_model
from .shards import iter_weight_slices
from .source import LOAD_FORMATS, ModelSource, cache_root
from .tokenizer import load_tokenizer
from .weights import iter_weights

__all__ = [
    "ALIASES",
    "LOAD_FORMATS",
    "CorruptWeightsError",
    "MissingModelPackageError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelSource",
    "cache_root",
    "init_dummy_weights",
    "iter_weight_slices",
    "iter_weights",
    "load_tokenizer",
    "resolve_model",
    "transformers_reference_model",
]

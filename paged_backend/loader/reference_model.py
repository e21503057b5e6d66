"""The transformers model holding exactly the tensors the engine loads: the reference that tests
and benchmarks compare against (same weights, e.g. a dequantized GGUF, on both sides)."""

from __future__ import annotations

import torch
import transformers

from .source import ModelSource
from .weights import iter_weights


def transformers_reference_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """An eval-mode `AutoModelForCausalLM` of source's config with source's weights (tied lm_head
    filled from the embeddings)."""
    model = transformers.AutoModelForCausalLM.from_config(source.hf_config, dtype=dtype).eval()
    state = dict(iter_weights(source, dtype))
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(f"weights do not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model

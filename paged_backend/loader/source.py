"""``ModelSource``: what ``resolve_model`` found, handed to the tokenizer and weight readers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    import transformers

    from .gguf_file import GGUFFile

LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")


@dataclass
class ModelSource:
    name: str  # what the user passed
    kind: Literal["hf_dir", "gguf", "dummy"]  # "dummy": load_format="dummy", weights come from init_dummy_weights
    path: Path  # the HF directory (snapshot dir for hub ids) or the .gguf file
    hf_config: "transformers.PretrainedConfig"  # the text config; for GGUF built from its metadata
    # Where the files came from: "alias", "gguf_file", "local_dir", "hub_cache".
    origin: str = "local_dir"
    # Weight files in load order (safetensors shards, or pytorch .bin files); empty for GGUF / dummy.
    weight_files: list[Path] = field(default_factory=list)
    weights_format: Literal["safetensors", "pt", "gguf", "none"] = "none"
    # Every token id that ends generation (config + generation_config.json, or GGUF end-of-generation tokens).
    eos_token_ids: list[int] = field(default_factory=list)
    # The checkpoint's own dtype if it declares one (None for GGUF: its tensors are dequantized to any dtype).
    checkpoint_dtype: torch.dtype | None = None
    # Composite checkpoints (e.g. Gemma3ForConditionalGeneration): the prefix of the text model's tensors.
    text_prefixes: tuple[str, ...] = ()
    # "fp8" for an FP8 checkpoint (loader/quantization.py; other quantized checkpoints are refused at resolve).
    quantization: str | None = None
    _gguf: "GGUFFile | None" = field(default=None, repr=False, compare=False)

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf" and self.path.is_file()

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else self.hf_config.model_type

    def gguf_file(self) -> "GGUFFile":
        from .gguf_file import read_gguf

        if self._gguf is None:
            self._gguf = read_gguf(self.path)
        return self._gguf


def cache_root() -> Path:
    """Where derived files (assembled alias GGUFs, converted tokenizers) are kept."""
    env = os.environ.get("PAGED_BACKEND_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "paged_backend"

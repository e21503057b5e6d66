"""Weights of an HF directory: safetensors (single or sharded) or, failing that, pytorch ``.bin`` files.

Tensors are read one at a time with ``safetensors.safe_open``; no transformers model is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .errors import CorruptWeightsError, ModelLoadError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"


def find_weight_files(directory: Path, load_format: str = "auto") -> tuple[list[Path], str]:
    """The weight files of ``directory`` in load order and their format ("safetensors" or "pt")."""
    if load_format in ("auto", "safetensors"):
        files = _indexed_files(directory, SAFETENSORS_INDEX)
        if files is None:
            files = sorted(directory.glob("*.safetensors"))
        if files:
            return files, "safetensors"
        if load_format == "safetensors":
            raise ModelLoadError(f"{directory} has no *.safetensors files (load_format='safetensors')")
    if load_format in ("auto", "pt"):
        files = _indexed_files(directory, PT_INDEX)
        if files is None:
            files = sorted(p for p in directory.glob("pytorch_model*.bin"))
        if files:
            return files, "pt"
    raise ModelLoadError(
        f"{directory} has a config.json but no weights (*.safetensors, {SAFETENSORS_INDEX} or "
        "pytorch_model*.bin); add the weight files, or pass load_format='dummy' for random weights"
    )


def _indexed_files(directory: Path, index_name: str) -> list[Path] | None:
    index = directory / index_name
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptWeightsError(f"{index} is not a valid shard index ({exc})") from exc
    files = [directory / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index} lists shards that are missing: {', '.join(missing)}")
    return files


def check_safetensors(files: list[Path]) -> None:
    """Parse every file's header now, so a corrupt file fails at resolve time, naming the file."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
            raise CorruptWeightsError(
                f"corrupt or unreadable safetensors file {path}: {exc}; re-download or re-save it"
            ) from exc


def iter_safetensors(files: list[Path], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every file; floating tensors cast to dtype (None: as stored)."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, _cast(f.get_tensor(name), dtype)
        except Exception as exc:
            raise CorruptWeightsError(f"failed reading tensors from {path}: {exc}") from exc


def iter_pt_bin(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CorruptWeightsError(f"corrupt or unreadable weights file {path}: {exc}") from exc
        for name, tensor in state.items():
            yield name, _cast(tensor, dtype)
        del state


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # Integer/bool buffers (rare in checkpoints) keep their dtype.
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

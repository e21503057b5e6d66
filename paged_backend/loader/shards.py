"""``iter_weight_slices``: a model's tensors as lazy slices, so a tensor-parallel rank reads only its part.

Each yielded value has the full HF `.shape` and `.narrow(dim, start, length)`, which reads just those
rows/columns from the file and returns a CPU tensor in the requested dtype (safetensors through
`get_slice`, GGUF by dequantizing only the rows asked for, pytorch .bin through a memory map).
Values are valid until the next one is requested.
"""

from __future__ import annotations

from typing import Iterator

import torch
from safetensors import safe_open

from .errors import CorruptWeightsError, ModelLoadError
from .gguf_file import GGUFFile
from .gguf_weights import convert_tensor, hf_name
from .source import ModelSource
from .weights import _text_model_name


class _SafetensorsSlice:
    def __init__(self, handle, name: str, dtype: torch.dtype):
        self._slice, self._dtype = handle.get_slice(name), dtype
        self.shape = torch.Size(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = tuple(slice(start, start + length) if d == dim else slice(None) for d in range(len(self.shape)))
        t = self._slice[index]
        return t.to(self._dtype) if t.is_floating_point() else t


class _GGUFSlice:
    def __init__(self, gf: GGUFFile, config, name: str, dtype: torch.dtype):
        self._gf, self._config, self._name, self._dtype = gf, config, name, dtype
        self.shape = torch.Size(gf.tensors[name].shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0 and len(self.shape) == 2:  # rows: dequantize only those
            return convert_tensor(self._gf, self._config, self._name, self._dtype, slice(start, start + length))
        return convert_tensor(self._gf, self._config, self._name, self._dtype).narrow(dim, start, length)


class _MappedSlice:
    """A memory-mapped torch tensor: narrowing is a view, so only the slice's pages are read."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype):
        self._tensor, self._dtype, self.shape = tensor, dtype, tensor.shape

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        t = self._tensor.narrow(dim, start, length)
        return t.to(self._dtype) if t.is_floating_point() else t.clone()


def iter_weight_slices(source: ModelSource, dtype: torch.dtype) -> Iterator[tuple[str, object]]:
    """(HF name, lazy slice) pairs of a resolved model; the names are those of `iter_weights`."""
    if source.weights_format == "gguf":
        gf = source.gguf_file()
        for name in gf.tensors:
            hf = hf_name(name, gf.architecture)
            if hf is not None:
                yield hf, _GGUFSlice(gf, source.hf_config, name, dtype)
        return
    if source.weights_format not in ("safetensors", "pt"):
        raise ModelLoadError(f"{source.name!r}: no weight files to read (load_format={source.kind!r})")
    for name, value in _file_slices(source, dtype):
        if source.text_prefixes:
            name = _text_model_name(name, source.text_prefixes)
        if name is not None:
            yield name, value


def _file_slices(source: ModelSource, dtype: torch.dtype) -> Iterator[tuple[str, object]]:
    for path in source.weight_files:
        try:
            if source.weights_format == "safetensors":
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, _SafetensorsSlice(f, name, dtype)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for name, tensor in state.items():
                    yield name, _MappedSlice(tensor, dtype)
        except (OSError, RuntimeError) as exc:
            raise CorruptWeightsError(f"failed reading tensors from {path}: {exc}") from exc

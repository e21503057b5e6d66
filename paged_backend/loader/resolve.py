"""``resolve_model``: turn what the user typed into a ``ModelSource``, offline.

Order: bundled alias -> local .gguf file -> local HF directory -> HF hub cache -> a clear error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from .aliases import ALIASES, alias_path, find_alias
from .errors import ModelLoadError, ModelNotFoundError
from .gguf_config import gguf_to_hf_config
from .gguf_file import read_gguf
from .hub_cache import find_snapshot, looks_like_repo_id
from .quantization import checkpoint_quantization
from .safetensors_reader import check_safetensors, find_weight_files
from .source import LOAD_FORMATS, ModelSource

logger = logging.getLogger(__name__)


def resolve_model(model: str | Path, *, load_format: str = "auto") -> ModelSource:
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    name = str(model).strip()
    if not name:
        raise ModelNotFoundError("model name is empty; " + _what_is_accepted())

    alias = find_alias(name)
    if alias is not None:
        return _from_gguf(alias_path(alias), name, "alias", load_format)

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _from_gguf(path, name, "gguf_file", load_format)
        if path.name == "config.json":
            return _from_dir(path.parent, name, "local_dir", load_format)
        raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a .gguf file or a model directory")
    if path.is_dir():
        return _from_dir(path, name, "local_dir", load_format)

    looked: list[Path] = []
    if looks_like_repo_id(name) and not _looks_like_path(name):
        snapshot, looked = find_snapshot(name)
        if snapshot is not None:
            return _from_snapshot(snapshot, name, load_format)
    raise ModelNotFoundError(_unknown_message(name, path, looked))


def resolve_tokenizer_path(tokenizer: str | Path) -> Path:
    """Where a separately named tokenizer lives: a .gguf file or a directory."""
    name = str(tokenizer).strip()
    alias = find_alias(name)
    if alias is not None:
        return alias_path(alias)
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
        return path
    looked: list[Path] = []
    if looks_like_repo_id(name) and not _looks_like_path(name):
        snapshot, looked = find_snapshot(name)
        if snapshot is not None:
            return snapshot
    raise ModelNotFoundError("tokenizer: " + _unknown_message(name, path, looked))


def _from_gguf(path: Path, name: str, origin: str, load_format: str) -> ModelSource:
    if load_format not in ("auto", "gguf", "dummy"):
        raise ModelLoadError(f"{path} is a GGUF file; load_format={load_format!r} does not apply (use 'auto')")
    gf = read_gguf(path)
    config = gguf_to_hf_config(gf)
    eos = [config.eos_token_id] if isinstance(config.eos_token_id, int) else []
    extra = [gf.get("tokenizer.ggml.eot_token_id"), gf.get("tokenizer.ggml.eom_token_id")]
    if gf.architecture.startswith("gemma"):
        # Gemma's turn end; HF's generation_config lists it with <eos>, llama.cpp finds it by its text.
        extra.append(gf.find_string("tokenizer.ggml.tokens", "<end_of_turn>"))
    for value in extra:
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    return ModelSource(
        name=name,
        kind="dummy" if load_format == "dummy" else "gguf",
        path=path,
        hf_config=config,
        origin=origin,
        weights_format="none" if load_format == "dummy" else "gguf",
        eos_token_ids=eos,
        _gguf=gf,
    )


def _from_snapshot(snapshot: Path, name: str, load_format: str) -> ModelSource:
    if (snapshot / "config.json").is_file():
        return _from_dir(snapshot, name, "hub_cache", load_format)
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_gguf(ggufs[0], name, "hub_cache", load_format)
    if ggufs:
        raise ModelLoadError(
            f"hub cache entry {name!r} ({snapshot}) holds several GGUF files; pass one of them as the model: "
            + ", ".join(str(p) for p in ggufs)
        )
    raise ModelLoadError(f"hub cache entry {name!r} ({snapshot}) has no config.json and no .gguf file")


def _from_dir(directory: Path, name: str, origin: str, load_format: str) -> ModelSource:
    if not (directory / "config.json").is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        hint = f"; to load a GGUF file pass its path, e.g. {ggufs[0]}" if ggufs else ""
        raise ModelLoadError(
            f"{directory} has no config.json, so it is not a Hugging Face model directory "
            f"(expected config.json + *.safetensors){hint}"
        )
    if load_format == "gguf":
        raise ModelLoadError(f"{directory} is an HF directory; load_format='gguf' needs a .gguf file")
    try:
        full_config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not read {directory / 'config.json'}: {exc}") from exc
    config = full_config.get_text_config()
    quantization = checkpoint_quantization(full_config)
    composite = config is not full_config  # e.g. a vision-language checkpoint: keep its text model

    weight_files: list[Path] = []
    weights_format = "none"
    if load_format != "dummy":
        weight_files, weights_format = find_weight_files(directory, load_format)
        if weights_format == "safetensors":
            check_safetensors(weight_files)

    return ModelSource(
        name=name,
        kind="dummy" if load_format == "dummy" else "hf_dir",
        path=directory,
        hf_config=config,
        origin=origin,
        weight_files=weight_files,
        weights_format=weights_format,
        eos_token_ids=_eos_ids(directory, config),
        checkpoint_dtype=_checkpoint_dtype(full_config),
        text_prefixes=("model.language_model.", "language_model.model.", "language_model.") if composite else (),
        quantization=quantization,
    )


def _eos_ids(directory: Path, config: transformers.PretrainedConfig) -> list[int]:
    ids: list[int] = []
    values = [getattr(config, "eos_token_id", None)]
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        try:
            values.append(json.loads(gen_path.read_text()).get("eos_token_id"))
        except ValueError:
            logger.warning("ignoring unreadable %s", gen_path)
    for value in values:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


def _checkpoint_dtype(config: transformers.PretrainedConfig) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(".gguf") or "\\" in name


def _what_is_accepted() -> str:
    aliases = ", ".join(f"{a.name} ({a.description})" for a in ALIASES.values())
    return (
        "pass a bundled alias, a .gguf file, a directory with config.json + *.safetensors, "
        f"or a Hugging Face id already in the local hub cache. Bundled aliases: {aliases}"
    )


def _unknown_message(name: str, path: Path, looked: list[Path]) -> str:
    tried = [
        f"not a bundled alias ({', '.join(ALIASES)})",
        f"no file or directory {path}",
    ]
    if looked:
        tried.append(
            "not in the Hugging Face hub cache (looked in " + ", ".join(str(p) for p in looked) + "; "
            "nothing is ever downloaded: fetch it elsewhere with `huggingface-cli download "
            f"{name.partition('@')[0]}` and copy the cache, or set HF_HUB_CACHE)"
        )
    else:
        tried.append("not a Hugging Face hub id of the form org/name")
    return f"unknown model {name!r}: " + "; ".join(tried) + ". " + _what_is_accepted()

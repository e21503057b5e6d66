"""Tokenizers: an HF directory's own files, or a GGUF's vocabulary converted once by transformers.

Converting a GGUF tokenizer (transformers parses the whole file with gguf.GGUFReader) takes
5-30 s, so the result is saved with ``save_pretrained`` into the cache, keyed by the file's
path, size and mtime, and later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import transformers
from transformers import AutoTokenizer

from .errors import ModelLoadError
from .source import ModelSource, cache_root

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of ``source``, or of ``tokenizer`` (an alias, .gguf file, directory or hub id)."""
    if tokenizer is not None:
        from .resolve import resolve_tokenizer_path

        path = resolve_tokenizer_path(tokenizer)
    else:
        path = source.path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_tokenizer(path)
    return dir_tokenizer(path)


def dir_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerBase:
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{directory} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "pass tokenizer=<directory, hub id, .gguf file or alias>"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer in {directory}: {exc}") from exc


def gguf_tokenizer_cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|transformers-{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "tokenizers" / f"{gguf_path.stem}-{digest}"


def gguf_tokenizer(gguf_path: Path) -> transformers.PreTrainedTokenizerBase:
    cached = gguf_tokenizer_cache_dir(gguf_path)
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception as exc:  # a damaged cache entry: convert again
            logger.warning("cached tokenizer %s unreadable (%s); converting again", cached, exc)
            shutil.rmtree(cached, ignore_errors=True)

    logger.info("converting the tokenizer of %s (once; cached in %s)", gguf_path, cached)
    try:
        tok = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(f"could not convert the tokenizer of {gguf_path}: {exc}") from exc
    _keep_chat_template(tok, gguf_path)

    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    tok.save_pretrained(str(partial))
    try:
        os.replace(partial, cached)  # atomic publish; a concurrent process may have won the race
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return tok


def _keep_chat_template(tok: transformers.PreTrainedTokenizerBase, gguf_path: Path) -> None:
    if getattr(tok, "chat_template", None):
        return
    from .gguf_file import read_gguf

    template = read_gguf(gguf_path).get("tokenizer.chat_template")
    if template:
        tok.chat_template = template

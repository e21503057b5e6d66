"""Offline lookup of a Hugging Face hub id in the local hub cache (through huggingface_hub). Never downloads."""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.endswith(".gguf")


def hub_cache_dirs() -> list[Path]:
    """The cache folders huggingface_hub would use, most specific first."""
    dirs: list[Path] = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]).expanduser())
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append((Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def find_snapshot(repo_id: str) -> tuple[Path | None, list[Path]]:
    """The snapshot directory of ``repo_id`` ("org/name" or "org/name@revision"), and where it looked.

    huggingface_hub resolves the revision (``main`` or the named ref / commit) offline; the cache
    folders are read from the environment at call time (huggingface_hub's own constants are fixed
    when it is first imported).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = repo_id.partition("@")
    looked: list[Path] = []
    for cache in hub_cache_dirs():
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        looked.append(repo_dir)
        try:
            path = snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=True)
        except (LocalEntryNotFoundError, ValueError, OSError):
            # huggingface_hub takes only full 40-digit commit hashes; a short one names the folder
            short = repo_dir / "snapshots" / revision if revision else None
            if short is not None and short.is_dir():
                return short, looked
            continue
        return Path(path), looked
    return None, looked

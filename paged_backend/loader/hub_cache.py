"""Offline lookup of a Hugging Face hub id in the local hub cache. Never downloads."""

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

    The revision is ``refs/main`` (or the named ref / commit); without refs, the newest snapshot.
    """
    repo, _, revision = repo_id.partition("@")
    folder = "models--" + repo.replace("/", "--")
    looked: list[Path] = []
    for cache in hub_cache_dirs():
        repo_dir = cache / folder
        looked.append(repo_dir)
        snapshots = repo_dir / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo_dir / "refs" / (revision or "main")
        if ref.is_file():
            candidate = snapshots / ref.read_text().strip()
            if candidate.is_dir():
                return candidate, looked
        if revision and (snapshots / revision).is_dir():
            return snapshots / revision, looked
        if not revision:
            entries = [p for p in snapshots.iterdir() if p.is_dir()]
            if entries:
                return max(entries, key=lambda p: p.stat().st_mtime), looked
    return None, looked

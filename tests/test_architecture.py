"""The boundaries of README's Layout section, checked on the imports of every module (ast walk).

adapters import only paged_backend's public names; kernels import nothing of paged_backend;
runtime never imports engine; the engine never imports torch (it never touches tensors); only
layers/ and runtime/ import kernels (and the kernel benchmark); loader never imports models.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import paged_backend

ROOT = Path(__file__).resolve().parent.parent
# where each package's files live: kernels/ and adapters/ are installed as paged_backend.kernels / .adapters
PACKAGES = {"paged_backend": ROOT / "paged_backend", "paged_backend.kernels": ROOT / "kernels",
            "paged_backend.adapters": ROOT / "adapters"}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if pkg == "paged_backend" and rel.parts[0] in ("kernels", "adapters"):
                continue  # the worktree's symlinks to ../kernels, ../adapters
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, source: str, is_package: bool = False, known=frozenset()) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in source, relative ones resolved
    (`from pkg import sub` also counts as importing pkg.sub when that is one of the known modules);
    imports under `if TYPE_CHECKING:` are left out (they never run)."""
    found: list[tuple[str, list[str]]] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, []) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")
                    parent = parent[: len(parent) - (child.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                names = [a.name for a in child.names]
                found.append((base, names))
                found.extend((f"{base}.{n}", []) for n in names if f"{base}.{n}" in known)
            visit(child)

    visit(ast.parse(source))
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, imports: list[tuple[str, list[str]]], public: set[str]) -> list[str]:
    """The boundary rules broken by one module's imports."""
    out = []
    for target, names in imports:
        if _under(module, "paged_backend.adapters"):
            ok = (
                _under(target, "paged_backend.adapters")
                or not _under(target, "paged_backend")
                or (target == "paged_backend" and set(names) <= public)
            )
            if not ok:
                out.append(f"{module}: adapters import only paged_backend's public names, not {target} {names}")
        if _under(module, "paged_backend.kernels") and _under(target, "paged_backend") and not _under(
            target, "paged_backend.kernels"
        ):
            out.append(f"{module}: kernels import nothing of paged_backend, not {target}")
        if _under(module, "paged_backend.runtime") and _under(target, "paged_backend.engine"):
            out.append(f"{module}: runtime never imports engine ({target})")
        if _under(module, "paged_backend.engine") and _under(target, "torch"):
            out.append(f"{module}: the engine never touches tensors (imports {target})")
        if _under(module, "paged_backend.loader") and _under(target, "paged_backend.models"):
            out.append(f"{module}: loader never imports models ({target})")
        kernel_users = ("paged_backend.kernels", "paged_backend.layers", "paged_backend.runtime",
                        "paged_backend.bench.kernels", "paged_backend.bench.fp8",
                        "paged_backend.bench.fp8_gemm")  # the kernel benches
        imports_kernels = _under(target, "paged_backend.kernels") or (
            target == "paged_backend" and "kernels" in names
        )
        if imports_kernels and not any(_under(module, u) for u in kernel_users):
            out.append(f"{module}: only layers/ and runtime/ import kernels ({target} {names})")
    return out


def test_every_module_keeps_the_boundaries():
    public = set(paged_backend.__all__) | {"__version__"}
    mods = _modules()
    assert {"paged_backend.engine.engine", "paged_backend.runtime.model_runner", "paged_backend.kernels",
            "paged_backend.adapters.openai_server"} <= set(mods)
    problems = []
    for name, path in sorted(mods.items()):
        found = imports_of(name, path.read_text(), is_package=path.name == "__init__.py", known=set(mods))
        problems += violations(name, found, public)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "module,source,rule",
    [
        ("paged_backend.runtime.x", "from paged_backend.engine.sequence import Sequence", "runtime never imports engine"),
        ("paged_backend.engine.x", "def f():\n    import torch", "never touches tensors"),
        ("paged_backend.models.x", "from paged_backend import kernels", "only layers/ and runtime/"),
        ("paged_backend.loader.x", "from ..models import registry", "loader never imports models"),
        ("paged_backend.kernels.x", "from paged_backend.params import SamplingParams", "kernels import nothing"),
        ("paged_backend.adapters.x", "from paged_backend.engine.engine import Engine", "public names"),
        ("paged_backend.adapters.x", "from paged_backend import LLM, coerce_params", "public names"),
    ],
)
def test_the_check_catches_a_broken_rule(module, source, rule):
    found = violations(module, imports_of(module, source, known=set(_modules())), set(paged_backend.__all__))
    assert any(rule in v for v in found), found


def test_type_checking_imports_are_not_counted():
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
    assert violations("paged_backend.engine.x", imports_of("paged_backend.engine.x", src), set()) == []

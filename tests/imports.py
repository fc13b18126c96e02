"""Which `stages` modules a file imports, read from its source: at the top or inside a function,
absolute or relative. tests/core/test_dvc_deps.py follows them from a command's module (the
files a stage runs); tests/core/test_structure.py checks the whole graph (no cycles, no stage
importing another)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stages"


def module_file(name: str) -> Path | None:
    """stages.a.b -> stages/a/b.py or stages/a/b/__init__.py (None when it is not a module)."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    """stages/a/b.py -> stages.a.b; stages/a/__init__.py -> stages.a."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """`stages...` modules this file imports anywhere. `from stages.x import y` imports y when it
    is a module (x's `__init__` runs first, as for any module of x), else x."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "stages"}
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            if module and module.split(".")[0] == "stages":
                submodules = {f"{module}.{a.name}" for a in node.names if module_file(f"{module}.{a.name}")}
                found |= submodules
                if len(submodules) < len(node.names):  # names defined in `module` itself
                    found.add(module)
    return found


def _absolute(node: ast.ImportFrom, path: Path) -> str | None:
    """The module a `from ... import` names, relative imports resolved against `path`'s package."""
    if not node.level:
        return node.module
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])]) or None


def import_graph() -> dict[str, set[str]]:
    """Every module under stages/ -> the modules under stages/ it imports."""
    files = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    return {module_name(p): {m for m in imported_modules(p) if module_file(m)} for p in files}

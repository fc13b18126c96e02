"""Every dvc.yaml's code deps cover every file its stage commands run: editing any of them re-runs the stage.

The closure is computed statically from the source, not from a list kept by hand: the command
table in `stages/core/cli.py` names each command's module; from there every `import` of a
`stages` module (at the top or inside a function), every package `__init__.py` on the way, and
every package-data folder or file a module names by string (`"templates"`, `"tasks"`,
`"ds_configs"`: the chat templates, lm-eval task YAMLs + their metric functions, DeepSpeed
configs) is collected. A dep covers a file when it is that file or a folder above it.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from stages.core.cli import COMMANDS
from tests.imports import PACKAGE, ROOT, imported_modules, module_file

DVC_FILES = sorted([ROOT / "dvc.yaml", *ROOT.glob("pipelines/*/dvc.yaml")])


def package_data(path: Path) -> set[Path]:
    """Files beside this module that it names by a string literal: a data folder's files, or a file."""
    siblings = {p.name: p for p in path.parent.iterdir() if p.suffix != ".py" and p.name != "__pycache__"}
    files: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in siblings:
            target = siblings[node.value]
            files |= {f for f in target.rglob("*") if f.is_file() and "__pycache__" not in f.parts} if target.is_dir() else {target}
    return files


def closure(command: str) -> dict[Path, str]:
    """Every file `sftflow <command>` runs or reads from stages/, each with why (who imports it)."""
    start = ["stages.core.cli", COMMANDS[command].partition(":")[0]]
    seen: dict[Path, str] = {}
    todo = [(m, "the command table") for m in start]
    while todo:
        name, why = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ first
            path = module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen[path] = why
            rel = path.relative_to(ROOT)
            todo += [(m, f"imported by {rel}") for m in imported_modules(path)]
            seen |= {f: f"read by {rel}" for f in package_data(path) if f not in seen}
    return seen


def stage_commands(dvc_file: Path) -> list[tuple[str, str, list[Path]]]:
    """(stage name, sftflow command, deps as absolute paths) for each stage that runs sftflow."""
    spec = yaml.safe_load(dvc_file.read_text())
    out = []
    for name, stage in spec["stages"].items():
        cmd = stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"])
        words = shlex.split(cmd)
        if words[:1] != ["sftflow"] or words[1] not in COMMANDS:
            continue
        wdir = dvc_file.parent / stage.get("wdir", ".")
        out.append((name, words[1], [(wdir / d).resolve() for d in stage.get("deps", [])]))
    return out


def uncovered(command: str, deps: list[Path]) -> list[str]:
    """The closure's files no dep covers, each with the reason it is needed."""
    return [
        f"{path.relative_to(ROOT)} ({why})"
        for path, why in sorted(closure(command).items())
        if not any(path == d or d in path.parents for d in deps)
    ]


CASES = [(f, *s) for f in DVC_FILES for s in stage_commands(f)]


def test_every_pipeline_runs_the_five_stages() -> None:
    """A pipeline with its own params.yaml is whole; an add-on (pipelines/export) reads the
    top params.yaml and extends the top pipeline's outputs instead."""
    assert len(DVC_FILES) >= 5
    for dvc_file in DVC_FILES:
        commands = {c for _, c, _ in stage_commands(dvc_file)}
        if (dvc_file.parent / "params.yaml").is_file():
            assert {"base", "prepare", "train", "merge", "eval"} <= commands, dvc_file
        else:
            assert commands and not commands & {"base", "prepare", "train"}, dvc_file


@pytest.mark.parametrize(("dvc_file", "stage", "command", "deps"), CASES, ids=lambda x: getattr(x, "name", x))
def test_code_deps_cover_the_command(dvc_file: Path, stage: str, command: str, deps: list[Path]) -> None:
    missing = uncovered(command, deps)
    assert not missing, f"{dvc_file.relative_to(ROOT)}: stage {stage!r} lacks deps for: " + "; ".join(missing)


@pytest.mark.parametrize(("dvc_file", "stage", "command", "deps"), CASES, ids=lambda x: getattr(x, "name", x))
def test_no_code_dep_is_idle(dvc_file: Path, stage: str, command: str, deps: list[Path]) -> None:
    """Dropping any one stages/ dep leaves a file uncovered: the check bites, and no dep is there
    for nothing (a dep on code the stage never runs would re-run it for unrelated edits)."""
    for dep in (d for d in deps if PACKAGE == d or PACKAGE in d.parents):
        rest = [d for d in deps if d != dep]
        assert uncovered(command, rest), f"{dvc_file.relative_to(ROOT)}: stage {stage!r}: {dep} covers nothing it runs"


def test_closure_sees_function_level_imports_and_package_data() -> None:
    train = closure("train")
    assert PACKAGE / "train" / "distributed.py" in train
    assert PACKAGE / "train" / "ds_configs" / "zero3.json" in train
    assert PACKAGE / "evaluate" / "tasks" / "metrics.py" in closure("eval")
    assert PACKAGE / "base" / "templates" / "chatml.jinja" in closure("base")
    assert not any("tools" in p.parts for p in closure("eval")), "eval must not run the plots tools"

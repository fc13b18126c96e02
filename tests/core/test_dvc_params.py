"""Every `params:` key of every dvc.yaml is written in the params file it names.

`dvc repro` stops on a listed key the file does not hold ("Parameters 'eval.top_p' are missing
from 'params.yaml'"), even when sftflow itself would take the schema's default, and `dvc status`
does not report it. This reads each dvc.yaml and its params files as DVC does: a bare key comes
from `params.yaml`, a `{file: [keys]}` entry from that file, both relative to the stage's
`wdir` (the dvc.yaml's folder unless set); a dotted key walks into nested sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DVC_FILES = sorted([ROOT / "dvc.yaml", *ROOT.glob("pipelines/*/dvc.yaml")])
_MISSING = object()


def lookup(params: Any, key: str) -> Any:
    """The value at dotted `key` (a list item by its index), or _MISSING."""
    node = params
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def listed_params(stage: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(params file as written, [keys]) for each entry of a stage's `params:`; [] keys = the whole file."""
    entries: list[tuple[str, list[str]]] = []
    for entry in stage.get("params") or []:
        if isinstance(entry, str):
            entries.append(("params.yaml", [entry]))
        else:
            entries += [(file, list(keys or [])) for file, keys in entry.items()]
    return entries


def missing_params(dvc_file: Path) -> list[str]:
    """One line per listed key its params file lacks (or per params file that is not there)."""
    problems: list[str] = []
    where = dvc_file.relative_to(ROOT) if dvc_file.is_relative_to(ROOT) else dvc_file
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages") or {}
    for name, stage in stages.items():
        if "foreach" in stage or "matrix" in stage:
            problems.append(f"{where}: stage {name}: foreach/matrix stages are not read by this check; extend it")
            continue
        wdir = dvc_file.parent / stage.get("wdir", ".")
        for file, keys in listed_params(stage):
            path = wdir / file
            if not path.is_file():
                problems.append(f"{where}: stage {name}: params file {file} not found ({path})")
                continue
            values = yaml.safe_load(path.read_text()) or {}
            problems += [f"{where}: stage {name}: {key} is missing from {file}"
                         for key in keys if lookup(values, key) is _MISSING]
    return problems


def test_every_dvc_file_is_checked() -> None:
    assert ROOT / "dvc.yaml" in DVC_FILES
    assert {p.parent.name for p in DVC_FILES} >= {"export", "tiny", "qwen2.5-vl-7b-lora-2gpu"}


@pytest.mark.parametrize("dvc_file", DVC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_listed_params_are_in_their_params_file(dvc_file: Path) -> None:
    problems = missing_params(dvc_file)
    assert not problems, ("`dvc repro` stops on these (write each key in the params file, its value from "
                          "stages/core/params.py, or stop listing it):\n  " + "\n  ".join(problems))


def test_the_check_names_file_stage_and_key(tmp_path: Path) -> None:
    """Bare keys read params.yaml in the stage's wdir, mappings their own file; a null value counts as written."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "params.yaml").write_text("eval:\n  data: x\n  seed: null\n")
    (tmp_path / "sub" / "params.yaml").write_text("data:\n  max_length: 8\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "true", "params": ["eval.data", "eval.seed", "eval.top_p",
                                        {"params.yaml": ["eval", "data.system_prompt"]}]},
        "b": {"cmd": "true", "wdir": "sub", "params": ["data.max_length", {"../params.yaml": ["eval.data"]}]},
        "c": {"cmd": "true", "params": [{"other.yaml": None}]},
    }}))
    assert missing_params(tmp_path / "dvc.yaml") == [
        f"{tmp_path / 'dvc.yaml'}: stage a: eval.top_p is missing from params.yaml",
        f"{tmp_path / 'dvc.yaml'}: stage a: data.system_prompt is missing from params.yaml",
        f"{tmp_path / 'dvc.yaml'}: stage c: params file other.yaml not found ({tmp_path / 'other.yaml'})",
    ]

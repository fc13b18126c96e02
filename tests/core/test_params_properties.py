"""Generated params.yaml files: the shipped ones with a key set to a generated value, a key
written twice, bytes inserted, cut or replaced. `load_params` gives Params or one SftflowError
naming the file (and the line where YAML knows it), never another exception; a key written
twice and a float that is not finite are refused; an unchanged file loads."""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from stages.core.errors import SftflowError
from stages.core.params import Params, load_params
from tests.conftest import REPO
from tests.properties import budget, tried

FILES = sorted([REPO / "params.yaml", *REPO.glob("pipelines/*/params.yaml")])
MARK = "MARK_VALUE_HERE"
NOT_FINITE = [".inf", "-.inf", ".nan", ".NaN", "1e999999", "-1e999999", "1" + "0" * 400 + ".0"]
YAML_VALUES = [
    *NOT_FINITE, "1" + "0" * 400, "-1", "0", "null", "~", "yes", "no", "''", "[]", "{}", "[" * 3000 + "]" * 3000,
    "&a [*a]", "!!python/object/apply:os.system ['true']", "!!binary aGk=", "2e-4", "0x10", "1_000", '"\\0\\x01"',
    '"\\ud800"', "*undefined", "{a: 1, a: 2}", "- 1\n- 2",
]


def float_paths(cls: type = Params, at: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths of every float-typed param (sections and nested mappings, not lists)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp is float:
            out.append((*at, f.name))
        elif dataclasses.is_dataclass(tp):
            out += float_paths(tp, (*at, f.name))
    return out


def key_paths(obj: Any, at: tuple = ()) -> list[tuple]:
    out = [at] if at else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += key_paths(v, (*at, k))
    return out


def with_value(raw: dict[str, Any], at: tuple, value_text: str) -> str:
    """params.yaml text with the value at `at` replaced by raw YAML text."""
    import copy

    changed = copy.deepcopy(raw)
    node = changed
    for k in at[:-1]:
        node = node.setdefault(k, {}) if isinstance(node, dict) else node
        if not isinstance(node, dict):
            return yaml.safe_dump(changed)
    node[at[-1]] = MARK
    text = yaml.safe_dump(changed, sort_keys=False)
    if "\n" in value_text:  # a block value: on its own lines, indented under the key
        indent = " " * (2 * len(at))
        return text.replace(f" {MARK}", "\n" + "\n".join(indent + x for x in value_text.splitlines()), 1)
    return text.replace(MARK, value_text, 1)


@st.composite
def params_text(draw: Any) -> tuple[str | bytes, str]:
    """(file content, what must happen: "load", "twice", "finite" or "any")."""
    path = draw(st.sampled_from(FILES))
    text = path.read_text()
    raw = yaml.safe_load(text)
    how = draw(st.sampled_from(["none", "value", "value", "float", "twice", "bytes"]))
    if how == "none":
        return text, "load"
    if how == "float":
        return with_value(raw, draw(st.sampled_from(float_paths())), draw(st.sampled_from(NOT_FINITE))), "finite"
    if how == "value":
        value = draw(st.one_of(st.sampled_from(YAML_VALUES), st.text(max_size=20).map(lambda s: yaml.safe_dump(s).strip().removesuffix("..."))))
        return with_value(raw, draw(st.sampled_from(key_paths(raw))), value.strip() or "''"), "any"
    if how == "twice":
        lines = text.splitlines()
        keyed = [i for i, x in enumerate(lines) if x.strip() and not x.lstrip().startswith(("#", "-")) and ":" in x]
        i = draw(st.sampled_from(keyed))
        return "\n".join([*lines[: i + 1], lines[i], *lines[i + 1 :]]) + "\n", "twice"
    data = text.encode()
    at = draw(st.integers(0, len(data)))
    junk = draw(st.one_of(st.sampled_from([b"\x00", b"\xff", b"\xef\xbb\xbf", b"\t", b":", b"- ", b"&", b"*", b"!!"]), st.binary(max_size=8)))
    op = draw(st.sampled_from(["insert", "cut", "replace"]))
    changed = {"insert": data[:at] + junk + data[at:], "cut": data[:at], "replace": data[:at] + junk + data[at + len(junk) :]}[op]
    return changed, "any"


@budget(60)
@given(case=params_text())
def test_params_yaml_loads_or_names_the_file(case: tuple) -> None:
    tried("params.yaml")
    content, expect = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        try:
            params = load_params(path)
        except SftflowError as e:
            assert e.path == path, str(e)
            assert expect != "load", f"an unchanged params file was refused: {e}"
            if expect == "twice":
                assert "given twice" in str(e) and e.line is not None, str(e)
            if expect == "finite":
                assert "expected a finite number" in str(e) or "expected float" in str(e), str(e)
            return
        assert isinstance(params, Params)
        assert expect not in ("twice", "finite"), f"accepted: {expect}"


@pytest.mark.parametrize("value", NOT_FINITE)
def test_a_float_that_is_not_finite_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(f"train:\n  learning_rate: {value}\n")
    with pytest.raises(SftflowError, match=r"train\.learning_rate: expected a finite number"):
        load_params(path)

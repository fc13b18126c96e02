"""params.yaml is validated: unknown keys and wrong types fail with the dotted key path."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.core.cli import cli
from stages.core.errors import SftflowError
from stages.core.params import load_params

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("train:\n  learning_rte: 1.0e-4\n", "train.learning_rte: unknown key (did you mean learning_rate?)"),
        ("train:\n  lora:\n    r: eight\n", "train.lora.r: expected int, got 'eight'"),
        ("train:\n  method: qlora4\n", "train.method: expected one of"),
        (
            "data:\n  sources:\n    - path: a.jsonl\n      weight: heavy\n",
            "data.sources[0].weight: expected float",
        ),
        ("data:\n  sources:\n    - format: messages\n", "data.sources[0].path: required key is missing"),
        ("merge:\n  dtype: float64\n", "merge.dtype: expected one of"),
        ("evaluation:\n  limit: 3\n", "evaluation: unknown key"),
        ("train:\n  batch_size: true\n", "train.batch_size: expected int, got True"),
    ],
)
def test_bad_params_name_file_and_key_path(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = write(tmp_path, yaml_text)
    with pytest.raises(SftflowError) as err:
        load_params(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochz: 2\n  seed: x\nmodel:\n  dtype: fp8\n")
    with pytest.raises(SftflowError) as err:
        load_params(path)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert all(k in message for k in ("train.epochz", "train.seed", "model.dtype"))


def test_shipped_params_files_are_valid() -> None:
    for path in [REPO / "params.yaml", *sorted((REPO / "pipelines").glob("*/params.yaml"))]:
        load_params(path)


def test_scientific_notation_and_ints_are_floats(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, "train:\n  learning_rate: 2e-4\n  epochs: 3\n"))
    assert params.train.learning_rate == pytest.approx(2e-4) and params.train.epochs == 3.0


def test_cli_reports_bad_params_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  learning_rte: 1\n")
    result = CliRunner().invoke(cli, ["train", "--params", str(path)])
    assert result.exit_code == 2
    assert "train.learning_rte: unknown key" in result.output


def test_help_lists_each_stage_keys() -> None:
    for command, key in [
        ("base", "model.name_or_path"),
        ("prepare", "data.train_on"),
        ("train", "train.learning_rate"),
        ("merge", "merge.max_abs_diff"),
        ("eval", "eval.max_new_tokens"),
    ]:
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and key in result.output, command


def test_cli_starts_without_importing_torch() -> None:
    import subprocess
    import sys

    code = "import sys; from stages.core.cli import cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

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


@pytest.mark.parametrize(
    "train, expected",
    [
        ({"warmup_steps": 10, "warmup_ratio": 0.1}, "train.warmup_steps: set warmup_steps or warmup_ratio, not both"),
        ({"warmup_steps": -1}, "train.warmup_steps: must be >= 0"),
        ({"warmup_steps": 0.5}, "train.warmup_steps: expected int, got 0.5"),
        ({"optim": "adamw"}, "train.optim: unknown optimizer 'adamw' (transformers' names, e.g. adamw_torch,"),
        ({"adam_beta2": 1.0}, "train.adam_beta2: must be in [0, 1)"),
        ({"adam_epsilon": 0}, "train.adam_epsilon: must be > 0"),
        ({"precision": "fp8"}, "train.precision: expected one of 'auto' | 'fp32' | 'bf16' | 'fp16'"),
        ({"device": "gpu"}, "train.device: expected one of 'auto' | 'cpu' | 'cuda'"),
        ({"lora": {"bias": "some"}}, "train.lora.bias: expected one of 'none' | 'all' | 'lora_only'"),
        ({"qlora": {"compute_dtype": "float64"}}, "train.qlora.compute_dtype: expected one of 'auto'"),
    ],
)
def test_training_knobs_are_validated_by_name(tmp_path: Path, train: dict, expected: str) -> None:
    import yaml

    with pytest.raises(SftflowError) as err:
        load_params(write(tmp_path, yaml.safe_dump({"train": train})))
    assert expected in str(err.value)


def test_training_knob_defaults_keep_todays_run() -> None:
    """auto precision is fp32 on the CPU (test_plan), and the optimizer is the one TrainingArguments
    picks when none is named: the default pipeline computes the same steps."""
    import dataclasses

    from transformers import TrainingArguments

    from stages.core.params import TrainParams, parse_params

    t = parse_params({}).train
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    assert t.optim == defaults["optim"] and (t.adam_beta1, t.adam_beta2, t.adam_epsilon) == (
        defaults["adam_beta1"], defaults["adam_beta2"], defaults["adam_epsilon"]
    )  # fmt: skip
    assert (t.precision, t.device, t.warmup_steps, t.lora.bias, t.qlora.compute_dtype) == ("auto", "auto", 0, "none", "auto")
    assert parse_params({"train": {"optim": "paged_adamw_8bit", "warmup_steps": 5}}).train.warmup_steps == 5
    assert TrainParams(precision="fp16").precision == "fp16"


def test_the_optimizer_list_is_the_installed_transformers_one() -> None:
    from transformers.training_args import OptimizerNames

    from stages.core.params import OPTIMIZERS

    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}


def test_train_takes_device_on_the_command_line() -> None:
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0 and "--device [auto|cpu|cuda]" in result.output and "train.precision" in result.output
    result = CliRunner().invoke(cli, ["train", "--device", "gpu"])
    assert result.exit_code == 2 and "'gpu' is not one of 'auto', 'cpu', 'cuda'" in result.output

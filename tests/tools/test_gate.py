"""The retraining gate: rules from params, verdicts with numbers, exit codes, accept only on pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from stages.core.errors import SftflowError
from stages.core.params import GateParams, GateRule, load_params
from stages.tools.gate import check, flatten
from tests.conftest import REPO, bin_path, run

ACCEPTED = {"t.contains.tuned": 0.90, "t.bpb.tuned": 0.60, "t.contains.base": 0.2}
RULES = GateParams(
    rules=(
        GateRule("t.contains.tuned", "higher", 0.05),
        GateRule("t.bpb.tuned", "lower", 0.02),
    )
)


def test_within_tolerance_passes_and_beyond_fails_in_each_direction() -> None:
    ok = check(RULES, {"t.contains.tuned": 0.86, "t.bpb.tuned": 0.615}, ACCEPTED)
    assert ok.passed and [v.passed for v in ok.verdicts] == [True, True]
    assert [v.limit for v in ok.verdicts] == pytest.approx([0.85, 0.62])
    worse = check(RULES, {"t.contains.tuned": 0.84, "t.bpb.tuned": 0.63}, ACCEPTED)
    assert [v.passed for v in worse.verdicts] == [False, False] and not worse.passed
    assert worse.summary() == "FAILED 2/2 rules (regressed: t.contains.tuned, t.bpb.tuned)"
    assert worse.verdicts[1].describe() == (
        "FAIL t.bpb.tuned = 0.63 (accepted 0.6, lower is better, tolerance 0.02: needs <= 0.62)"
    )


def test_negative_tolerance_demands_an_improvement() -> None:
    strict = GateParams(rules=(GateRule("t.contains.tuned", "higher", -0.05),))
    assert not check(strict, {"t.contains.tuned": 0.93}, ACCEPTED).passed  # better, but not by 0.05
    assert check(strict, {"t.contains.tuned": 0.96}, ACCEPTED).passed


def test_first_run_and_new_metrics_pass_nan_fails() -> None:
    first = check(RULES, {"t.contains.tuned": 0.1, "t.bpb.tuned": 3.0}, None)
    assert first.passed and first.first_run and "baseline" in first.markdown()
    new_metric = GateParams(rules=(GateRule("t.rouge.tuned"),))
    assert check(new_metric, {"t.rouge.tuned": 0.3}, ACCEPTED).verdicts[0].accepted is None
    assert not check(RULES, {"t.contains.tuned": math.nan, "t.bpb.tuned": 0.6}, ACCEPTED).passed


def test_a_rule_on_a_metric_eval_does_not_write_names_the_params_key() -> None:
    with pytest.raises(SftflowError) as e:
        check(GateParams(rules=(GateRule("t.contain.tuned"),)), {"t.contains.tuned": 1.0}, ACCEPTED)
    assert str(e.value).startswith("params.yaml: gate.rules[0].metric: 't.contain.tuned' is not in the new")
    assert "known: t.contains.tuned" in str(e.value)


def test_nested_metrics_are_dotted_like_dvc_names_them() -> None:
    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "e": 3}) == {"a.b.c": 1, "a.d": 2, "e": 3}


def test_gate_params_validate_with_dotted_paths(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    assert params.gate.rules[0].metric == "sftflow_replies.contains.tuned"  # the shipped rules load
    raw["gate"]["rules"][0]["direction"] = "up"
    raw["gate"]["rules"][1]["tolerence"] = 0.1
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(SftflowError) as e:
        load_params(bad)
    assert "gate.rules[0].direction: expected one of 'higher' | 'lower', got 'up'" in str(e.value)
    assert "gate.rules[1].tolerence: unknown key (did you mean tolerance?)" in str(e.value)


def test_shipped_accepted_metrics_satisfy_the_shipped_rules() -> None:
    """The committed baseline is what the default pipeline's committed run produced."""
    params = load_params(REPO / "params.yaml")
    accepted = json.loads((REPO / params.gate.accepted).read_text())
    assert check(params.gate, accepted, accepted).passed


def test_command_exits_1_on_regression_and_accepts_only_on_pass(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "gate": {
                    "accepted": "accepted/eval.json",
                    "rules": [{"metric": "t.contains.tuned", "direction": "higher", "tolerance": 0.05}],
                }
            }
        )
    )
    (tmp_path / "accepted").mkdir()
    accepted = tmp_path / "accepted" / "eval.json"
    accepted.write_text(json.dumps(ACCEPTED))
    new = tmp_path / "eval.json"
    new.write_text(json.dumps({"t.contains.tuned": 0.5}))
    sftflow = bin_path("sftflow")
    fail = run(
        [sftflow, "gate", "--metrics", str(new), "--accept", "--report", "gate.md"], tmp_path, check=False
    )
    assert fail.returncode == 1, fail.stdout + fail.stderr
    assert "gate: FAIL t.contains.tuned = 0.5 (accepted 0.9" in fail.stdout
    assert "gate: FAILED 1/1 rules (regressed: t.contains.tuned)" in fail.stdout
    assert json.loads(accepted.read_text()) == ACCEPTED  # a failed gate never touches the baseline
    assert "| `t.contains.tuned` | 0.9 | 0.5 | >= 0.85 | ❌ |" in (tmp_path / "gate.md").read_text()

    new.write_text(json.dumps({"t.contains.tuned": 0.88, "t.other": 1}))
    ok = run([sftflow, "gate", "--metrics", str(new), "--accept"], tmp_path)
    assert "gate: passed 1/1 rules -> accepted/eval.json updated" in ok.stdout
    assert json.loads(accepted.read_text()) == {"t.contains.tuned": 0.88, "t.other": 1}

    broken = run([sftflow, "gate", "--metrics", "missing.json"], tmp_path, check=False)
    assert broken.returncode == 2 and "missing.json: metrics file not found" in broken.stderr


def test_a_gate_without_rules_refuses_to_pass() -> None:
    with pytest.raises(SftflowError) as e:
        check(GateParams(), {"t.contains.tuned": 1.0}, ACCEPTED)
    assert e.value.field == "gate.rules" and "no rules" in str(e.value)

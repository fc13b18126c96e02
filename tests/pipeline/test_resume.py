"""kill -9 the train stage mid-run; `dvc repro` again resumes and the loss curve continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import bin_path, copy_project, read_json, run


@pytest.mark.slow  # ~2 min: a whole tiny pipeline killed and re-run (in-process resume: test_methods)
def test_killed_train_resumes_and_continues_the_curve(tiny_project: Path, tmp_path: Path) -> None:
    uninterrupted = read_json(tiny_project.parent / "first_train.json")["losses"]
    pipeline = copy_project(tmp_path) / "pipelines" / "tiny"
    proc = subprocess.Popen(
        [bin_path("dvc"), "repro"],
        cwd=pipeline,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    checkpoint = pipeline / "models" / "checkpoints" / "checkpoint-10"
    deadline = time.time() + 600
    while not _complete(checkpoint / "trainer_state.json"):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint-10 within 10 minutes"
        time.sleep(0.02)
    # at once: the 20 steps left take about a second on the tiny model (checkpoint-20 may exist)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (pipeline / "models" / "adapter").exists()  # nothing half-written

    again = subprocess.run([bin_path("dvc"), "repro"], cwd=pipeline, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    log = again.stdout + again.stderr
    assert "Stage 'prepare' didn't change" in log  # a crash in train never redoes prepare
    assert "train: resuming from" in log and "checkpoint-" in log
    report = read_json(pipeline / "reports" / "train.json")
    assert report["resumed_from"] is not None and report["steps"] == 30
    # The curve continues: every step logged once, and equal to the run that was never killed.
    assert report["losses"] == pytest.approx(uninterrupted, abs=1e-4)
    assert list((pipeline / "models" / "checkpoints").glob("checkpoint-*")) == []  # finished: cleared
    assert "up to date" in run([bin_path("dvc"), "status", "dvc.yaml"], pipeline).stdout  # the lock is whole


def _complete(state: Path) -> bool:
    """Whether Trainer has finished writing this checkpoint (its state file is the last, whole)."""
    try:
        return "global_step" in json.loads(state.read_text())
    except (OSError, ValueError):
        return False

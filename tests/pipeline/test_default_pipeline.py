"""The default pipeline on the real embedded model (SmolLM2-135M-Instruct): minutes, so slow.

Run with `pytest -m slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_ran_every_stage, bin_path, copy_project, read_json, repro, run


@pytest.mark.slow
def test_default_pipeline_teaches_the_demo_identity(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    assert_ran_every_stage(repro(root))
    metrics = read_json(root / "reports" / "eval.json")
    # The demo data teaches "I am Sftflow Assistant": held-out questions must show it.
    assert metrics["sftflow_replies.contains.tuned"] > metrics["sftflow_replies.contains.base"] + 0.3
    assert read_json(root / "reports" / "merge.json")["max_abs_diff"] < 1e-4
    train = read_json(root / "reports" / "train.json")
    assert train["final_loss"] < train["first_loss"]
    assert "up to date" in run([bin_path("dvc"), "status", "dvc.yaml"], root).stdout  # the default pipeline

"""The default pipeline on the real embedded model (SmolLM2-135M-Instruct): minutes, so slow.

Run with `pytest -m slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import bin_path, read_json, run


@pytest.mark.slow
def test_default_pipeline_teaches_the_demo_identity(default_project: Path) -> None:
    root = default_project  # every stage ran once, in order (the fixture checks)
    metrics = read_json(root / "reports" / "eval.json")
    # The demo data teaches "I am Sftflow Assistant": held-out questions must show it.
    assert metrics["sftflow_replies.contains.tuned"] > metrics["sftflow_replies.contains.base"] + 0.3
    assert read_json(root / "reports" / "merge.json")["max_abs_diff"] < 1e-4
    train = read_json(root / "reports" / "train.json")
    assert train["final_loss"] < train["first_loss"]
    assert "up to date" in run([bin_path("dvc"), "status", "dvc.yaml"], root).stdout  # the default pipeline

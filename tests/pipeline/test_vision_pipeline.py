"""pipelines/tiny-vlm end to end under DVC: every stage runs on image chats, the model learns from
the pixels (the shuffled-images control), a second repro runs nothing, a changed image re-runs prepare."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_ran_every_stage, bin_path, repro, run


@pytest.fixture(scope="module")
def vlm_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vlm_project")
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / "pipelines" / "tiny-vlm",
        root / "pipelines" / "tiny-vlm",
        ignore=shutil.ignore_patterns("__pycache__", "models", "prepared", "reports", "plots", "logs", "dvc.lock"),
    )
    run(["git", "init", "-q"], root)
    run([bin_path("dvc"), "init", "-q"], root)
    run([bin_path("dvc"), "config", "core.analytics", "false"], root)
    return root / "pipelines" / "tiny-vlm"


@pytest.mark.slow
def test_tiny_vlm_pipeline(vlm_project: Path) -> None:
    assert_ran_every_stage(repro(vlm_project))
    assert "up to date" in run([bin_path("dvc"), "status", "dvc.yaml"], vlm_project).stdout  # this pipeline's stages
    train = json.loads((vlm_project / "reports" / "train.json").read_text())
    assert train["final_loss"] < train["first_loss"] / 4
    merge = json.loads((vlm_project / "reports" / "merge.json").read_text())
    assert merge["max_abs_diff"] <= merge["threshold"] and merge["images_checked"] >= 1
    metrics = json.loads((vlm_project / "reports" / "eval.json").read_text())
    tuned = metrics["sftflow_replies.contains.tuned"]
    assert metrics["sftflow_replies.contains.base"] == 0.0 and tuned >= 0.75
    assert metrics["sftflow_perplexity.reply_nll.delta"] < -5

    # the control: each held-out chat shown another chat's images -> accuracy drops
    run([bin_path("sftflow"), "eval", "--params", "params.yaml", "--model", "models/merged",
         "--shuffled-images", "--scores", "reports/eval_shuffled.json"], vlm_project)
    shuffled = json.loads((vlm_project / "reports" / "eval_shuffled.json").read_text())
    assert shuffled["metrics"]["sftflow_replies"]["contains"] <= tuned - 0.25

    assert repro(vlm_project) == []  # nothing changed: nothing runs

    # a changed image (same path, other pixels) re-runs prepare, and everything after it is stale
    from PIL import Image

    Image.new("RGB", (56, 56), (0, 0, 0)).save(vlm_project / "raw" / "shapes" / "red_circle.png")
    before = json.loads((vlm_project / "data" / "prepared" / "manifest.json").read_text())
    run([bin_path("dvc"), "repro", "--single-item", "prepare"], vlm_project)
    after = json.loads((vlm_project / "data" / "prepared" / "manifest.json").read_text())
    key = next(k for k in after["vision"]["images_sha256"] if k.endswith("red_circle.png"))
    assert after["vision"]["images_sha256"][key] != before["vision"]["images_sha256"][key]
    status = run([bin_path("dvc"), "status"], vlm_project).stdout
    for stage in ("train", "merge", "eval_base", "eval"):
        assert f"{stage}:" in status, status

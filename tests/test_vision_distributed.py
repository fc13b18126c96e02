"""Image chats on two processes (torchrun via `sftflow train`, DeepSpeed ZeRO-2 / ZeRO-3 on CPU)
train exactly what one process does: the same per-step losses for the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO
from test_distributed import GLOBAL_BATCH, STEPS, cli_train, train_section
from test_vision import vlm_base  # noqa: F401  (the session fixture: the tiny VLM's models/base)

from stages.core.params import DataParams, ImageParams, SourceParams


@pytest.fixture(scope="module")
def vlm_prepared(vlm_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    from stages.prepare.shards import prepare

    out = tmp_path_factory.mktemp("vlm_prepared") / "out"
    data = DataParams(
        sources=(SourceParams(path=str(REPO / "pipelines" / "tiny-vlm" / "data" / "train.jsonl"),
                              num_samples=STEPS * GLOBAL_BATCH),),
        image=ImageParams(min_pixels=3136, max_pixels=3136),
    )
    prepare(data, vlm_base, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", ["zero2", "zero3"])
def test_vlm_two_processes_equal_one_process(
    vlm_base: Path, vlm_prepared: Path, tmp_path: Path, deepspeed: str  # noqa: F811
) -> None:
    extra = {"vision": {"tune_projector": True}}
    one = cli_train(tmp_path / "one", vlm_base, vlm_prepared, train_section("lora", 1, **extra))
    two = cli_train(tmp_path / "two", vlm_base, vlm_prepared, train_section("lora", 2, deepspeed, **extra))
    assert "launching 2 process(es)" in two["log"]
    assert two["distributed"]["zero_stage"] == int(deepspeed[-1])
    assert len(two["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(two["losses"], one["losses"])) <= 1e-4, (two["losses"], one["losses"])
    assert two["tokens"] == one["tokens"] and two["parameters"] == one["parameters"]

"""Image chats on two processes (torchrun via `sftflow train`, DeepSpeed ZeRO-2 / ZeRO-3 on CPU)
train exactly what one process does: the same per-step losses for the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import GLOBAL_BATCH, STEPS, cli_train, train_section

from stages.core.params import DataParams, ImageParams, SourceParams
from tests.conftest import REPO


@pytest.fixture(scope="module")
def vlm_prepared(vlm_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.prepare.shards import prepare

    out = tmp_path_factory.mktemp("vlm_prepared") / "out"
    data = DataParams(
        sources=(SourceParams(path=str(REPO / "pipelines" / "tiny-vlm" / "raw" / "train.jsonl"),
                              num_samples=STEPS * GLOBAL_BATCH),),
        image=ImageParams(min_pixels=3136, max_pixels=3136),
    )
    prepare(data, vlm_base, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", ["zero2", "zero3"])
def test_vlm_two_processes_equal_one_process(
    vlm_base: Path, vlm_prepared: Path, tmp_path: Path, deepspeed: str
) -> None:
    extra = {"vision": {"tune_projector": True}}
    one = cli_train(tmp_path / "one", vlm_base, vlm_prepared, train_section("lora", 1, **extra))
    two = cli_train(tmp_path / "two", vlm_base, vlm_prepared, train_section("lora", 2, deepspeed, **extra))
    assert "launching 2 process(es)" in two["log"]
    assert two["distributed"]["zero_stage"] == int(deepspeed[-1])
    assert len(two["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(two["losses"], one["losses"])) <= 1e-4, (two["losses"], one["losses"])
    assert two["tokens"] == one["tokens"] and two["parameters"] == one["parameters"]


@pytest.fixture(scope="module")
def mixed_prepared(vlm_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """31 text-only chats and 1 image chat, 4 steps x 8: one epoch, so exactly one step holds the
    image, and under 2 processes one rank's micro-batch of that step has it (with 3 text chats)
    while the other rank's has none; in the 3 other steps no rank has an image."""
    import json

    from stages.prepare.shards import prepare

    root = tmp_path_factory.mktemp("mixed")
    image = root / "red_square.png"  # beside the chats: image paths must lie in the data file's folder
    image.write_bytes((REPO / "pipelines" / "tiny-vlm" / "raw" / "shapes" / "red_square.png").read_bytes())
    records = [{"messages": [{"role": "user", "content": f"Chat {i}: count to {i % 7 + 1}."},
                             {"role": "assistant", "content": " ".join(map(str, range(1, i % 7 + 2)))}]}
               for i in range(STEPS * GLOBAL_BATCH - 1)]
    records.insert(11, {"conversations": [{"from": "human", "value": "<image>Which shape is this?"},
                                          {"from": "gpt", "value": "It is a square."}], "images": [str(image)]})
    raw = root / "mixed.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = root / "out"
    report = prepare(DataParams(sources=(SourceParams(path=str(raw)),), image=ImageParams(min_pixels=3136, max_pixels=3136)),
                     vlm_base, out)
    assert report["splits"]["train"]["samples"] == STEPS * GLOBAL_BATCH, report
    return out


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", ["zero2", "zero3"])
def test_mixed_text_and_image_chats_two_processes_equal_one_process(
    vlm_base: Path, mixed_prepared: Path, tmp_path: Path, deepspeed: str
) -> None:
    """Text-only chats mixed with an image chat (LLaMA-Factory's Qwen2.5-VL recipe mixes two text
    sets with one image set): a rank whose micro-batch has no image runs the vision tower on a
    blank image with zero weight, so ZeRO-3's gathers stay in step (no hang) and ZeRO-2 reduces
    the projector's gradient on every rank; per-step losses equal 1 process's within 1e-5 (fp32)."""
    extra = {"vision": {"tune_projector": True}}
    one = cli_train(tmp_path / "one", vlm_base, mixed_prepared, train_section("lora", 1, **extra))
    two = cli_train(tmp_path / "two", vlm_base, mixed_prepared, train_section("lora", 2, deepspeed, **extra))
    assert two["distributed"]["zero_stage"] == int(deepspeed[-1]) and two["distributed"]["world_size"] == 2
    assert len(two["losses"]) == len(one["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(two["losses"], one["losses"])) <= 1e-5, (two["losses"], one["losses"])
    assert two["tokens"] == one["tokens"]


@pytest.mark.slow
def test_vlm_train_killed_with_sigkill_resumes(vlm_base: Path, vlm_prepared: Path, tmp_path: Path) -> None:
    """`sftflow train` on image chats killed with SIGKILL after checkpoint-2: the re-run resumes
    from a checkpoint and ends on the curve of the run that was never killed."""
    import os
    import signal
    import time

    section = train_section("lora", 1, vision={"tune_projector": True}, save_steps=2)
    whole = cli_train(tmp_path / "whole", vlm_base, vlm_prepared, section)
    run = tmp_path / "killed"
    proc = cli_train(run, vlm_base, vlm_prepared, section, wait=False)
    listed = run / "ckpt" / "checkpoint-2" / "sftflow_files.json"  # written last: the checkpoint is whole
    deadline = time.time() + 600
    while not listed.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "out").exists()
    resumed = cli_train(run, vlm_base, vlm_prepared, section)
    assert resumed["resumed_from"] is not None and "train: resuming from" in resumed["log"]
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-4)

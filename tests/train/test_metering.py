"""Token accounting: the same counts with dataloader workers, across a resume, and equal to the data's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from stages.core.params import TrainParams
from stages.train.trainer import train
from tests.conftest import four_adamw_steps


def _data_counts(prepared: Path) -> tuple[int, int]:
    """(real tokens, trained tokens) of the whole train split, counted from the shards."""
    from datasets import load_from_disk

    rows = load_from_disk(str(prepared / "train"))
    real = sum(len(r) for r in rows["input_ids"])
    trained = sum(sum(label != -100 for label in r[1:]) for r in rows["labels"])
    return real, trained


def _run(params: TrainParams, tiny_base: Path, prepared: Path, where: Path, **kw: Any) -> dict[str, Any]:
    return train(params, tiny_base, prepared, where / "out", where / "ckpt", where / "loss.csv", **kw)


@pytest.mark.parametrize("packing, workers", [("padding_free", 0), ("padding_free", 2), ("none", 2)])
def test_counts_with_dataloader_workers_equal_the_data(
    tiny_base: Path, prepared: Path, tmp_path: Path, packing: str, workers: int
) -> None:
    """One epoch (8 chats, 2 steps of 4): with the collator in 2 worker processes the report
    still counts every real and trained token of the split, as with none."""
    real, trained = _data_counts(prepared)
    params = four_adamw_steps(max_steps=2, packing=packing, dataloader_workers=workers)
    report = _run(params, tiny_base, prepared, tmp_path)
    assert (report["tokens"], report["trained_tokens"]) == (real, trained)
    assert report["tokens_per_second"] > 0
    if packing == "none":  # padding counted apart from real tokens
        assert report["token_slots"] > real and report["packing_efficiency"] == round(real / report["token_slots"], 4)
    else:
        assert report["token_slots"] == real and report["packing_efficiency"] == 1.0


class _StopAt(TrainerCallback):
    """Kills the run at the end of step `step`, before that step's checkpoint is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resumed_run_reports_the_whole_runs_counts(tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    real, trained = _data_counts(prepared)
    params = four_adamw_steps(max_steps=2, save_steps=1)
    with pytest.raises(KeyboardInterrupt):
        _run(params, tiny_base, prepared, tmp_path, callbacks=(_StopAt(2),))
    assert (tmp_path / "ckpt" / "checkpoint-1").is_dir() and not (tmp_path / "ckpt" / "checkpoint-2").exists()
    resumed = _run(params, tiny_base, prepared, tmp_path)
    assert resumed["resumed_from"] is not None
    assert (resumed["tokens"], resumed["trained_tokens"]) == (real, trained)  # step 1's counts came back
    assert resumed["token_slots"] == resumed["tokens"]  # packed: no padding
    assert resumed["tokens_per_second"] > 0


@pytest.mark.parametrize("packing", ["padding_free", "none"])
def test_image_chats_counted_with_workers(tmp_path: Path, vlm_base: Path, images: Path, packing: str) -> None:
    """Image chats collated (pixels decoded and resized) in 2 worker processes: the report counts
    the split's real and trained tokens (image tokens included), as for text."""
    from tests.vlm import chats_in_each_shape, prepare_rows, train_params

    record = chats_in_each_shape(str(images))
    rows, _, _ = prepare_rows(tmp_path / "p", vlm_base, [record["llamafactory"], record["hf_parts"]] * 2)
    real = sum(len(r["input_ids"]) for r in rows)
    trained = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    params = train_params(max_steps=1, batch_size=4, save_steps=0, report_to=[], packing=packing, dataloader_workers=2)
    report = train(params, vlm_base, tmp_path / "p" / "out", tmp_path / "a", tmp_path / "c", tmp_path / "l.csv")
    assert (report["tokens"], report["trained_tokens"]) == (real, trained)
    assert report["tokens_per_second"] > 0

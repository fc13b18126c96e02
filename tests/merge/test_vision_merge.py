"""A vision-language LoRA run merged and reloaded with its processor."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vlm import chats_in_each_shape, prepare_rows, train_params


@pytest.mark.slow
def test_lora_run_merges_and_reloads_with_its_processor(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """train (LoRA + projector) -> merge: the merged folder reloads as the VLM class with its
    image processor, and its logits on samples with images equal base+adapter."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from stages.core.params import MergeParams
    from stages.merge.fold import merge
    from stages.train.trainer import train

    record = chats_in_each_shape(str(images))
    _, _, _ = prepare_rows(tmp_path / "p", vlm_base, [record["llamafactory"], record["hf_parts"]] * 4,
                           eval_fraction=0.25)
    prepared = tmp_path / "p" / "out"
    params = train_params(max_steps=3, batch_size=2, save_steps=0, report_to=[], vision={"tune_projector": True})
    report = train(params, vlm_base, prepared, tmp_path / "adapter", tmp_path / "ckpt", tmp_path / "loss.csv")
    assert report["steps"] == 3 and report["first_loss"] > report["final_loss"]
    assert (tmp_path / "adapter" / "preprocessor_config.json").is_file()
    merged = merge(MergeParams(), vlm_base, tmp_path / "adapter", prepared, tmp_path / "merged")
    assert merged["max_abs_diff"] < 1e-4 and merged["images_checked"] >= 1
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "merged")).__name__.startswith("Qwen2VLImageProcessor")



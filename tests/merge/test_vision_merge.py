"""A vision-language LoRA run merged and reloaded with its processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vlm import chats_in_each_shape, prepare_rows, train_params


@pytest.mark.slow
def test_lora_run_merges_and_reloads_with_its_processor(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """train (LoRA + projector) -> merge: the merged folder reloads as the VLM class with its
    image processor, and its logits on samples with images equal base+adapter."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    from stages.core.params import ImageParams, MergeParams
    from stages.core.vision import image_settings
    from stages.merge.fold import merge
    from stages.train.trainer import train

    record = chats_in_each_shape(str(images))
    # a pixel budget other than the base processor's: the adapter and the merged model must carry it
    narrow = ImageParams(min_pixels=3136, max_pixels=6272)
    _, _, _ = prepare_rows(tmp_path / "p", vlm_base, [record["llamafactory"], record["hf_parts"]] * 4,
                           eval_fraction=0.25, image=narrow)
    prepared = tmp_path / "p" / "out"
    params = train_params(max_steps=3, batch_size=2, save_steps=0, report_to=[], vision={"tune_projector": True})
    report = train(params, vlm_base, prepared, tmp_path / "adapter", tmp_path / "ckpt", tmp_path / "loss.csv")
    assert report["steps"] == 3 and report["first_loss"] > report["final_loss"]
    # the processor travels with the adapter, resizing as prepare counted
    carried = AutoProcessor.from_pretrained(tmp_path / "adapter")
    assert json.loads(json.dumps(image_settings(carried))) == json.loads((prepared / "manifest.json").read_text())["vision"]["image_processor"]
    merged = merge(MergeParams(), vlm_base, tmp_path / "adapter", prepared, tmp_path / "merged")
    assert merged["max_abs_diff"] < 1e-4 and merged["images_checked"] >= 1
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    image_processor = AutoImageProcessor.from_pretrained(tmp_path / "merged")
    assert type(image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert dict(image_processor.size) == {"shortest_edge": 3136, "longest_edge": 6272}
    assert dict(AutoImageProcessor.from_pretrained(vlm_base).size)["longest_edge"] == 12544




def test_qlora_run_merges_into_the_base_it_trained_on_checked_with_images(
    tmp_path: Path, vlm_base: Path, images: Path
) -> None:
    """train (QLoRA + projector, 3 steps) -> merge: the language model's 4-bit layers rebuilt as
    train quantized them, the NF4-rounded base chosen, and the merged model's logits on samples
    with their images equal to the 4-bit model + adapter within the text QLoRA tolerance —
    checked by the stage and again here, against a 4-bit VLM built independently."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from stages.core.loading import load_tokenizer
    from stages.core.params import MergeParams
    from stages.merge.fold import merge
    from stages.merge.vision import vision_check_batches
    from stages.train.trainer import train

    record = chats_in_each_shape(str(images))
    prepare_rows(tmp_path / "p", vlm_base, [record["llamafactory"], record["hf_parts"]] * 4, eval_fraction=0.25)
    prepared = tmp_path / "p" / "out"
    params = train_params(method="qlora", max_steps=3, batch_size=2, save_steps=0, report_to=[],
                          vision={"tune_projector": True})
    adapter = tmp_path / "adapter"
    report = train(params, vlm_base, prepared, adapter, tmp_path / "ckpt", tmp_path / "loss.csv")
    assert report["steps"] == 3

    merged = merge(MergeParams(check_samples=2), vlm_base, adapter, prepared, tmp_path / "merged")
    q = merged["qlora"]
    rounded, original = q["candidates_vs_trained_4bit"]["nf4_rounded"], q["candidates_vs_trained_4bit"]["original"]
    assert merged["method"] == "qlora" and merged["vision_language"] and merged["images_checked"] >= 2
    assert q["quantized_weights"] == 2 * 7 and q["base"] == "nf4_rounded"  # the language model's linears only
    assert rounded["max_abs_diff"] < 1e-4 and rounded["greedy_agreement"] == 1.0
    assert original["mean_abs_diff"] > 100 * rounded["mean_abs_diff"]  # the quantization gap, not noise
    assert merged["max_abs_diff"] < 1e-4 and merged["vs_trained_4bit"]["max_abs_diff"] < 1e-4

    # Independently: the saved model against the 4-bit VLM + adapter, on a sample with its images.
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["model.visual", "visual", "lm_head"])
    four_bit = AutoModelForImageTextToText.from_pretrained(vlm_base, dtype=torch.float32, quantization_config=config,
                                                           device_map={"": "cpu"})
    trained = PeftModel.from_pretrained(four_bit, str(adapter)).eval()
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    plain = AutoModelForImageTextToText.from_pretrained(vlm_base, dtype=torch.float32).eval()
    ((batch, count),) = vision_check_batches(prepared, 1, vlm_base, load_tokenizer(adapter))
    assert "pixel_values" in batch and count == len(batch["image_grid_thw"]) >= 1
    with torch.no_grad():
        want, got, base = (m(**batch).logits for m in (trained, saved, plain))
    assert (got - want).abs().max() < 1e-4
    assert (want - base).abs().max() > 1e-3  # the run changed the model

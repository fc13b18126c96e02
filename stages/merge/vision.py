"""`merge` for vision-language models: the adapter folded into the VLM, saved with its processor,
and the max |Δlogits| check run on prepared eval samples *with their images*.

Same rules as text models (stages/merge/fold.py): merge in fp32 where `choose_placement` puts
it (the GPUs when there are some, else the CPU), save in `merge.dtype`, reload from disk and
compare with base+adapter in `merge.check_dtype`, in chunks on the model's device. The check
feeds the pixels: a merge that broke the projector or the vision tower (both can carry trained
weights here: `modules_to_save`, or LoRA on the ViT) would pass a text-only check.

A QLoRA run merges as a text one does (stages/merge/qlora.py): the 4-bit VLM rebuilt as train
quantized it (the language model's linear layers; the vision tower and lm_head in full
precision), both candidate bases measured against it on the samples with their images, the
adapter folded into the closer one.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

from stages.core.devices import Placement
from stages.core.io import read_json
from stages.core.loading import load_tokenizer, torch_dtype
from stages.core.params import MergeParams
from stages.core.vision import (
    PROCESSOR_FILES,
    VisionCollator,
    load_image_processor,
    load_vlm,
    model_config,
    vision_tokens,
)
from stages.merge.check import build_report, check_rows, compare_each, logits_of, logits_on, write_report
from stages.merge.qlora import merge_qlora
from stages.merge.save import save_merged


def vision_check_batches(prepared: Path, n: int, base_dir: Path, tok: Any) -> list[dict[str, Any]]:
    """Up to n prepared samples (eval split first, else train), each a 1-row batch with its pixels."""
    sizes = read_json(prepared / "manifest.json")["vision"]["image_processor"]
    processor = load_image_processor(base_dir, sizes["min_pixels"], sizes["max_pixels"])
    collate = VisionCollator(processor, vision_tokens(model_config(base_dir)), tok.pad_token_id, packing=False)
    batches = []
    for r in check_rows(prepared, n):
        b = collate([{"input_ids": r["input_ids"], "labels": r["labels"], "images": r["images"]}])
        b.pop("labels")
        batches.append(b)
    return batches


def merge_vision(
    params: MergeParams,
    trained: dict[str, Any],
    placement: Placement,
    base_dir: Path,
    adapter_dir: Path,
    prepared: Path,
    out: Path,
) -> dict[str, Any]:
    """Merge a VLM run into `out`, verify it with images, return the report; raise if it differs."""
    from peft import PeftModel

    method = trained["method"]
    tok = load_tokenizer(adapter_dir)
    batches = vision_check_batches(prepared, params.check_samples, base_dir, tok)
    place = placement.load_kwargs()
    extra: dict[str, Any] = {}
    if method == "full":
        merged = load_vlm(adapter_dir, "float32", **place)
        reference = logits_on(merged, batches, params.check_dtype)
        merged.to(torch_dtype("float32"))
    elif method == "qlora":
        merged, reference, extra = merge_qlora(
            params, trained["train"], base_dir, adapter_dir, batches, placement, vision=True
        )
    else:
        model = PeftModel.from_pretrained(load_vlm(base_dir, "float32", **place), str(adapter_dir))
        reference = logits_on(model, batches, params.check_dtype)
        model.to(torch_dtype("float32"))
        merged = model.merge_and_unload()
    tied = save_merged(merged, tok, out, params)
    save_processor(adapter_dir, base_dir, out)
    del merged
    gc.collect()

    reloaded = load_vlm(out, params.dtype, **place)
    gaps = compare_each(
        {"check": reference, **extra.pop("_compare_saved_with", {})}, logits_of(reloaded, batches, params.check_dtype)
    )
    del reloaded
    check = gaps.pop("check")
    extra.update(gaps)
    checked = {
        "samples_checked": len(batches),
        "tokens_checked": sum(int(b["input_ids"].numel()) for b in batches),
        "images_checked": sum(int(b["image_grid_thw"].shape[0]) for b in batches if "image_grid_thw" in b),
    }
    report = build_report(params, trained, reference, checked, check, tied, adapter_dir, out, extra, vision=True)
    return write_report(report, check, params, adapter_dir, out)


def save_processor(adapter_dir: Path, base_dir: Path, out: Path) -> None:
    """The image processor the model trained with (saved by train next to the adapter), and the
    base's other processor files, so AutoProcessor loads models/merged where torchvision exists."""
    source = adapter_dir if (Path(adapter_dir) / "preprocessor_config.json").is_file() else base_dir
    load_image_processor(source).save_pretrained(out)
    for name in PROCESSOR_FILES:
        if (Path(base_dir) / name).is_file():
            shutil.copy(Path(base_dir) / name, out / name)

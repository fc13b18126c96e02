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
from pathlib import Path
from typing import Any

from stages.core.devices import Placement
from stages.core.io import read_json
from stages.core.loading import load_tokenizer, torch_dtype, trust_remote_code
from stages.core.params import MergeParams
from stages.core.vision import VisionCollator, load_vlm, model_family, prepared_processor
from stages.merge.check import build_report, check_rows, compare_each, logits_of, logits_on, write_report
from stages.merge.qlora import merge_qlora
from stages.merge.save import save_merged


def vision_check_batches(prepared: Path, n: int, base_dir: Path, tok: Any) -> list[tuple[dict[str, Any], int]]:
    """Up to n prepared samples (eval split first, else train), each as (a 1-row batch with its
    pixels, how many images it holds)."""
    processor = prepared_processor(base_dir, read_json(prepared / "manifest.json"))
    collate = VisionCollator(processor, model_family(base_dir), tok.pad_token_id, packing=False)
    batches = []
    for r in check_rows(prepared, n):
        b = collate([{"input_ids": r["input_ids"], "labels": r["labels"], "images": r["images"],
                      "videos": r.get("videos") or []}])
        b.pop("labels")
        batches.append((b, len(r["images"] or [])))
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
    batches, images = zip(*vision_check_batches(prepared, params.check_samples, base_dir, tok))
    batches = list(batches)
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
        "images_checked": sum(images),
    }
    report = build_report(params, trained, reference, checked, check, tied, adapter_dir, out, extra, vision=True)
    return write_report(report, check, params, adapter_dir, out)


def save_processor(adapter_dir: Path, base_dir: Path, out: Path) -> None:
    """The processor the model trained with (train saves it next to the adapter, with the image
    settings prepare counted tokens with; else the base's), so AutoProcessor loads models/merged."""
    from transformers import AutoProcessor

    saved = any((Path(adapter_dir) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    source = adapter_dir if saved else base_dir
    AutoProcessor.from_pretrained(str(source), trust_remote_code=trust_remote_code(Path(base_dir))).save_pretrained(out)

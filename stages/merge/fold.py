"""Stage `merge`: base + adapter -> one plain model, proven equal to what was trained.

The base is loaded in full precision (never 4-bit), the adapter applied and folded in with
`merge_and_unload` in fp32, the result cast to `merge.dtype` and saved as sharded
safetensors with the tokenizer, its chat template and a generation config that stops at the
template's end of turn. The saved model is then *reloaded from disk* and compared with
base+adapter on prepared eval samples: the stage fails when the max |Δlogits| exceeds
`merge.max_abs_diff`, so a broken merge never reaches eval.

What "trained" means depends on `method` (read from the adapter's `sftflow_train.json`, not
from params.yaml: DVC scopes this stage to `merge` params):
- lora / dora / rslora: the fp32 base + adapter — the merge is exact up to rounding.
- qlora: the adapter learnt against NF4-rounded weights (merging into the original weights is
  not the model that was trained). Both candidate bases are measured against the 4-bit model
  it was trained on and `merge.qlora_base: auto` picks the closer (stages/merge/qlora.py).
- full: nothing to fold in; only dtype and shards change.

Where it runs: `choose_placement("merge", ...)` (stages/core/devices.py): with a GPU every
model (the 4-bit one of a QLoRA run included) loads there with `device_map="auto"` and the
fold stays fp32; without one, the CPU in fp32. The logits check runs where the model is, in
chunks of positions (stages/merge/check.py).

The comparison runs in `merge.check_dtype` (float64 by default). Measured on the default
pipeline (SmolLM2-135M, 30 layers, logits up to 55): fp32 forward passes of base+adapter and
merged differ by 8.4e-5 from arithmetic order alone, a hair under 1e-4, while in float64 the
same weights differ by 1.6e-5 — the rounding of W + BA·s to fp32, i.e. the merge itself.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from stages.core.devices import Placement
from stages.core.errors import SftflowError
from stages.core.integrity import verify_dir
from stages.core.io import read_json
from stages.core.loading import (
    carry_remote_code,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from stages.core.params import MergeParams, parse_params
from stages.core.vision import is_vision_model
from stages.merge.check import build_report, check_rows, compare_each, logits_of, logits_on, write_report
from stages.merge.qlora import merge_qlora
from stages.merge.save import save_merged
from stages.merge.vision import merge_vision


def check_batches(prepared: Path, n: int) -> list[dict[str, Any]]:
    """Up to n prepared samples (eval split first, else train) as 1-row batches."""
    import torch

    return [{"input_ids": torch.tensor([list(r["input_ids"])], dtype=torch.long)} for r in check_rows(prepared, n)]


def merge(
    params: MergeParams, base_dir: Path, adapter_dir: Path, prepared: Path, out: Path
) -> dict[str, Any]:
    """Merge into `out` (an empty temp dir), verify it, return the report; raise if it differs.
    A vision-language model is checked on samples with their images (stages/merge/vision.py)."""
    from stages.core.devices import choose_placement, detect_hardware

    placement = choose_placement("merge", detect_hardware(), params.device)
    trained = read_trained(adapter_dir)
    carry_remote_code(adapter_dir, out)
    if is_vision_model(base_dir):
        return merge_vision(params, trained, placement, base_dir, adapter_dir, prepared, out)
    return _merge_text(params, trained, placement, base_dir, adapter_dir, prepared, out)


def _merge_text(
    params: MergeParams,
    trained: dict[str, Any],
    placement: Placement,
    base_dir: Path,
    adapter_dir: Path,
    prepared: Path,
    out: Path,
) -> dict[str, Any]:
    """A text model: folded, saved, read back and checked on prepared samples."""
    method = trained["method"]
    batches = check_batches(prepared, params.check_samples)
    extra: dict[str, Any] = {}
    if method == "full":  # nothing to fold in: merge only converts dtype/shards
        merged = load_causal_lm(adapter_dir, "float32", **placement.load_kwargs())
        reference = logits_on(merged, batches, params.check_dtype)
        merged.to(torch_dtype("float32"))
    elif method == "qlora":
        merged, reference, extra = merge_qlora(params, trained["train"], base_dir, adapter_dir, batches, placement)
    else:
        merged, reference = _merge_adapter(params, base_dir, adapter_dir, batches, placement)
    tied = save_merged(merged, load_tokenizer(adapter_dir), out, params)
    del merged
    gc.collect()

    # What eval loads, read back from disk.
    reloaded = load_causal_lm(out, params.dtype, **placement.load_kwargs())
    if tied and reloaded.get_output_embeddings().weight is not reloaded.get_input_embeddings().weight:
        raise SftflowError("tied embeddings came back untied from disk", path=out)  # tie_word_embeddings lost: lm_head would be saved as a second copy
    # one sample's logits at a time, compared with every reference as they come
    gaps = compare_each(
        {"check": reference, **extra.pop("_compare_saved_with", {})}, logits_of(reloaded, batches, params.check_dtype)
    )
    del reloaded
    check = gaps.pop("check")
    extra.update(gaps)
    checked = {"samples_checked": len(batches), "tokens_checked": sum(int(b["input_ids"].numel()) for b in batches)}
    report = build_report(params, trained, reference, checked, check, tied, adapter_dir, out, extra)
    return write_report(report, check, params, adapter_dir, out)


def read_trained(adapter_dir: Path) -> dict[str, Any]:
    """The train stage's record of what it trained: {"method", "params": the train section}."""
    path = Path(adapter_dir) / "sftflow_train.json"
    if not path.exists():
        raise SftflowError("not a train output: sftflow_train.json is missing", path=path)
    verify_dir(Path(adapter_dir))  # the adapter's weights as train wrote them, before they are folded in
    trained = read_json(path)
    if trained.get("method") not in ("lora", "qlora", "full") or not isinstance(trained.get("params"), dict):
        raise SftflowError('expected {"method": lora|qlora|full, "params": {...}}', path=path, field="method")
    try:  # through the schema: the same defaults and checks as the run that trained
        trained["train"] = parse_params({"train": trained["params"]}).train
    except SftflowError as e:
        raise SftflowError(f"the trained run's params do not validate: {e.reason}", path=path, field="params") from e
    return trained


# ---------------------------------------------------------------- lora / dora


def _merge_adapter(
    params: MergeParams, base_dir: Path, adapter_dir: Path, batches: list[dict[str, Any]], placement: Placement
) -> tuple[Any, list[Any]]:
    """fp32 base + adapter, where `placement` puts the merge: reference logits in check dtype,
    then the fp32 merge."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base_dir, "float32", **placement.load_kwargs()), str(adapter_dir))
    reference = logits_on(model, batches, params.check_dtype)
    model.to(torch_dtype("float32"))  # merge in fp32, whatever the check dtype
    return model.merge_and_unload(), reference

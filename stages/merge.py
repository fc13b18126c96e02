"""Stage `merge`: base + adapter -> one plain model, proven equal to what was trained.

The base is loaded in full precision (never 4-bit), the adapter applied and folded in with
`merge_and_unload`, the result saved as safetensors with the tokenizer, then *reloaded from
disk* and compared with base+adapter on prepared eval samples: the stage fails when the max
|Δlogits| exceeds `merge.max_abs_diff`, so a broken merge never reaches eval.

The comparison runs in `merge.check_dtype` (float64 by default). Measured on the default
pipeline (SmolLM2-135M, 30 layers, logits up to 55): fp32 forward passes of base+adapter and
merged differ by 8.4e-5 from arithmetic order alone, a hair under 1e-4, while in float64 the
same weights differ by 1.6e-5 — the rounding of W + BA·s to fp32, i.e. the merge itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.errors import SftflowError
from stages.io import read_json, write_json
from stages.models import load_causal_lm, load_tokenizer, torch_dtype
from stages.params import MergeParams, to_dict


def check_batches(prepared: Path, n: int) -> list[Any]:
    """Up to n prepared samples (eval split first, else train) as 1-row tensors."""
    import torch
    from datasets import load_from_disk

    counts = read_json(prepared / "manifest.json")["counts"]
    rows: list[list[int]] = []
    for split in ("eval", "train"):
        path = prepared / split
        if counts.get(split) and len(rows) < n:  # empty splits have no shards to load
            ds = load_from_disk(str(path))
            rows += [list(ds[i]["input_ids"]) for i in range(min(n - len(rows), len(ds)))]
    if not rows:
        raise SftflowError("no prepared samples to check the merge on", path=prepared)
    return [torch.tensor([r], dtype=torch.long) for r in rows]


def logits_on(model: Any, batches: list[Any], dtype: str = "float32") -> list[Any]:
    """Logits of `model` cast to `dtype` (the cast is on a model nobody reuses afterwards)."""
    import torch

    model.to(torch_dtype(dtype)).eval()
    with torch.no_grad():
        return [model(input_ids=b).logits.double() for b in batches]


def merge(
    params: MergeParams, base_dir: Path, adapter_dir: Path, prepared: Path, out: Path
) -> dict[str, Any]:
    """Merge into `out` (an empty temp dir), verify it, return the report; raise if it differs."""
    from peft import PeftModel

    trained = read_json(adapter_dir / "sftflow_train.json")
    batches = check_batches(prepared, params.check_samples)
    if trained["method"] == "full":  # nothing to fold in: merge only converts dtype/shards
        reference_model = load_causal_lm(adapter_dir, "float32")
        reference = logits_on(reference_model, batches, params.check_dtype)
        merged = reference_model
    else:
        reference_model = PeftModel.from_pretrained(load_causal_lm(base_dir, "float32"), str(adapter_dir))
        reference = logits_on(reference_model, batches, params.check_dtype)
        reference_model.to(torch_dtype("float32"))  # merge in fp32, whatever the check dtype
        merged = reference_model.merge_and_unload()
    merged = merged.to(torch_dtype(params.dtype))
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(adapter_dir).save_pretrained(out)
    del merged, reference_model

    # What eval loads, read back from disk.
    reloaded = logits_on(load_causal_lm(out, params.dtype), batches, params.check_dtype)
    diffs = [(r - m).abs() for r, m in zip(reference, reloaded)]
    max_abs = max(float(d.max()) for d in diffs)
    mean_abs = sum(float(d.mean()) for d in diffs) / len(diffs)
    agree = [float((r.argmax(-1) == m.argmax(-1)).float().mean()) for r, m in zip(reference, reloaded)]
    report = {
        "method": trained["method"],
        "dtype": params.dtype,
        "check_dtype": params.check_dtype,
        "max_abs_logit": max(float(r.abs().max()) for r in reference),
        "samples_checked": len(batches),
        "tokens_checked": sum(int(b.numel()) for b in batches),
        "max_abs_diff": max_abs,
        "mean_abs_diff": mean_abs,
        "greedy_agreement": sum(agree) / len(agree),
        "threshold": params.max_abs_diff,
        "size_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "params": to_dict(params),
    }
    write_json(out / "sftflow_merge.json", report)
    if max_abs > params.max_abs_diff:
        raise SftflowError(
            f"merged logits differ from base+adapter by {max_abs:.3g} > merge.max_abs_diff {params.max_abs_diff:g}",
            path=adapter_dir,
            field="merge.max_abs_diff",
        )
    return report

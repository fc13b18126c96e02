"""The merge's proof, for text and vision-language models alike: the prepared samples it runs
on, the logits figures, and the report that refuses a merge whose logits moved too far."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.io import read_json, write_json
from stages.core.params import MergeParams, to_dict


def check_rows(prepared: Path, n: int) -> list[dict[str, Any]]:
    """Up to n prepared samples (eval split first, else train), as rows of the shards."""
    from datasets import load_from_disk

    counts = read_json(prepared / "manifest.json")["counts"]
    rows: list[dict[str, Any]] = []
    for split in ("eval", "train"):
        if counts.get(split) and len(rows) < n:  # empty splits have no shards to load
            ds = load_from_disk(str(prepared / split))
            rows += [ds[i] for i in range(min(n - len(rows), len(ds)))]
    if not rows:
        raise SftflowError("no prepared samples to check the merge on", path=prepared)
    return rows


def compare(reference: list[Any], other: list[Any]) -> dict[str, float]:
    """max / mean |Δlogits| and how often the greedy next token agrees, over all positions."""
    diffs = [(r - o).abs() for r, o in zip(reference, other, strict=True)]
    tokens = sum(d.shape[1] for d in diffs)
    agree = sum(int((r.argmax(-1) == o.argmax(-1)).sum()) for r, o in zip(reference, other, strict=True))
    return {
        "max_abs_diff": max(float(d.max()) for d in diffs),
        "mean_abs_diff": sum(float(d.mean(-1).sum()) for d in diffs) / tokens,
        "greedy_agreement": agree / tokens,
    }


def build_report(
    params: MergeParams,
    trained: dict[str, Any],
    reference: list[Any],
    checked: dict[str, int],
    check: dict[str, float],
    tied: bool,
    adapter_dir: Path,
    out: Path,
    extra: dict[str, Any] | None = None,
    vision: bool = False,
) -> dict[str, Any]:
    """The merge report: what was merged, what the check ran on (`checked`: samples, tokens,
    images), its figures (`check`) and the saved model's size; `extra` holds the method's own
    entries (qlora's base choice)."""
    method = trained["method"]
    shards = sorted(out.glob("*.safetensors"))
    return {
        "method": method,
        **({"vision_language": True} if vision else {}),
        "use_dora": trained["train"].lora.use_dora if method != "full" else False,
        "dtype": params.dtype,
        "check_dtype": params.check_dtype,
        "max_abs_logit": max(float(r.abs().max()) for r in reference),
        **checked,
        **check,
        "threshold": params.max_abs_diff,
        "tied_embeddings": tied,
        "size_bytes": sum(f.stat().st_size for f in shards),
        "shards": len(shards),
        "adapter_size_bytes": sum(f.stat().st_size for f in Path(adapter_dir).glob("*.safetensors")),
        **(extra or {}),
        "params": to_dict(params),
    }


def write_report(
    report: dict[str, Any], check: dict[str, float], params: MergeParams, adapter_dir: Path, out: Path
) -> dict[str, Any]:
    """Save the merge report beside the model, then refuse a merge whose logits moved too far
    (the report stays, so the figures that failed can be read)."""
    write_json(out / "sftflow_merge.json", report)
    if check["max_abs_diff"] > params.max_abs_diff:
        raise SftflowError(
            f"merged logits differ from base+adapter by {check['max_abs_diff']:.3g}"
            f" > merge.max_abs_diff {params.max_abs_diff:g}",
            path=adapter_dir,
            field="merge.max_abs_diff",
        )
    return report

"""The merge's proof, for text and vision-language models alike: the prepared samples it runs
on, the logits figures, and the report that refuses a merge whose logits moved too far.

Logits stay where the model computed them (its output device: the GPU when the merge runs
there) and in the dtype it computed them in (`merge.check_dtype`, or the 4-bit model's compute
dtype). The comparison walks each sample in chunks of positions on that device and upcasts one
chunk at a time to float64: a sample's logits are positions x vocabulary (2048 x 151936 in
float64 is 2.5 GB), so no float64 copy of a whole sequence is ever made, on the host or on the
GPU. The figures are those of the whole-tensor comparison: the max and the greedy agreement are
exact per position, the mean is a float64 sum of per-position means.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.integrity import verify_dir
from stages.core.io import read_json, write_json
from stages.core.params import MergeParams, to_dict


def check_rows(prepared: Path, n: int) -> list[dict[str, Any]]:
    """Up to n prepared samples (eval split first, else train), as rows of the shards."""
    from datasets import load_from_disk

    verify_dir(prepared)
    counts = read_json(prepared / "manifest.json")["counts"]
    rows: list[dict[str, Any]] = []
    for split in ("eval", "train"):
        if counts.get(split) and len(rows) < n:  # empty splits have no shards to load
            ds = load_from_disk(str(prepared / split))
            rows += [ds[i] for i in range(min(n - len(rows), len(ds)))]
    if not rows:
        raise SftflowError("no prepared samples to check the merge on", path=prepared)
    return rows


CHUNK_BYTES = 64 * 2**20  # one float64 chunk of logits: two of them and their difference live at once


def chunk_positions(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk of logits in float64 stays within `budget` bytes.

    >>> chunk_positions(151936), chunk_positions(49152), chunk_positions(10**9)
    (55, 170, 1)
    """
    return max(1, budget // (8 * vocab))


class Gap:
    """Running max / mean |Δlogits| and greedy agreement between pairs of logits, compared in
    chunks of positions on the reference's device, each chunk upcast to float64 alone."""

    def __init__(self, positions: int | None = None) -> None:
        self.positions = positions  # per chunk; None: chunk_positions of the vocabulary
        self.max, self.abs_sum, self.agree, self.tokens = 0.0, 0.0, 0, 0

    def add(self, reference: Any, other: Any) -> None:
        if reference.shape != other.shape:
            raise SftflowError(f"logits of shape {tuple(other.shape)} to compare with {tuple(reference.shape)}")
        vocab = reference.shape[-1]
        ref, oth = reference.reshape(-1, vocab), other.reshape(-1, vocab)
        step = self.positions or chunk_positions(vocab)
        for start in range(0, ref.shape[0], step):
            r = ref[start : start + step].double()
            o = oth[start : start + step].to(r.device).double()
            d = (r - o).abs()
            top = float(d.max())
            self.max = max(self.max, top if top == top else float("inf"))  # NaN logits fail the check
            self.abs_sum += float(d.mean(-1).sum())
            self.agree += int((r.argmax(-1) == o.argmax(-1)).sum())
            self.tokens += r.shape[0]

    def figures(self) -> dict[str, float]:
        return {
            "max_abs_diff": self.max,
            "mean_abs_diff": self.abs_sum / self.tokens,
            "greedy_agreement": self.agree / self.tokens,
        }


def compare(reference: list[Any], other: list[Any], positions: int | None = None) -> dict[str, float]:
    """max / mean |Δlogits| and how often the greedy next token agrees, over all positions."""
    gap = Gap(positions)
    for r, o in zip(reference, other, strict=True):
        gap.add(r, o)
    return gap.figures()


def compare_each(references: dict[str, list[Any]], outputs: Iterable[Any]) -> dict[str, dict[str, float]]:
    """`compare` of each named reference with one stream of logits (one sample's at a time:
    the model under test never holds all its logits at once)."""
    gaps = {name: Gap() for name in references}
    n = 0
    for n, out in enumerate(outputs, 1):
        for name, ref in references.items():
            gaps[name].add(ref[n - 1], out)
    if any(len(ref) != n for ref in references.values()):
        raise SftflowError(f"{n} samples of logits to compare with {[len(r) for r in references.values()]}")
    return {name: gap.figures() for name, gap in gaps.items()}


def logits_of(model: Any, batches: list[dict[str, Any]], dtype: str | None) -> Iterator[Any]:
    """Logits of `model` cast to `dtype` (in place, now; None: as it is, e.g. 4-bit), one 1-row
    batch at a time, left on the model's output device in that dtype. Each batch moves to the
    model's input device; pixels (vision-language models) go in `dtype`, or stay float32 for a
    model used as it is (its vision tower casts them to its own dtype)."""
    from stages.core.loading import torch_dtype

    if dtype is not None:
        model.to(torch_dtype(dtype))
    model.eval()
    return _forward(model, batches, None if dtype is None else torch_dtype(dtype))


def logits_on(model: Any, batches: list[dict[str, Any]], dtype: str | None) -> list[Any]:
    """`logits_of` every batch, kept (the references a model reloaded later is compared with)."""
    return list(logits_of(model, batches, dtype))


def _forward(model: Any, batches: list[dict[str, Any]], pixel_dtype: Any) -> Iterator[Any]:
    import torch

    from stages.core.devices import input_device

    device = input_device(model)
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items()}
        if pixel_dtype is not None and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
        with torch.no_grad():
            out = model(**inputs).logits
        yield out


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
        "max_abs_logit": max(max(float(r.max()), -float(r.min())) for r in reference),  # no |r| copy
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

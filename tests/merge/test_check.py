"""The merge's logits check: compared in chunks of positions, each chunk upcast to float64 alone,
with the figures of the whole-tensor comparison; logits kept on the model's device in its dtype."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from stages.core.errors import SftflowError
from stages.core.params import MergeParams
from stages.merge.check import Gap, compare, compare_each, logits_on, write_report


def samples(seed: int = 0, lengths: tuple[int, ...] = (37, 12, 1), vocab: int = 1000) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, vocab, generator=gen) * 10 for n in lengths]


def whole(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """The comparison as it was: every sample's logits in float64 at once."""
    diffs = [(r.double() - o.double()).abs() for r, o in zip(reference, other)]
    tokens = sum(d.shape[1] for d in diffs)
    return {
        "max_abs_diff": max(float(d.max()) for d in diffs),
        "mean_abs_diff": sum(float(d.mean(-1).sum()) for d in diffs) / tokens,
        "greedy_agreement": sum(int((r.argmax(-1) == o.argmax(-1)).sum()) for r, o in zip(reference, other)) / tokens,
    }


@pytest.mark.parametrize("positions", [1, 5, 7, 36, None])
def test_chunked_comparison_equals_the_whole_tensor_one(positions: int | None) -> None:
    reference = samples(0)
    other = [r + torch.randn(r.shape, generator=torch.Generator().manual_seed(1)) * 1e-3 for r in reference]
    other[0][0, 3] = other[0][0, 3].flip(-1)  # a position whose greedy token differs
    got, want = compare(reference, other, positions), whole(reference, other)
    assert got["max_abs_diff"] == want["max_abs_diff"]  # the max is exact, chunked or not
    assert got["mean_abs_diff"] == pytest.approx(want["mean_abs_diff"], rel=1e-12)
    assert got["greedy_agreement"] == want["greedy_agreement"] == 49 / 50


@pytest.mark.parametrize("position", [0, 4, 5, 34, 35, 36])
def test_a_difference_planted_in_one_chunk_is_found(position: int) -> None:
    """Chunks of 5 positions over 37: the first, the edges of a chunk and the short last one."""
    reference = samples(2)
    other = [r.clone() for r in reference]
    other[0][0, position, 17] += 0.5
    other[0][0, position, 900] = 1e3  # and its greedy token moves
    assert compare(reference, other, positions=5)["max_abs_diff"] == pytest.approx(1e3 - float(reference[0][0, position, 900]))
    assert compare(reference, other, positions=5)["greedy_agreement"] == 49 / 50
    other[0][0, position, 900] = reference[0][0, position, 900]
    got = compare(reference, other, positions=5)
    assert got["max_abs_diff"] == pytest.approx(0.5, abs=1e-5) and got["greedy_agreement"] == 1.0
    assert got["mean_abs_diff"] == pytest.approx(0.5 / 1000 / 50, rel=1e-4)


def test_float32_logits_are_upcast_chunk_by_chunk_not_rounded_in_float32() -> None:
    """1e8 + 1 vs 1e8 differ by 1 in float64 arithmetic of the float32 values (representable)."""
    reference = [torch.full((1, 4, 8), 1e8, dtype=torch.float32)]
    other = [reference[0].clone()]
    other[0][0, 2, 3] = 1e8 + 8  # float32 spacing at 1e8 is 8
    assert compare(reference, other, positions=1)["max_abs_diff"] == 8.0


def test_nan_logits_fail_the_check(tmp_path: Any) -> None:
    reference = samples(3)
    other = [r.clone() for r in reference]
    other[1][0, 5, 2] = float("nan")
    check = compare(reference, other, positions=4)
    assert check["max_abs_diff"] == float("inf")
    with pytest.raises(SftflowError) as err:
        write_report({"max_abs_diff": check["max_abs_diff"]}, check, MergeParams(), tmp_path, tmp_path)
    assert err.value.field == "merge.max_abs_diff"


def test_one_stream_of_logits_against_several_references() -> None:
    reference, closer, farther = samples(4), samples(5), samples(6)
    stream = (r + 0.25 * c for r, c in zip(reference, closer))  # consumed once, one sample at a time
    got = compare_each({"check": reference, "other": farther}, stream)
    mixed = [r + 0.25 * c for r, c in zip(reference, closer)]
    assert got == {"check": compare(reference, mixed), "other": compare(farther, mixed)}
    with pytest.raises(SftflowError, match="samples of logits"):
        compare_each({"check": reference}, iter(mixed[:2]))
    with pytest.raises(SftflowError, match="shape"):
        Gap().add(reference[0], reference[1])


class Tiny(torch.nn.Module):
    """A stand-in model: logits from an embedding, pixels summed into them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.pixel_dtypes: list[torch.dtype] = []

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> Any:
        from types import SimpleNamespace

        out = self.emb(input_ids)
        if pixel_values is not None:
            self.pixel_dtypes.append(pixel_values.dtype)
            out = out + pixel_values.sum().to(out.dtype)
        return SimpleNamespace(logits=out)


@pytest.mark.parametrize("dtype", ["float32", "float64", None])
def test_logits_stay_in_the_check_dtype_on_the_models_device(dtype: str | None) -> None:
    model = Tiny()
    batches = [{"input_ids": torch.tensor([[1, 2, 3]]), "pixel_values": torch.ones(2, 3)}]
    (logits,) = logits_on(model, batches, dtype)
    want = {"float32": torch.float32, "float64": torch.float64, None: torch.float32}[dtype]
    assert logits.dtype == want and logits.device == model.emb.weight.device
    assert model.pixel_dtypes == [want] and not logits.requires_grad


def test_a_merge_asked_to_run_on_cuda_without_one_is_refused_before_loading(tmp_path: Any) -> None:
    """The merge asks choose_placement first (text and VLM alike): no GPU here, so device cuda
    names the key before any model, adapter or sample is read (none exist at these paths)."""
    from stages.merge.fold import merge

    with pytest.raises(SftflowError) as err:
        merge(MergeParams(device="cuda"), tmp_path / "base", tmp_path / "adapter", tmp_path / "prepared", tmp_path / "out")
    assert err.value.field == "merge.device"

"""Videos through train (Qwen2.5-VL, Qwen3-VL): the collator hands the model what its processor
gives for the real file, a padded step with videos has a finite loss whose gradients reach the
language model and the vision tower, and the run plan pads data that holds videos (and says why)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stages.core.chats import IGNORE_INDEX
from stages.core.errors import SftflowError
from tests.video import VIDEO_FAMILIES, Built, build, media_folder, prepare, processor_output, records

CASES = ("video", "video_and_image")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media_folder(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def prepared(built: Built, media: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """(case -> prepared row, the prepared folder)."""
    work = tmp_path_factory.mktemp(f"prep-{built.name}")
    recs = records(media)
    rows, _, _ = prepare(work / "p", built.base, [recs[c] for c in CASES])
    return dict(zip(CASES, rows)), work / "p" / "out"


def _rows(prepared: tuple[dict, Path]) -> list[dict]:
    return [{k: prepared[0][c][k] for k in ("input_ids", "labels", "images", "videos")} for c in CASES]


@pytest.mark.parametrize("case", CASES)
def test_collator_gives_what_the_processor_gives_for_the_real_file(built: Built, prepared: tuple, media: Path,
                                                                   case: str) -> None:
    """Decoding only the frames the video processor samples, with the metadata prepare counted
    with, gives exactly the processor's own inputs for the whole decoded file: the same pixels,
    grids, Qwen2.5-VL's seconds per temporal patch, and mm_token_type_ids (2 on video tokens)."""
    import torch

    from stages.core.vision import VisionCollator

    b = built
    want = processor_output(b.processor, media, case)
    row = prepared[0][case]
    got = VisionCollator(b.processor, b.family, b.processor.tokenizer.pad_token_id, packing=False)(
        [{k: row[k] for k in ("input_ids", "labels", "images", "videos")}])
    keys = {k for k in want if k not in ("attention_mask",)}
    assert keys <= set(got) and "pixel_values_videos" in keys
    assert ("second_per_grid_ts" in keys) == (b.name == "qwen2_5_vl")
    for k in sorted(keys):
        assert torch.equal(torch.as_tensor(got[k]), torch.as_tensor(want[k])), k
    assert int((got["mm_token_type_ids"] == 2).sum()) == row["input_ids"].count(b.processor.video_token_id) > 0


def test_padded_step_with_videos_trains(built: Built, prepared: tuple) -> None:
    """One fp32 step on a video chat and a video + image chat, padded: a finite loss, gradients
    in the language model and in the vision tower (the video's features reach the loss)."""
    import torch

    from stages.core.vision import VisionCollator, language_model_prefix, load_vlm, vision_tower_prefix

    b = built
    torch.manual_seed(0)
    model = load_vlm(b.base, "float32")
    model.train()
    batch = VisionCollator(b.processor, b.family, b.processor.tokenizer.pad_token_id, packing=False)(_rows(prepared))
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX)
    assert math.isfinite(loss.item()) and loss.item() > 1.0
    loss.backward()
    for prefix in (language_model_prefix(model, b.family), vision_tower_prefix(model, b.family)):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix + ".") and p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), prefix


def test_plan_pads_data_with_videos(built: Built, prepared: tuple, tmp_path: Path) -> None:
    """The plan (the one place train decides packing) pads when the prepared manifest lists
    videos, with the reason; image-only data keeps the family's packing. A packed collator
    handed video rows refuses them rather than build wrong positions."""
    import json

    from stages.core.params import TrainParams
    from stages.core.vision import VisionCollator
    from stages.train.plan import Machine, decide
    from stages.train.trainer import prepared_videos

    b = built
    assert prepared_videos(prepared[1])
    manifest = json.loads((prepared[1] / "manifest.json").read_text())
    images_only = tmp_path / "images_only"
    images_only.mkdir()
    manifest["vision"] = {k: v for k, v in manifest["vision"].items() if not k.startswith("video")}
    (images_only / "manifest.json").write_text(json.dumps(manifest))
    assert not prepared_videos(images_only)
    plan = decide(TrainParams(), Machine(), vision=b.family, videos=prepared_videos(prepared[1]), env={})
    assert plan.packing == "none" and "video" in plan.why["packing"] and plan.attention == "sdpa"
    assert plan.report()["why"]["packing"] == plan.why["packing"]
    assert decide(TrainParams(), Machine(), vision=b.family, videos=False, env={}).packing == "auto"
    with pytest.raises(SftflowError, match="video rows train in padded batches"):
        VisionCollator(b.processor, b.family, 0, packing=True)(_rows(prepared))

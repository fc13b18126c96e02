"""Image chats through prepare: record shapes, exact masks, bad images, image token counts, truncation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stages.core.chats import IGNORE_INDEX
from stages.core.errors import SftflowError
from stages.core.params import DataParams, SourceParams
from tests.vlm import BOUNDS, END, PAD, START, chats_in_each_shape, prepare_rows, trained_spans


def image_grids(base: Path, paths: list[Path]) -> list[tuple[int, int, int]]:
    """The model's own processor's (t, h, w) patch grid of each image, resizing within BOUNDS."""
    from PIL import Image

    from stages.core.vision import load_processor

    processor = load_processor(base, BOUNDS.min_pixels, BOUNDS.max_pixels)
    out = processor.image_processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    return [tuple(g) for g in out["image_grid_thw"].tolist()]


@pytest.mark.parametrize("shape", ["llamafactory", "hf_parts", "minicpmv"])
@pytest.mark.parametrize("train_on", ["assistant", "last_turn", "all"])
def test_masks_exact_in_every_shape(tmp_path: Path, vlm_base: Path, images: Path, shape: str, train_on: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vlm_base)
    record = chats_in_each_shape(str(images))[shape]
    rows, report, _ = prepare_rows(tmp_path, vlm_base, [record], train_on=train_on)
    (row,) = rows
    ids, labels = row["input_ids"], row["labels"]
    names = ["wide.png", "small.png"] if shape != "minicpmv" else ["wide.png"]
    assert [(im["size"], im["tokens"]) for im in row["images"]] == [([100, 60], 8), ([56, 56], 4)][: len(names)]
    # exactly the tokens the model will see: the processor's grid for each image, (h/14)(w/14)/4 pads,
    # each image framed by markers
    grids = image_grids(vlm_base, [images / n for n in names])
    assert grids == [(1, 4, 8), (1, 4, 4)][: len(names)]
    assert [t * h * w // 4 for t, h, w in grids] == [im["tokens"] for im in row["images"]]
    assert ids.count(PAD) == sum(im["tokens"] for im in row["images"])
    assert ids.count(START) == ids.count(END) == len(grids)
    assert not {t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX} & {PAD, START, END}
    if train_on == "all":
        assert all((lab == IGNORE_INDEX) == (t in (PAD, START, END)) for t, lab in zip(ids, labels))
        return
    replies = ["Red, mostly.", "Blue."] if train_on == "assistant" else ["Blue."]
    assert [tok.decode(s) for s in trained_spans(ids, labels)] == [f"{r}<|im_end|>" for r in replies]
    assert report["total"]["kept"] == 1


def test_minicpmv_image_goes_before_the_first_question(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    from transformers import AutoTokenizer

    rows, _, _ = prepare_rows(tmp_path, vlm_base, [chats_in_each_shape(str(images))["minicpmv"]])
    text = AutoTokenizer.from_pretrained(vlm_base).decode(rows[0]["input_ids"])
    assert "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 8 + "<|vision_end|>\nWhat colour?" in text


def test_image_paths_relative_to_the_data_file_and_hashed(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    import shutil

    (tmp_path / "pics").mkdir()
    shutil.copy(images / "small.png", tmp_path / "pics" / "a.png")
    record = {"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Blue."}],
              "images": ["pics/a.png"]}
    rows, _, manifest = prepare_rows(tmp_path, vlm_base, [record])
    digest = hashlib.sha256((tmp_path / "pics" / "a.png").read_bytes()).hexdigest()
    assert rows[0]["images"][0]["path"] == str(tmp_path / "pics" / "a.png")
    assert rows[0]["images"][0]["sha256"] == digest
    assert manifest["vision"]["images_sha256"] == {str(tmp_path / "pics" / "a.png"): digest}


BAD = {
    "image_not_found": ({"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo."}],
                         "images": ["{d}/nope.png"]}, "images[0]: image file not found"),
    "unreadable_image": ({"image": "{d}/notes.png", "conversations": [{"role": "user", "content": "<image>Hi"},
                                                                     {"role": "assistant", "content": "Yo."}]},
                         "image: not a readable image"),
    "unreadable_image_truncated": ({"messages": [{"role": "user", "content": [{"type": "image", "image": "{d}/cut.png"}]},
                                                 {"role": "assistant", "content": "Yo."}]},
                                   "messages[0].content[0].image: not a readable image"),
    "image_count_mismatch": ({"conversations": [{"from": "human", "value": "<image><image>Hi"},
                                                {"from": "gpt", "value": "Yo."}], "images": ["{d}/small.png"]},
                             "images: 2 <image> placeholders for 1 image(s)"),
    "image_in_assistant_turn": ({"messages": [{"role": "user", "content": "Draw."},
                                              {"role": "assistant", "content": [{"type": "image", "image": "{d}/small.png"}]}]},
                                "messages[1].content[0]: an image in an assistant or system turn"),
    "image_in_assistant_turn_placeholder": ({"conversations": [{"from": "human", "value": "<image>Hi"},
                                                              {"from": "gpt", "value": "<image>"}],
                                             "images": ["{d}/small.png"]},
                                            "conversations[1].value: an image in an assistant or system turn"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_image_error_names_file_line_field(tmp_path: Path, vlm_base: Path, images: Path, case: str) -> None:
    good = chats_in_each_shape(str(images))["llamafactory"]
    bad = json.loads(json.dumps(BAD[case][0]).replace("{d}", str(images)))
    with pytest.raises(SftflowError) as err:
        prepare_rows(tmp_path, vlm_base, [good, bad])
    assert f"chats.jsonl:2: {BAD[case][1]}" in str(err.value)


def test_bad_images_skipped_and_counted(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    good = chats_in_each_shape(str(images))["llamafactory"]
    bad = [json.loads(json.dumps(BAD[c][0]).replace("{d}", str(images))) for c in sorted(BAD)]
    rows, report, _ = prepare_rows(tmp_path, vlm_base, [good, *bad], on_bad_record="skip")
    assert len(rows) == 1
    skipped = next(iter(report["sources"].values()))["skipped"]
    assert skipped == {"image_not_found": 1, "unreadable_image": 2, "image_count_mismatch": 1,
                       "image_in_assistant_turn": 2}
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4, 5, 6, 7]


def test_image_chat_refused_by_a_text_model(tmp_path: Path, tiny_base: Path, images: Path) -> None:
    from stages.prepare.shards import prepare

    raw = tmp_path / "chats.jsonl"
    raw.write_text(json.dumps(chats_in_each_shape(str(images))["hf_parts"]) + "\n")
    with pytest.raises(SftflowError, match=r"chats\.jsonl:1: this chat holds images, but models/base is a text-only"):
        prepare(DataParams(sources=(SourceParams(path=str(raw)),)), tiny_base, tmp_path / "out")


def test_cut_never_splits_an_image(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vlm_base)
    record = chats_in_each_shape(str(images))["llamafactory"]
    rows, _, _ = prepare_rows(tmp_path / "full", vlm_base, [record])
    ids = rows[0]["input_ids"]
    second = [i for i, t in enumerate(ids) if t == START][1]
    cut = second + 3  # inside the second image's tokens
    rows, report, _ = prepare_rows(tmp_path / "cut", vlm_base, [record], max_length=cut, truncation="truncate")
    (row,) = rows
    assert row["input_ids"] == ids[:second]  # cut before <|vision_start|>
    assert len(row["images"]) == 1
    assert report["total"]["truncated_before_image"] == 1 and report["total"]["truncated"] == 1
    assert tok.decode(trained_spans(row["input_ids"], row["labels"])[0]) == "Red, mostly.<|im_end|>"
    short = {"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo."}],
             "images": [f"{images}/small.png"]}
    kept, dropped, _ = prepare_rows(tmp_path / "drop", vlm_base, [record, short], max_length=cut)
    assert len(kept) == 1 and next(iter(dropped["sources"].values()))["dropped"] == {"too_long": 1}



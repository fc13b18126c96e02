"""Videos through prepare (Qwen2.5-VL, Qwen3-VL): the prepared ids are exactly what the model's
processor returns for the chat and the real video file (its frame sampling, Qwen3-VL's
timestamps), masks exact with no video token trained, truncation before a video, bad videos
named by file:line:field or counted, and what the shards, report and manifest say of videos."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path

import pytest

from stages.core.chats import IGNORE_INDEX
from stages.core.errors import SftflowError
from tests.video import (
    GIF,
    MP4,
    REPLIES,
    VIDEO_FAMILIES,
    Built,
    build,
    conversation,
    files,
    media_folder,
    prepare,
    processor_output,
    records,
)
from tests.vlm import trained_spans

CASES = ("video", "video_and_image")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media_folder(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def prepared(built: Built, media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """train_on -> (rows by case, report, manifest): one prepare of both chats per train_on."""
    work = tmp_path_factory.mktemp(f"prep-{built.name}")
    recs = records(media)
    out = {}
    for train_on in ("assistant", "all"):
        rows, report, manifest = prepare(work / train_on, built.base, [recs[c] for c in CASES], train_on=train_on)
        out[train_on] = (dict(zip(CASES, rows)), report, manifest)
    return out


def media_spans(b: Built, want: list[int], case: str) -> list[tuple[int, int]]:
    """[start, end) of each image's and video's tokens in the processor's ids: what the rendered
    chat (one placeholder token per medium) does not hold, with the chat template's own markers
    right around it."""
    tok = b.processor.tokenizer
    text = b.processor.apply_chat_template(conversation(case), tokenize=False)
    holders = {b.processor.image_token_id, b.processor.video_token_id}
    plain = [-1 if t in holders else t for t in tok(text, add_special_tokens=False)["input_ids"]]
    config = json.loads((b.base / "config.json").read_text())
    start, end = config["vision_start_token_id"], config["vision_end_token_id"]
    spans = []
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, plain, want, autojunk=False).get_opcodes():
        if tag in ("replace", "insert") and j2 > j1:
            j1 -= j1 > 0 and want[j1 - 1] == start
            j2 += j2 < len(want) and want[j2] == end
            spans.append((j1, j2))
    assert len(spans) == sum(map(len, files(Path("."), case)))
    return spans


@pytest.mark.parametrize("case", CASES)
def test_prepared_ids_are_the_processors_for_the_real_file(built: Built, prepared: dict, media: Path, case: str) -> None:
    """prepare reads only each video's header, yet its ids are what the processor returns for
    the real file: every frame decoded and sampled by the processor's own settings (Qwen3-VL: 2
    fps, each pair of frames behind its timestamp). The shards' entry holds the header's figures
    and the file's sha256; the tokens it counts are the processor's video tokens."""
    b = built
    got = processor_output(b.processor, media, case)
    want = got["input_ids"][0].tolist()
    video_token = b.processor.video_token_id
    for train_on in ("assistant", "all"):
        assert prepared[train_on][0][case]["input_ids"] == want
    row = prepared["assistant"][0][case]
    (video,), images = files(media, case)
    shape = MP4 if video.suffix == ".mp4" else GIF
    (entry,) = row["videos"]
    assert entry["path"] == str(video) and entry["sha256"] == hashlib.sha256(video.read_bytes()).hexdigest()
    assert (entry["frames"], entry["size"], entry["fps"]) == (shape["frames"], [shape["width"], shape["height"]],
                                                              shape["fps"])
    t, h, w = got["video_grid_thw"][0].tolist()
    assert want.count(video_token) == t * h * w // 4 > 0
    spans = media_spans(b, want, case)
    assert entry["tokens"] <= spans[0][1] - spans[0][0]  # its text, inside the template's markers
    assert [im["path"] for im in row["images"]] == [str(p) for p in images]
    if b.name == "qwen3_vl":  # a timestamp per pair of sampled frames, inside the template's markers
        text = b.processor.tokenizer.decode(want[spans[0][0] : spans[0][1]])
        assert text.count(" seconds>") == t and text.startswith("<|vision_start|><")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_masks_exact_and_no_video_token_trained(built: Built, prepared: dict, media: Path, case: str,
                                                train_on: str) -> None:
    """No token of a video (its pads, its frames' markers, Qwen3-VL's timestamps, the template's
    markers around it) or an image carries loss, even under train_on: all; the trained tokens
    decode to exactly the replies."""
    b = built
    row = prepared[train_on][0][case]
    ids, labels = row["input_ids"], row["labels"]
    spans = media_spans(b, ids, case)
    in_media = {i for a, z in spans for i in range(a, z)}
    trained = {i for i, lab in enumerate(labels) if lab != IGNORE_INDEX}
    assert all(labels[i] == ids[i] for i in trained)
    assert not trained & in_media
    assert b.processor.video_token_id in ids and not any(ids[i] == b.processor.video_token_id for i in trained)
    if train_on == "all":
        assert trained == set(range(len(ids))) - in_media
    else:
        tok = b.processor.tokenizer
        assert [tok.decode(s) for s in trained_spans(ids, labels)] == [f"{r}<|im_end|>" for r in REPLIES]


def test_report_and_manifest_count_videos(built: Built, prepared: dict, media: Path) -> None:
    """The report counts videos and their tokens beside the images; the manifest carries the
    video processor's settings (what train resizes and samples with) and each video's sha256."""
    rows, report, manifest = prepared["assistant"]
    videos = report["images"]["videos"]
    assert videos["distinct"] == 2 and videos["per_split"] == {"train": 2, "eval": 0}
    assert videos["video_tokens"]["train"] == sum(v["tokens"] for r in rows.values() for v in r["videos"])
    assert report["images"]["per_split"]["train"] == 1
    vision = manifest["vision"]
    assert set(vision["videos_sha256"]) == {str(media / "clip.mp4"), str(media / "anim.gif")}
    assert vision["video_processor"]["temporal_patch_size"] == 2
    assert vision["video_processor"]["do_sample_frames"] == (built.name == "qwen3_vl")


def test_truncation_never_cuts_inside_a_video(built: Built, media: Path, tmp_path: Path) -> None:
    """truncation: truncate with max_length inside the video: the row ends before the video's
    first token (the template's vision start), keeps no video, and the report counts the cut."""
    b = built
    want = processor_output(b.processor, media, "video")["input_ids"][0].tolist()
    ((first, end),) = media_spans(b, want, "video")
    inside = (first + end) // 2
    rows, report, _ = prepare(tmp_path / "cut", b.base, [records(media)["video"]], train_on="all",
                              truncation="truncate", max_length=inside)
    (row,) = rows
    assert len(row["input_ids"]) == first and row["input_ids"] == want[:first]
    assert row["videos"] == [] and b.processor.video_token_id not in row["input_ids"]
    assert report["total"]["truncated_before_image"] == 1


def _parse(media: Path, record: dict) -> tuple[list, list]:
    from stages.core.image_chats import ImageReader, parse_image_record

    return parse_image_record(record, media / "chats.jsonl", 7, ImageReader())


@pytest.mark.parametrize(
    ("part", "field", "reason"),
    [
        ({"type": "video", "video": "missing.mp4"}, "messages[0].content[0].video", "video_not_found"),
        ({"type": "video", "video": "notes.mp4"}, "messages[0].content[0].video", "unreadable_video"),
        ({"type": "video", "video": "cut.mp4"}, "messages[0].content[0].video", "unreadable_video"),
        ({"type": "video", "video": "../outside.mp4"}, "messages[0].content[0].video", "image_outside_root"),
        ({"type": "video", "video": "https://example.com/a.mp4"}, "messages[0].content[0].video", "video_url"),
        ({"type": "video"}, "messages[0].content[0].video", "bad_video_part"),
    ],
)
def test_bad_video_named_by_file_line_field(media: Path, part: dict, field: str, reason: str) -> None:
    """A missing, unreadable or cut-off video, one outside the data folder, a URL, a part
    without a path: file:line: field: reason, and the reason prepare counts under skip."""
    from stages.prepare.records import _reason_key

    record = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]},
                           {"role": "assistant", "content": "x"}]}
    with pytest.raises(SftflowError) as e:
        _parse(media, record)
    assert str(e.value).startswith(f"{media / 'chats.jsonl'}:7: {field}: ")
    assert _reason_key(e.value) == reason


def test_video_placeholders_count_against_the_videos_list(media: Path) -> None:
    """LLaMA-Factory's shape: one <video> per listed video, in order; media come back in text order."""
    from stages.core.image_chats import ImageRef, VideoRef
    from stages.prepare.records import _reason_key

    turns = [{"from": "human", "value": "<image> then <video>"}, {"from": "gpt", "value": "ok"}]
    messages, refs = _parse(media, {"conversations": turns, "images": ["wide.png"], "videos": ["clip.mp4"]})
    assert [type(r) for r in refs] == [ImageRef, VideoRef]
    assert [p["type"] for p in messages[0]["content"]] == ["image", "text", "video"]
    assert refs[1].shape == (MP4["frames"], MP4["width"], MP4["height"], MP4["fps"])
    with pytest.raises(SftflowError) as e:
        _parse(media, {"conversations": turns, "images": ["wide.png"], "videos": []})
    assert e.value.field == "videos" and _reason_key(e.value) == "video_count_mismatch"


def test_bad_video_skipped_and_counted(built: Built, media: Path, tmp_path: Path) -> None:
    """on_bad_record: skip: a chat with an unreadable video is left out and counted by reason."""
    if built.name != VIDEO_FAMILIES[0]:
        pytest.skip("reading videos does not depend on the family")
    bad = json.loads(json.dumps(records(media)["video"]).replace("clip.mp4", "notes.mp4"))
    rows, report, _ = prepare(tmp_path / "skip", built.base, [records(media)["video"], bad], on_bad_record="skip")
    (source,) = report["sources"].values()
    assert len(rows) == 1 and report["total"]["skipped"] == 1 and source["skipped"] == {"unreadable_video": 1}


def test_a_family_without_videos_refuses_a_video_chat(media: Path, tmp_path: Path) -> None:
    """A video chat for a family sftflow reads no videos for (SmolVLM): file:line and what to do."""
    b = build("smolvlm", tmp_path)
    with pytest.raises(SftflowError, match="SmolVLM takes no videos here") as e:
        prepare(tmp_path / "p", b.base, [records(media)["video"]])
    assert str(e.value).startswith(str(tmp_path / "p" / "chats.jsonl") + ":1: ")

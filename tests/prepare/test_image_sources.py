"""Image chats from every source kind: JSONL/JSON with paths relative to the file or to
`data.image.root`, parquet / CSV / Arrow / save_to_disk / a hub data set (offline, pinned commit)
with paths or with embedded bytes (the `datasets` Image feature) — each the same samples as the
JSONL (exact masks, decoded), the same bad-input rules (`file:line|row: field: reason`, or a
counted skip), embedded images hashed into the manifest, and the held-out eval chats read from
the same sources."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset, DatasetDict, Features, Image, List, Value, load_from_disk

from stages.core.errors import SftflowError
from stages.core.params import ColumnsParams, DataParams, ImageParams, SourceParams
from stages.prepare.shards import prepare
from tests.vlm import BOUNDS, trained_spans

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPLIES = ["Red, mostly.<|im_end|>", "Blue.<|im_end|>"]


def pictures(images: Path, folder: Path) -> dict[str, bytes]:
    """The fixture's two images copied into `folder`; their bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("wide.png", "small.png"):
        shutil.copy(images / name, folder / name)
    return {name: (images / name).read_bytes() for name in ("wide.png", "small.png")}


def shapes(wide: Any, small: Any) -> dict[str, dict]:
    """One two-turn chat (an image in each user turn) in each record shape, every content a list
    of parts or a string as a table can hold it (one type per column)."""
    q1, a1, q2, a2 = "What colour?", "Red, mostly.", "And this one?", "Blue."
    return {
        "llamafactory": {
            "conversations": [{"from": "human", "value": f"<image>{q1}"}, {"from": "gpt", "value": a1},
                              {"from": "human", "value": f"{q2}<image>"}, {"from": "gpt", "value": a2}],
            "images": [wide, small],
        },
        "hf_parts": {
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None, "image": wide},
                                             {"type": "text", "text": q1, "image": None}]},
                {"role": "assistant", "content": [{"type": "text", "text": a1, "image": None}]},
                {"role": "user", "content": [{"type": "text", "text": q2, "image": None},
                                             {"type": "image", "text": None, "image": small}]},
                {"role": "assistant", "content": [{"type": "text", "text": a2, "image": None}]},
            ]
        },
        "minicpmv": {  # MiniCPM-V's one image, placed before the first question (no <image> written)
            "image": wide,
            "conversations": [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                              {"role": "user", "content": q2}, {"role": "assistant", "content": a2}],
        },
        "minicpmv_dict": {  # MiniCPM-V's several images: each name written where its image goes
            "image": {"<image_00>": wide, "<image_01>": small},
            "conversations": [{"role": "user", "content": f"<image_00>{q1}"}, {"role": "assistant", "content": a1},
                              {"role": "user", "content": f"{q2}<image_01>"}, {"role": "assistant", "content": a2}],
        },
    }


TURNS = {"from": Value("string"), "value": Value("string")}
ROLES = {"role": Value("string"), "content": Value("string")}


def image_features(shape: str) -> Features:
    """The `datasets` features of a shape with its images as the Image feature (embedded bytes)."""
    return Features({
        "llamafactory": {"conversations": List(TURNS), "images": List(Image())},
        "hf_parts": {"messages": List({"role": Value("string"), "content": List(
            {"type": Value("string"), "text": Value("string"), "image": Image()})})},
        "minicpmv": {"image": Image(), "conversations": List(ROLES)},
        "minicpmv_dict": {"image": {"<image_00>": Image(), "<image_01>": Image()}, "conversations": List(ROLES)},
    }[shape])


def run(tmp: Path, base: Path, source: dict, **data: Any) -> tuple[list[dict], dict, dict]:
    """prepare one source; (train rows, report, manifest)."""
    params = DataParams(sources=(SourceParams(**source),), image=data.pop("image", BOUNDS), **data)
    out = tmp / "out"
    report = prepare(params, base, out, rejects_path=tmp / "rejects.jsonl")
    return list(load_from_disk(str(out / "train"))), report, json.loads((out / "manifest.json").read_text())


def samples(rows: list[dict]) -> list[tuple]:
    """What must not depend on the source kind: tokens, labels and each image's content, size and tokens."""
    return [(r["input_ids"], r["labels"], [(im["sha256"], im["size"], im["tokens"]) for im in r["images"]])
            for r in rows]


@pytest.mark.parametrize("shape", ["llamafactory", "hf_parts", "minicpmv", "minicpmv_dict"])
def test_every_source_kind_gives_the_jsonl_samples(tmp_path: Path, vlm_base: Path, images: Path, shape: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vlm_base)
    data = tmp_path / "data"
    raw = pictures(images, data / "pics")
    by_path = shapes("pics/wide.png", "pics/small.png")[shape]
    (data / "chats.jsonl").write_text(json.dumps(by_path) + "\n")
    want, _, _ = run(tmp_path / "jsonl", vlm_base, {"path": str(data / "chats.jsonl")})
    (row,) = want
    assert [tok.decode(s) for s in trained_spans(row["input_ids"], row["labels"])] == REPLIES
    assert [(im["size"], im["tokens"]) for im in row["images"]] == [([100, 60], 8), ([56, 56], 4)][
        : 1 if shape == "minicpmv" else 2]
    assert row["images"][0]["path"] == str(data / "pics" / "wide.png")

    # paths: a JSON array, parquet, CSV (JSON text cells), an Arrow file, a save_to_disk folder
    (data / "chats.json").write_text(json.dumps([by_path]))
    paths = Dataset.from_list([by_path])
    paths.to_parquet(data / "chats.parquet")
    Dataset.from_dict({k: [v if isinstance(v, str) else json.dumps(v)] for k, v in by_path.items()}).to_csv(
        data / "chats.csv", index=False)
    paths.save_to_disk(str(data / "folder"))
    # embedded bytes (the Image feature): parquet, a DatasetDict folder, its Arrow file; images far from the data
    cell = {name: {"bytes": b, "path": None} for name, b in raw.items()}
    embedded = Dataset.from_list([shapes(cell["wide.png"], cell["small.png"])[shape]], features=image_features(shape))
    embedded.to_parquet(tmp_path / "elsewhere.parquet")
    DatasetDict({"train": embedded}).save_to_disk(str(tmp_path / "embedded_dict"))
    stored = sorted(f.name for f in (tmp_path / "embedded_dict" / "train").iterdir())
    for i, path in enumerate([data / "chats.json", data / "chats.parquet", data / "chats.csv", data / "folder",
                              tmp_path / "embedded_dict", tmp_path / "embedded_dict" / "train" / "data-00000-of-00001.arrow",
                              tmp_path / "elsewhere.parquet"]):
        got, report, _ = run(tmp_path / f"kind{i}", vlm_base, {"path": str(path)})
        assert samples(got) == samples(want), path
        assert report["sources"][str(path)]["kept"] == 1
    assert sorted(f.name for f in (tmp_path / "embedded_dict" / "train").iterdir()) == stored  # nothing written there


def test_embedded_images_are_written_by_content_and_hashed_into_the_manifest(
    tmp_path: Path, vlm_base: Path, images: Path
) -> None:
    from PIL import Image as PILImage

    raw = pictures(images, tmp_path / "pics")
    cell = {name: {"bytes": b, "path": "ignored.png"} for name, b in raw.items()}
    record = shapes(cell["wide.png"], cell["small.png"])["llamafactory"]
    other = {"bytes": _png((10, 200, 10)), "path": None}
    too_long = llamafactory(other) | {"conversations": [{"from": "human", "value": "<image>Hi"},
                                                        {"from": "gpt", "value": "word " * 1100}]}
    Dataset.from_list([record, too_long], features=image_features("llamafactory")).to_parquet(tmp_path / "a.parquet")
    params = DataParams(sources=(SourceParams(path=str(tmp_path / "a.parquet")),), image=BOUNDS)
    # as `sftflow prepare` runs it: into a temp folder renamed to data/prepared afterwards
    report = prepare(params, vlm_base, tmp_path / "tmp-out", final_out=Path("data/prepared"))
    rows = list(load_from_disk(str(tmp_path / "tmp-out" / "train")))
    manifest = json.loads((tmp_path / "tmp-out" / "manifest.json").read_text())
    import hashlib

    digest = hashlib.sha256(raw["wide.png"]).hexdigest()
    assert rows[0]["images"][0]["path"] == f"data/prepared/images/{digest}.png"
    assert (tmp_path / "tmp-out" / "images" / f"{digest}.png").read_bytes() == raw["wide.png"]
    assert manifest["vision"]["images_sha256"][f"data/prepared/images/{digest}.png"] == digest
    assert report["images"]["distinct"] == 2 and report["total"]["dropped"] == 1
    # the dropped chat's image was read and hashed, but is not left in the output
    assert sorted(f.name for f in (tmp_path / "tmp-out" / "images").iterdir()) == sorted(
        Path(im["path"]).name for im in rows[0]["images"])
    # another pixel in the embedded image: another hash, so DVC re-runs prepare and what follows
    buf = tmp_path / "changed.png"
    with PILImage.open(images / "wide.png") as im:
        im = im.copy()
    im.putpixel((0, 0), (0, 0, 0))
    im.save(buf)
    changed = {**cell["wide.png"], "bytes": buf.read_bytes()}
    record = shapes(changed, cell["small.png"])["llamafactory"]
    Dataset.from_list([record, too_long], features=image_features("llamafactory")).to_parquet(tmp_path / "a.parquet")
    prepare(params, vlm_base, tmp_path / "out2")
    after = json.loads((tmp_path / "out2" / "manifest.json").read_text())["vision"]["images_sha256"]
    assert digest not in after.values() and len(after) == 2


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", (56, 56), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_hub_cache(cache: Path, repo_id: str, data: Dataset, tmp: Path) -> None:
    """What `load_dataset(repo_id)` leaves in the datasets cache after an online load at COMMIT
    (as tests/prepare/test_sources.py writes it, keeping the data set's features)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    data.to_parquet(tmp / "hub-train.parquet")
    org, name = repo_id.split("/")
    builder = Parquet(data_files={"train": str(tmp / "hub-train.parquet")}, cache_dir=str(tmp / "build"),
                      dataset_name=name, hash=COMMIT)
    builder.download_and_prepare()
    dest = cache / f"{org}___{name}" / "default" / "0.0.0" / COMMIT
    dest.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, dest)


def test_hub_image_source_offline_pinned_with_embedded_images_and_root_for_paths(
    tmp_path: Path, vlm_base: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # only the cache can answer
    raw = pictures(images, tmp_path / "pics")
    cell = {name: {"bytes": b, "path": None} for name, b in raw.items()}
    cache = tmp_path / "cache"
    write_hub_cache(cache, "sftflow-test/vqa", Dataset.from_list(
        [shapes(cell["wide.png"], cell["small.png"])["llamafactory"]], features=image_features("llamafactory")), tmp_path)
    write_hub_cache(cache, "sftflow-test/vqa-paths", Dataset.from_list(
        [shapes("wide.png", "small.png")["llamafactory"]]), tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    chats = _jsonl(tmp_path / "c.jsonl", [shapes("pics/wide.png", "pics/small.png")["llamafactory"]])
    want, _, _ = run(tmp_path / "want", vlm_base, {"path": str(chats)})
    rows, report, manifest = run(tmp_path / "hub", vlm_base, {"hub": "sftflow-test/vqa", "revision": COMMIT})
    assert samples(rows) == samples(want) and report["sources"]["hf://sftflow-test/vqa"]["kept"] == 1
    (hub,) = manifest["hub_sources"]
    assert hub["commit"] == COMMIT and hub["hub"] == "sftflow-test/vqa"
    # a hub data set's image paths have no folder to be relative to: data.image.root gives it
    with pytest.raises(SftflowError) as err:
        run(tmp_path / "noroot", vlm_base, {"path": "hf://sftflow-test/vqa-paths"})
    assert str(err.value).startswith("hf://sftflow-test/vqa-paths:1: images[0]: a relative image path (wide.png)")
    assert "set data.image.root" in str(err.value)
    rows, _, _ = run(tmp_path / "root", vlm_base, {"hub": "sftflow-test/vqa-paths"},
                     image=ImageParams(BOUNDS.min_pixels, BOUNDS.max_pixels, root=str(tmp_path / "pics")))
    assert samples(rows) == samples(want)
    with pytest.raises(SftflowError, match="only holds " + COMMIT):
        run(tmp_path / "pinned", vlm_base, {"hub": "sftflow-test/vqa", "revision": "f" * 40})


def test_columns_and_tools_apply_to_image_chats(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    pictures(images, tmp_path / "pics")
    record = shapes("pics/wide.png", "pics/small.png")["llamafactory"]
    want, _, _ = run(tmp_path / "want", vlm_base, {"path": str(_jsonl(tmp_path / "a.jsonl", [record]))})
    Dataset.from_dict({"turns": [record["conversations"]], "pics": [record["images"]]}).to_parquet(tmp_path / "t.parquet")
    rows, _, _ = run(tmp_path / "cols", vlm_base, {"path": str(tmp_path / "t.parquet"),
                                                 "columns": ColumnsParams(conversations="turns", images="pics")})
    assert samples(rows) == samples(want)
    # errors name the data set's own columns, as for text chats
    Dataset.from_dict({"turns": [record["conversations"]], "pics": [["pics/wide.png", "pics/gone.png"]]}).to_parquet(
        tmp_path / "bad.parquet")
    with pytest.raises(SftflowError) as err:
        run(tmp_path / "bad", vlm_base, {"path": str(tmp_path / "bad.parquet"),
                                        "columns": ColumnsParams(conversations="turns", images="pics")})
    assert str(err.value).startswith(f"{tmp_path / 'bad.parquet'}:1: pics[1]: image file not found")
    one = {**shapes("pics/wide.png", "pics/small.png")["minicpmv_dict"]}
    Dataset.from_dict({"chat": [one["conversations"]], "img": [one["image"]]}).to_parquet(tmp_path / "m.parquet")
    rows, _, _ = run(tmp_path / "cols2", vlm_base, {"path": str(tmp_path / "m.parquet"),
                                                  "columns": ColumnsParams(conversations="chat", image="img")})
    assert samples(rows) == samples(want)
    # tools reach the template with an image chat (no longer dropped): this template has no tool
    # support, so the chat is refused instead of trained without its tools
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "zoom", "parameters": {"type": "object"}}]))
    with pytest.raises(SftflowError, match=r"a\.jsonl:1: the chat template ignores the tools list \(tool 'zoom'"):
        run(tmp_path / "tools", vlm_base, {"path": str(tmp_path / "a.jsonl"), "tools": str(tools)})


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def llamafactory(*refs: Any) -> dict:
    return {"conversations": [{"from": "human", "value": "<image>" * len(refs) + "Hi"}, {"from": "gpt", "value": "Yo."}],
            "images": list(refs)}


def bad_cases(tmp: Path) -> dict[str, tuple[dict, str]]:
    """reason -> (record in tmp/data/chats.jsonl, the expected `field: reason` text)."""
    (tmp / "outside.png").write_bytes((tmp / "data" / "pics" / "small.png").read_bytes())
    os.symlink(tmp / "outside.png", tmp / "data" / "pics" / "link.png")
    os.symlink(tmp / "data" / "pics" / "loop_b.png", tmp / "data" / "pics" / "loop_a.png")
    os.symlink(tmp / "data" / "pics" / "loop_a.png", tmp / "data" / "pics" / "loop_b.png")
    turns = [{"role": "user", "content": "<image_00> and <image_07>?"}, {"role": "assistant", "content": "Yo."}]
    return {
        "image_url": (llamafactory("https://example.com/cat.png"), "images[0]: an image URL (https://example.com/cat.png)"),
        "image_outside_root": (llamafactory("../outside.png"), "images[0]: image path ../outside.png is outside the image folder"),
        "image_outside_root_symlink": (llamafactory("pics/link.png"), "images[0]: image path pics/link.png is a symlink out of the image folder"),
        "image_symlink_loop": (llamafactory("pics/loop_a.png"), "images[0]: a symlink loop"),
        "unknown_image_name": ({"image": {"<image_00>": "pics/small.png"}, "conversations": turns},
                               "conversations[0].content: <image_07> is not a key of image"),
        "image_count_mismatch": ({"image": {"<image_00>": "pics/small.png", "<image_01>": "pics/wide.png"},
                                  "conversations": [turns[0] | {"content": "<image_00>?"}, turns[1]]},
                                 "image: 1 <image> placeholders for 2 image(s): <image_01> is written in no turn"),
        "unreadable_image": (llamafactory({"bytes": b"not a png", "path": None}), "images[0]: not a readable image: embedded image bytes"),
    }


def test_bad_image_sources_error_with_file_line_field_or_are_counted(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    pictures(images, tmp_path / "data" / "pics")
    good = llamafactory("pics/small.png")
    cases = bad_cases(tmp_path)
    for name, (record, expected) in cases.items():
        if name == "unreadable_image":
            continue  # bytes: JSON cannot hold them (the parquet case below)
        path = _jsonl(tmp_path / "data" / "chats.jsonl", [good, record])
        with pytest.raises(SftflowError) as err:
            run(tmp_path / name, vlm_base, {"path": str(path)})
        assert str(err.value).startswith(f"{path}:2: {expected}"), (name, str(err.value))
    # a table: the row is named, and a skip is counted by reason
    table = Dataset.from_list([llamafactory({"bytes": (images / "small.png").read_bytes(), "path": None}),
                               cases["unreadable_image"][0]], features=image_features("llamafactory"))
    table.to_parquet(tmp_path / "data" / "t.parquet")
    with pytest.raises(SftflowError) as err:
        run(tmp_path / "t", vlm_base, {"path": str(tmp_path / "data" / "t.parquet")})
    assert str(err.value).startswith(f"{tmp_path / 'data' / 't.parquet'}:2: {cases['unreadable_image'][1]}")
    records = [good] + [r for name, (r, _) in cases.items() if name != "unreadable_image"]
    path = _jsonl(tmp_path / "data" / "chats.jsonl", records)
    rows, report, _ = run(tmp_path / "skip", vlm_base, {"path": str(path)}, on_bad_record="skip")
    assert len(rows) == 1
    assert report["sources"][str(path)]["skipped"] == {
        "image_url": 1, "image_outside_root": 2, "image_symlink_loop": 1, "unknown_image_name": 1,
        "image_count_mismatch": 1,
    }


def test_root_confines_absolute_paths_and_relative_ones_resolve_in_it(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    pictures(images, tmp_path / "root" / "pics")
    (tmp_path / "data").mkdir()
    chats = _jsonl(tmp_path / "data" / "chats.jsonl", [llamafactory("pics/small.png")])
    root = ImageParams(BOUNDS.min_pixels, BOUNDS.max_pixels, root=str(tmp_path / "root"))
    rows, _, _ = run(tmp_path / "a", vlm_base, {"path": str(chats)}, image=root)
    assert rows[0]["images"][0]["path"] == str(tmp_path / "root" / "pics" / "small.png")
    _jsonl(chats, [llamafactory(str(images / "small.png"))])  # absolute, outside the root
    with pytest.raises(SftflowError, match=r"chats\.jsonl:1: images\[0\]: image path .* is outside the image folder"):
        run(tmp_path / "b", vlm_base, {"path": str(chats)}, image=root)
    with pytest.raises(SftflowError, match=r"data\.image\.root: image root folder not found"):
        run(tmp_path / "c", vlm_base, {"path": str(chats)},
            image=ImageParams(BOUNDS.min_pixels, BOUNDS.max_pixels, root=str(tmp_path / "nope")))


def test_held_out_image_chats_from_a_table_or_the_hub_score_as_the_jsonl(
    tmp_path: Path, vlm_base: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from stages.core.eval_chats import read_eval_chats
    from stages.core.image_chats import ImageReader
    from stages.core.params import EvalParams
    from stages.evaluate.vision import score_vision_model

    raw = pictures(images, tmp_path / "pics")
    cell = {name: {"bytes": b, "path": None} for name, b in raw.items()}
    record = shapes("pics/wide.png", "pics/small.png")["llamafactory"] | {"expect_contains": ["Blue"]}
    jsonl = _jsonl(tmp_path / "eval.jsonl", [record])
    embedded = Dataset.from_list([shapes(cell["wide.png"], cell["small.png"])["llamafactory"] | {"expect_contains": ["Blue"]}],
                                 features=Features({**image_features("llamafactory"), "expect_contains": List(Value("string"))}))
    (tmp_path / "elsewhere").mkdir()
    embedded.to_parquet(tmp_path / "elsewhere" / "eval.parquet")
    write_hub_cache(tmp_path / "cache", "sftflow-test/vqa-eval", embedded, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    hub = f"hf://sftflow-test/vqa-eval@{COMMIT}:train"

    def key(chats: list[dict]) -> list:
        return [(c["messages"], [(im.sha256, im.width, im.height) for im in c["images"]], c["expect_contains"]) for c in chats]

    want = read_eval_chats(jsonl, ImageReader())
    for spec in (str(tmp_path / "elsewhere" / "eval.parquet"), hub):
        assert key(read_eval_chats(spec, ImageReader())) == key(want), spec
    with pytest.raises(SftflowError, match="only holds " + COMMIT):
        read_eval_chats(f"hf://sftflow-test/vqa-eval@{'f' * 40}", ImageReader())
    params = EvalParams(data=str(jsonl), tasks=("sftflow_replies", "sftflow_perplexity"), max_new_tokens=4, threads=1)
    base = score_vision_model(params, vlm_base, image=BOUNDS)
    from_hub = score_vision_model(EvalParams(**{**params.__dict__, "data": hub}), vlm_base, image=BOUNDS)
    assert from_hub["metrics"] == base["metrics"] and base["metrics"]["sftflow_perplexity"]["reply_nll"] > 0
    assert [r["reply"] for r in from_hub["replies"]["sftflow_replies"]] == [r["reply"] for r in base["replies"]["sftflow_replies"]]
    assert from_hub["inputs"]["data_sha256"] != base["inputs"]["data_sha256"]


def test_sftflow_prepare_names_embedded_images_where_the_output_lands_and_the_collator_loads_them(
    tmp_path: Path, vlm_base: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command prepares into a temp folder renamed to data/prepared: the shards must name the
    embedded images by the final folder, which train's collator reads from the pipeline's folder."""
    from click.testing import CliRunner

    from stages.core.vision import VisionCollator, load_processor, model_family
    from stages.prepare.command import prepare_cmd

    cell = {name: {"bytes": b, "path": None} for name, b in pictures(images, tmp_path / "src").items()}
    (tmp_path / "raw").mkdir()
    Dataset.from_list([shapes(cell["wide.png"], cell["small.png"])["hf_parts"]],
                      features=image_features("hf_parts")).to_parquet(tmp_path / "raw" / "vqa.parquet")
    (tmp_path / "params.yaml").write_text(json.dumps({"data": {
        "sources": [{"path": "raw/vqa.parquet"}],
        "image": {"min_pixels": BOUNDS.min_pixels, "max_pixels": BOUNDS.max_pixels}}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(prepare_cmd, ["--params", "params.yaml", "--model", str(vlm_base)])
    assert result.exit_code == 0, result.output
    (row,) = load_from_disk("data/prepared/train")
    paths = [im["path"] for im in row["images"]]
    assert all(p.startswith("data/prepared/images/") and Path(p).is_file() for p in paths)
    assert not list(tmp_path.glob("data/.prepared.tmp-*"))
    collate = VisionCollator(load_processor(vlm_base, BOUNDS.min_pixels, BOUNDS.max_pixels),
                             model_family(vlm_base), 151643, packing=False)
    batch = collate([{k: row[k] for k in ("input_ids", "labels", "images")}])
    assert [tuple(g) for g in batch["image_grid_thw"].tolist()] == [(1, 4, 8), (1, 4, 4)]


@pytest.mark.slow  # ~35 s: 300 chats prepared twice
def test_map_workers_give_the_shards_of_one_process(tmp_path: Path, vlm_base: Path, images: Path) -> None:
    """num_proc 2 — each map worker with its own copy of the chat tokenizer and image reader,
    both writing the same embedded images into the output — gives the shards, report, manifest,
    rejects and stored images of one process (bad records skipped, dedupe and the eval split on)."""
    from stages.prepare.stream import MAP_BATCH

    raw = pictures(images, tmp_path / "pics")
    cell = {name: {"bytes": b, "path": None} for name, b in raw.items()}
    base = shapes(cell["wide.png"], cell["small.png"])["llamafactory"]
    records = []
    for i in range(MAP_BATCH + 44):  # over one map batch, so the workers run
        turns = [dict(t) for t in base["conversations"]]
        turns[3]["value"] = f"Blue, {i % 150}."  # every chat twice: dedupe has work
        pics = base["images"] if i % 37 else base["images"][:1]  # a bad record now and then
        records.append({"conversations": turns, "images": pics})
    Dataset.from_list(records, features=image_features("llamafactory")).to_parquet(tmp_path / "a.parquet")
    got = {}
    for num_proc in (1, 2):
        out = tmp_path / f"out-{num_proc}"
        params = DataParams(sources=(SourceParams(path=str(tmp_path / "a.parquet")),), image=BOUNDS, num_proc=num_proc,
                            on_bad_record="skip", dedupe=True, eval_fraction=0.1)
        report = prepare(params, vlm_base, out, rejects_path=tmp_path / f"rejects-{num_proc}.jsonl",
                         final_out=Path("data/prepared"))
        got[num_proc] = (report, json.loads((out / "manifest.json").read_text())["vision"],
                         [list(load_from_disk(str(out / split))) for split in ("train", "eval")],
                         (tmp_path / f"rejects-{num_proc}.jsonl").read_text(),
                         sorted(f.name for f in (out / "images").iterdir()))
    report = got[1][0]
    # 9 bad records (i % 37 == 0); 141 of the 150 pairs (i, i + 150) both good
    assert report["total"]["skipped"] == 9 and report["total"]["duplicates_removed"] == 141
    assert len(got[1][4]) == 2 and report["images"]["distinct"] == 2
    assert got[2] == got[1]

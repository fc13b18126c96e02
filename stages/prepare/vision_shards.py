"""`prepare` for vision-language models: image chats -> token ids, labels and image references.

The same contract as text chats (`stages/prepare/shards.py`), plus an `images` column: per
image its path, sha256 and patch grid (t, h, w). Pixels are not stored: train's collator loads
and resizes each batch's images (its grids are checked against these).

How a chat becomes tokens:
1. render it with the model's chat template (each image as one `<|image_pad|>` between
   `<|vision_start|>` / `<|vision_end|>`) and find the trained replies by differential
   rendering, exactly as for text chats;
2. tokenize, label, then expand each image's single pad *token* to the number the model will
   see, from the image's resized size (`data.image.min_pixels` / `max_pixels`): expanding
   tokens rather than text leaves the character offsets of step 1 valid;
3. image pads and vision markers never carry loss, whatever `train_on` says (even `all`);
4. a sample over `max_length` is dropped, or under `truncation: truncate` cut — never inside an
   image: the cut moves to before that image's `<|vision_start|>` (counted as
   `truncated_before_image`), since half an image's tokens cannot be matched to its features.

Runs in one process (`data.num_proc` applies to text chats): image chats are read and hashed
once each, and token counting needs only the image header (size), not the pixels. Sources are
the text ones (stages/prepare/sources.py: JSON(L), parquet, CSV, Arrow, save_to_disk, the hub),
with `columns` and `tools`; embedded images (the `datasets` Image feature) are written once to
`images/<sha256>.<ext>` in the output, so the shards refer to every image by a path.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import json_text
from stages.core.chats import IGNORE_INDEX, with_system_prompt
from stages.core.errors import SftflowError
from stages.core.image_chats import ImageReader
from stages.core.io import write_json, write_jsonl
from stages.core.loading import load_tokenizer
from stages.core.params import DataParams, SourceParams
from stages.core.shards import IMAGES, shard_features
from stages.core.tables import raw_rows
from stages.core.turns import special_token_ids
from stages.core.vision import ImageTokens, expand_placeholders, image_settings, load_processor, model_config
from stages.core.vlm_families import family_of
from stages.prepare.output import manifest, save_split
from stages.prepare.records import RawRecord, _reason_key, parse_record
from stages.prepare.render import RenderedChat, TemplateError, label_tokens, render_chat
from stages.prepare.report import SourceReport, build_report
from stages.prepare.select import sample_indices
from stages.prepare.sources import open_source, source_tools


class ImageChatTokenizer:
    """Renders, expands, tokenizes and masks one image chat at a time."""

    def __init__(self, tok: Any, images: ImageTokens, params: DataParams, model_dir: Path) -> None:
        self.tok, self.images, self.params = tok, images, params
        # replies are closed by a special token (trained): found as text chats find theirs
        self.end_of_turn_ids = special_token_ids(tok, model_dir)
        # the markers a chat template writes around an image's placeholder (Qwen-VL's <|vision_start|> /
        # <|vision_end|>, named in its config) belong to the image: never trained, never cut from it
        config = model_config(model_dir)
        self.frame = (config.get("vision_start_token_id"), config.get("vision_end_token_id"))

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        if tools:
            return self.tok.apply_chat_template(messages, tools=tools, tokenize=False)
        return self.tok.apply_chat_template(messages, tokenize=False)

    def __call__(self, r: RawRecord) -> dict[str, Any]:
        """{"input_ids", "labels", "images", "drop", "truncated", "before_image"} of one chat."""
        p = self.params
        messages = with_system_prompt(r.messages, p.system_prompt)
        try:
            chat = render_chat(lambda ms: self._render(ms, r.tools), messages, p.train_on)
            for tool in r.tools or ():
                if tool["function"]["name"] not in chat.text:
                    raise TemplateError(
                        f"the chat template ignores the tools list (tool {tool['function']['name']!r} is not in"
                        " the rendered chat): use a template with tool support"
                    )
        except TemplateError as e:
            raise SftflowError(f"{e} (set model.chat_template)", path=r.source, line=r.line) from e
        sizes = [(im.width, im.height) for im in r.images]
        try:
            chat, spans = expand_chat(chat, self.images, sizes)
        except ImageSizeError as e:  # e.g. Qwen-VL's resize refuses an aspect ratio over 200:1 (a 1x40000 strip)
            im = r.images[e.index]
            raise SftflowError(
                f"image {e.index + 1} of the chat ({im.path}, {im.width}x{im.height}) cannot be resized for the model:"
                f" {e.reason} (aspect ratio)",
                path=r.source,
                line=r.line,
            ) from e
        except ValueError as e:
            raise SftflowError(
                f"{e}: use a chat template that renders image parts as {self.images.placeholder!r}"
                " (model.chat_template)",
                path=r.source,
                line=r.line,
            ) from e
        enc = self.tok(chat.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        inner = [token_span(offsets, span) for span in spans]
        outer = [framed(ids, span, self.frame) for span in inner]
        in_image = [any(a <= i < b for a, b in outer) for i in range(len(ids))]
        trained, closed = label_tokens(offsets, ids, chat, self.end_of_turn_ids)
        if not closed:
            raise SftflowError(
                "a reply is not followed by a special end-of-turn token: use a chat template whose turns end"
                " with one (model.chat_template)",
                path=r.source,
                line=r.line,
            )
        # an image's tokens never carry loss, whatever train_on says (the model cannot predict pixels)
        labels = [tid if keep and not img else IGNORE_INDEX for tid, keep, img in zip(ids, trained, in_image)]
        starts, ends = zip(*outer) if outer else ((), ())
        images = [{"path": im.path, "sha256": im.sha256, "size": [im.width, im.height], "tokens": b - a}
                  for im, (a, b) in zip(r.images, inner)]
        row = {"input_ids": ids, "labels": labels, "images": images, "drop": "", "truncated": False,
               "before_image": False}
        if len(ids) > p.max_length:
            if p.truncation == "drop":
                row["drop"] = "too_long"
                return row
            cut, row["before_image"] = truncation_point(p.max_length, starts, ends)
            row["input_ids"], row["labels"], row["truncated"] = ids[:cut], labels[:cut], True
            row["images"] = [im for im, end in zip(images, ends) if end <= cut]
            if all(lab == IGNORE_INDEX for lab in row["labels"]):
                row["drop"] = "no_trained_tokens_after_truncation"
        elif all(lab == IGNORE_INDEX for lab in labels):
            row["drop"] = "no_trained_tokens"
        return row


class ImageSizeError(ValueError):
    """The processor refused image `index` (its size or aspect ratio)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def expand_chat(
    chat: RenderedChat, images: ImageTokens, sizes: list[tuple[int, int]]
) -> tuple[RenderedChat, list[tuple[int, int]]]:
    """The chat with each image placeholder replaced by the processor's text for that image, its
    trained spans moved with the text, and the images' character spans."""
    try:
        expansions = images.expansions(sizes)
    except SftflowError:
        raise
    except ValueError as e:  # name the image the processor refused
        for k, size in enumerate(sizes):
            try:
                images.expansions([size])
            except ValueError as one:
                raise ImageSizeError(k, str(one)) from one
        raise ImageSizeError(0, str(e)) from e
    text, spans = expand_placeholders(chat.text, images.placeholder, expansions)
    olds, at = [], 0
    for _ in expansions:
        at = chat.text.index(images.placeholder, at)
        olds.append(at)
        at += len(images.placeholder)
    growth = [len(x) - len(images.placeholder) for x in expansions]

    def moved(offset: int) -> int:  # a trained span never starts or ends inside a placeholder
        return offset + sum(g for s, g in zip(olds, growth) if s < offset)

    trained = tuple((moved(s), moved(e)) for s, e in chat.trained_spans)
    return RenderedChat(text, trained, chat.train_all), spans


def framed(ids: list[int], span: tuple[int, int], frame: tuple[int | None, int | None]) -> tuple[int, int]:
    """An image's token span [a, b) widened by the start / end marker ids right around it.

    >>> framed([5, 7, 9, 9, 8, 5], (2, 4), (7, 8)), framed([5, 9, 9, 5], (1, 3), (7, 8))
    ((1, 5), (1, 3))
    """
    a, b = span
    if a > 0 and frame[0] is not None and ids[a - 1] == frame[0]:
        a -= 1
    if b < len(ids) and frame[1] is not None and ids[b] == frame[1]:
        b += 1
    return a, b


def token_span(offsets: list[tuple[int, int]], span: tuple[int, int]) -> tuple[int, int]:
    """[first, last + 1) of the tokens overlapping a character span.

    >>> token_span([(0, 1), (1, 4), (4, 7), (7, 8)], (2, 7))
    (1, 3)
    """
    inside = [i for i, (s, e) in enumerate(offsets) if s < span[1] and e > span[0]]
    return inside[0], inside[-1] + 1


def truncation_point(max_length: int, starts: Sequence[int], ends: Sequence[int]) -> tuple[int, bool]:
    """Where to cut a too-long sample (images spanning tokens [starts[i], ends[i])): at
    max_length, or before the image that cut would split.

    >>> truncation_point(3, [1], [5]), truncation_point(6, [1], [5])
    ((1, True), (6, False))
    """
    for a, b in zip(starts, ends):
        if a < max_length < b:
            return a, True
    return max_length, False


def source_records(
    src: SourceParams, where: str, work: Path, reader: ImageReader, on_bad_record: str, rejects: list[dict[str, Any]]
) -> tuple[Iterator[RawRecord], dict[str, Any] | None]:
    """(the validated records of one source of any kind, its hub commit or None), bad ones
    going to `rejects` under on_bad_record: skip. JSON(L) rows are numbered by line, table rows
    (parquet, CSV, Arrow, save_to_disk, hub) by 1-based row; a table's Image columns are read
    undecoded, so embedded images are hashed as stored."""
    raw = open_source(src, work, where)
    tools = source_tools(src, where)
    if raw.hub is not None:
        reader.bases[raw.label] = None  # a hub data set has no folder: relative paths need data.image.root
    data = raw.data if raw.kind == "json" else raw_rows(raw.data)

    def records() -> Iterator[RawRecord]:
        for index, row in enumerate(data):
            line = row["line"] if raw.kind == "json" else index + 1
            try:
                if raw.kind == "json":
                    if row["error"] is not None:
                        raise SftflowError(row["error"], path=raw.label, line=line)
                    obj = json_text.loads(row["json"], raw.label, line)
                else:
                    obj = row
                yield parse_record(obj, src.format, raw.label, line, index, src.columns, tools, images=reader)
            except SftflowError as e:
                if on_bad_record != "skip":
                    raise
                rejects.append({"file": raw.label, "line": line, "reason": _reason_key(e), "detail": str(e)})

    return records(), raw.hub


def prepare_vision(
    params: DataParams, model_dir: Path, out: Path, rejects_path: Path | None = None, images_at: Path | None = None
) -> dict[str, Any]:
    """Prepare image chats into `out` (an empty temp dir); return the report (text prepare's
    shape, plus image counts). Embedded images are written to `out/images/<sha256>.<ext>` and
    referred to as `images_at/<name>` (where that folder will be once `out` is renamed into
    place; default `out/images`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    try:
        return _prepare_vision(params, model_dir, out, work, rejects_path, images_at or out / "images")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare_vision(
    params: DataParams, model_dir: Path, out: Path, work: Path, rejects_path: Path | None, images_at: Path
) -> dict[str, Any]:
    tok = load_tokenizer(model_dir)
    config = model_config(model_dir)
    processor = load_processor(model_dir, params.image.min_pixels, params.image.max_pixels)
    image_tokens = ImageTokens(processor, family_of(config))
    chat_tokenizer = ImageChatTokenizer(tok, image_tokens, params, model_dir)
    root = Path(params.image.root) if params.image.root else None
    if root is not None and not root.is_dir():
        raise SftflowError("image root folder not found", path=root, field="data.image.root")
    reader = ImageReader(root=root, store=out / "images", store_as=images_at)
    hubs: list[dict[str, Any]] = []
    reports: dict[str, SourceReport] = {}
    rejects: list[dict[str, Any]] = []
    before_image = 0
    rng = random.Random(params.seed)

    def load(sources: tuple[SourceParams, ...], group: str) -> list[dict[str, Any]]:
        nonlocal before_image
        rows: list[dict[str, Any]] = []
        for i, src in enumerate(sources):
            rep = reports.setdefault(src.label, SourceReport())
            start = len(rejects)
            found, hub = source_records(
                src, f"data.{group}[{i}]", work / f"{group}-{i}", reader, params.on_bad_record, rejects
            )
            records = list(found)
            if hub is not None:
                hubs.append({"source": src.label, **hub})
            rep.skipped.update(r["reason"] for r in rejects[start:])
            rep.read += len(records) + len(rejects) - start
            kept = []
            for r in records:
                if r.text is not None:
                    raise SftflowError(
                        "a text record (continued pre-training) in a vision-language data set: give chats",
                        path=r.source, line=r.line, field="text",
                    )
                try:
                    row = chat_tokenizer(r)
                except SftflowError as e:  # an image the model cannot take is a bad record; the rest is config
                    if params.on_bad_record != "skip" or _reason_key(e) != "image_aspect_ratio":
                        raise
                    rep.skipped["image_aspect_ratio"] += 1
                    rejects.append({"file": r.source, "line": r.line, "reason": "image_aspect_ratio", "detail": str(e)})
                    continue
                if row["drop"]:
                    rep.dropped[row["drop"]] += 1
                    rejects.append({"file": r.source, "line": r.line, "reason": row["drop"]})
                    continue
                rep.truncated += row["truncated"]
                before_image += row["before_image"]
                rep.kept += 1
                rep.tokens += len(row["input_ids"])
                rep.trained_tokens += sum(lab != IGNORE_INDEX for lab in row["labels"])
                kept.append({k: row[k] for k in ("input_ids", "labels", "images")} | {"source": r.source, "record": r.record})
            picked = [kept[i] for i in sample_indices(np.arange(len(kept), dtype=np.int64), src, rng)]
            rep.sampled += len(picked)
            rows += picked
        return rows

    train, evals = load(params.sources, "sources"), load(params.eval_sources, "eval_sources")
    duplicates = 0
    if params.dedupe:
        train, evals, duplicates = _dedupe(train, evals)
    if not params.eval_sources and params.eval_fraction > 0:
        order = list(range(len(train)))
        rng.shuffle(order)
        held = set(order[: max(1, round(len(train) * params.eval_fraction))])
        evals = [s for i, s in enumerate(train) if i in held]
        train = [s for i, s in enumerate(train) if i not in held]
    if not train:
        raise SftflowError("no training samples left after preparation", field="data.sources")
    splits = {"train": train, "eval": evals}
    for name, rows in splits.items():
        save_split(to_dataset(rows), out / name)
    lengths = {
        name: (
            np.array([len(r["input_ids"]) for r in rows], dtype=np.int64),
            np.array([sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in rows], dtype=np.int64),
        )
        for name, rows in splits.items()
    }
    report = build_report(reports, lengths, len(rejects), duplicates)
    used = {im["path"]: im["sha256"] for rows in splits.values() for r in rows for im in r["images"]}
    # embedded images of chats not kept (skipped, dropped, sampled out, cut off) leave the output
    for stored in sorted((out / "images").glob("*")) if (out / "images").is_dir() else []:
        if str(images_at / stored.name) not in used:
            stored.unlink()
    report["total"]["truncated_before_image"] = before_image
    report["images"] = {
        "distinct": len(used),
        "per_split": {name: sum(len(r["images"]) for r in rows) for name, rows in splits.items()},
        "image_tokens": {name: sum(im["tokens"] for r in rows for im in r["images"]) for name, rows in splits.items()},
    }
    written = manifest(tok, params, {k: len(v) for k, v in splits.items()})
    if hubs:
        written["hub_sources"] = hubs  # the commits actually read, as for text sources
    write_json(
        out / "manifest.json",
        written
        | {
            # the data's identity includes the pixels: a changed image changes this manifest
            "vision": {
                "model_type": config["model_type"],
                "image_processor": image_settings(processor),
                "images_sha256": dict(sorted(used.items())),
            },
        },
    )
    if rejects_path is not None:
        write_jsonl(rejects_path, rejects)
    return report


def _dedupe(
    train: list[dict[str, Any]], evals: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Drop exact duplicates (same tokens, labels and image contents); eval wins over train."""
    seen: set[bytes] = set()

    def keep(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            key = json.dumps([row["input_ids"], row["labels"], [im["sha256"] for im in row["images"]]])
            digest = hashlib.sha1(key.encode()).digest()
            if digest not in seen:
                seen.add(digest)
                out.append(row)
        return out

    kept_eval, kept_train = keep(evals), keep(train)
    return kept_train, kept_eval, len(train) + len(evals) - len(kept_train) - len(kept_eval)


def to_dataset(rows: list[dict[str, Any]]) -> Any:
    """The shards' columns (stages/core/shards.py), with `images` (path, sha256, grid per image)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [r["input_ids"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "length": [len(r["input_ids"]) for r in rows],
            "source": [r["source"] for r in rows],
            "record": [r["record"] for r in rows],
            "num_trained": [sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in rows],
            IMAGES: [r["images"] for r in rows],
        },
        features=shard_features(images=True),
    )

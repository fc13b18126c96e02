"""`prepare` for vision-language models: image chats -> token ids, labels and image references.

The same contract as text chats (`stages/prepare/shards.py`), plus an `images` column: per
image its path, sha256, size and how many tokens it became. Pixels are not stored: train's
collator loads and resizes each batch's images (its token counts are checked against these).

How a chat becomes tokens:
1. render it with the model's chat template (one placeholder per image, the family's: Qwen's
   `<|image_pad|>`, Gemma 3's `<start_of_image>`, ...) and find the trained replies by
   differential rendering, exactly as for text chats;
2. replace each placeholder by the text the model's processor writes for that image (stages/core
   /vision.py `ImageTokens`: once per chat shape, from the images' sizes), moving the trained
   spans with the text, then tokenize and label: the ids are exactly the processor's;
3. an image's tokens never carry loss, whatever `train_on` says (even `all`): its whole span,
   with the markers the template writes right around the placeholder (Qwen-VL's
   `<|vision_start|>` / `<|vision_end|>`, named in its config);
4. a sample over `max_length` is dropped, or under `truncation: truncate` cut — never inside an
   image: the cut moves to before that image's first token (counted as
   `truncated_before_image`), since half an image's tokens cannot be matched to its features.

Image chats run through text prepare's streaming loop (stages/prepare/shards.py, stream.py):
the same sources (JSON(L), parquet, CSV, Arrow, save_to_disk, the hub) with `columns` and
`tools`, the same outcome columns, sampling, dedupe (over tokens, labels and the images'
sha256s), eval split and `data.num_proc` map workers. `ImageChats` is what that loop adds: the
chat tokenizer and image reader each map worker gets a copy of (each worker reads and hashes
the images of its rows, once per image; token counting needs only an image's size, not its
pixels), and what is written at the end (the report's image counts, the manifest's `vision`
entry). Embedded images (the `datasets` Image feature) are written once to
`images/<sha256>.<ext>` in the output, so the shards refer to every image by a path; those no
kept chat uses are removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.chats import IGNORE_INDEX, with_system_prompt
from stages.core.errors import SftflowError
from stages.core.image_chats import ImageReader
from stages.core.params import DataParams
from stages.core.shards import IMAGES, VIDEOS
from stages.core.turns import special_token_ids
from stages.core.vision import (
    ImageTokens,
    Media,
    expand_placeholders,
    image_settings,
    load_processor,
    model_config,
    video_settings,
)
from stages.core.vlm_families import family_of
from stages.prepare.records import RawRecord
from stages.prepare.render import RenderedChat, TemplateError, label_tokens, render_chat


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
        """{"input_ids", "labels", "images", "videos", "drop", "truncated", "before_image"} of one
        chat (`before_image`: cut before an image or a video)."""
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
        sizes = [m.shape for m in r.images]  # images and videos, in text order
        if self.images.video_placeholder is None and any(hasattr(m, "frames") for m in r.images):
            raise SftflowError(
                f"this chat holds a video, and {self.images.family.name} takes no videos here: give images,"
                " or use Qwen2.5-VL or Qwen3-VL (model.name_or_path)",
                path=r.source,
                line=r.line,
            )
        try:
            chat, spans = expand_chat(chat, self.images, sizes)
        except ImageSizeError as e:  # e.g. Qwen-VL's resize refuses an aspect ratio over 200:1 (a 1x40000 strip)
            im = r.images[e.index]
            raise SftflowError(
                f"{'video' if hasattr(im, 'frames') else 'image'} {e.index + 1} of the chat ({im.path},"
                f" {im.width}x{im.height}) cannot be resized for the model:"
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
        # an image's (video's) tokens never carry loss, whatever train_on says (the model cannot predict pixels)
        labels = [tid if keep and not img else IGNORE_INDEX for tid, keep, img in zip(ids, trained, in_image)]
        starts, ends = zip(*outer) if outer else ((), ())
        media = [media_entry(m, b - a) for m, (a, b) in zip(r.images, inner)]
        row = {"input_ids": ids, "labels": labels, **split_media(media), "drop": "", "truncated": False,
               "before_image": False}
        if len(ids) > p.max_length:
            if p.truncation == "drop":
                row["drop"] = "too_long"
                return row
            cut, row["before_image"] = truncation_point(p.max_length, starts, ends)
            row["input_ids"], row["labels"], row["truncated"] = ids[:cut], labels[:cut], True
            row |= split_media([m for m, end in zip(media, ends) if end <= cut])
            if all(lab == IGNORE_INDEX for lab in row["labels"]):
                row["drop"] = "no_trained_tokens_after_truncation"
        elif all(lab == IGNORE_INDEX for lab in labels):
            row["drop"] = "no_trained_tokens"
        return row


def media_entry(ref: Any, tokens: int) -> dict[str, Any]:
    """A shard's entry for one image (`ImageRef`) or video (`VideoRef`) that became `tokens` tokens."""
    if hasattr(ref, "frames"):
        return {"path": ref.path, "sha256": ref.sha256, "frames": ref.frames, "size": [ref.width, ref.height],
                "fps": ref.fps, "tokens": tokens}
    return {"path": ref.path, "sha256": ref.sha256, "size": [ref.width, ref.height], "tokens": tokens}


def split_media(media: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A chat's media entries as the shards' `images` and `videos` columns (each in text order).

    >>> split_media([{"path": "a.mp4", "frames": 4}, {"path": "b.png"}])
    {'images': [{'path': 'b.png'}], 'videos': [{'path': 'a.mp4', 'frames': 4}]}
    """
    return {"images": [m for m in media if "frames" not in m], "videos": [m for m in media if "frames" in m]}


class ImageSizeError(ValueError):
    """The processor refused image `index` (its size or aspect ratio)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def expand_chat(
    chat: RenderedChat, images: ImageTokens, sizes: list[Media]
) -> tuple[RenderedChat, list[tuple[int, int]]]:
    """The chat with each image (video) placeholder replaced by the processor's text for that
    image (video), its trained spans moved with the text, and the media's character spans."""
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
    placeholders = [images.placeholder_of(m) for m in sizes]
    text, spans = expand_placeholders(chat.text, placeholders, expansions, (images.placeholder, images.video_placeholder))
    growth = [len(x) - len(ph) for x, ph in zip(expansions, placeholders)]
    olds = [start - sum(growth[:k]) for k, (start, _) in enumerate(spans)]  # each placeholder's place in chat.text

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


@dataclass
class ImageChats:
    """What prepare's map needs for image chats and writes at the end. Plain objects (the
    tokenizers, the processor, the reader's cache of image headers), so `datasets.map` pickles
    it to each num_proc worker."""

    tokenizer: ImageChatTokenizer
    reader: ImageReader
    processor: Any
    config: dict[str, Any]

    def finish(self, splits: dict[str, Any], store: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the report's `images` entry, the manifest's `vision` entry) of the written splits
        (`datasets` with `images` and `videos` columns, read in Arrow batches), and embedded images
        in `store` that no kept chat uses (skipped, dropped, sampled out, cut off) removed. Where
        the chats hold videos, the report's entry gains `videos` (the same counts) and the
        manifest the video processor's settings and the videos' sha256s."""
        used, counts, tokens = _media_counts(splits, IMAGES)
        clips, clip_counts, clip_tokens = _media_counts(splits, VIDEOS)
        store_as = self.reader.store_as
        for stored in sorted(store.glob("*")) if store.is_dir() else []:
            if store_as is None or str(store_as / stored.name) not in used:
                stored.unlink()
        report = {"distinct": len(used), "per_split": counts, "image_tokens": tokens}
        # the data's identity includes the pixels: a changed image changes the manifest
        vision = {
            "model_type": self.config["model_type"],
            "image_processor": image_settings(self.processor),
            "images_sha256": dict(sorted(used.items())),
        }
        if clips:  # only where there are videos: image-only data keeps its manifest
            report["videos"] = {"distinct": len(clips), "per_split": clip_counts, "video_tokens": clip_tokens}
            vision |= {"video_processor": video_settings(self.processor), "videos_sha256": dict(sorted(clips.items()))}
        return report, vision


def _media_counts(splits: dict[str, Any], column: str) -> tuple[dict[str, str], dict[str, int], dict[str, int]]:
    """(path -> sha256 of every image / video used, how many per split, their tokens per split)."""
    import pyarrow.compute as pc

    used: dict[str, str] = {}
    counts, tokens = {}, {}
    for name, data in splits.items():
        counts[name] = tokens[name] = 0
        for batch in data.select_columns([column]).with_format("arrow").iter(batch_size=10_000):
            flat = pc.list_flatten(batch.column(column).combine_chunks())
            counts[name] += len(flat)
            tokens[name] += int(pc.sum(flat.field("tokens")).as_py() or 0)
            used.update(zip(flat.field("path").to_pylist(), flat.field("sha256").to_pylist()))
    return used, counts, tokens


def image_chats(tok: Any, params: DataParams, model_dir: Path, store: Path, store_as: Path) -> ImageChats:
    """The model's image chat tokenizer and an image reader writing embedded images to `store`
    (named `store_as/<name>` in the shards: where `store` lands once the output is in place)."""
    config = model_config(model_dir)
    processor = load_processor(model_dir, params.image.min_pixels, params.image.max_pixels)
    tokenizer = ImageChatTokenizer(tok, ImageTokens(processor, family_of(config)), params, model_dir)
    root = Path(params.image.root) if params.image.root else None
    if root is not None and not root.is_dir():
        raise SftflowError("image root folder not found", path=root, field="data.image.root")
    return ImageChats(tokenizer, ImageReader(root=root, store=store, store_as=store_as), processor, config)

"""Chats with images: the three record shapes users bring, read into one form, images checked.

Shapes, detected per record:
- LLaMA-Factory ShareGPT: `{"conversations": [{"from": "human", "value": "<image>What colour?"},
  ...], "images": ["shapes/a.png"]}` (or `"messages"` with role/content) — one `<image>`
  placeholder per listed image, in order;
- HF / Qwen messages: `{"messages": [{"role": "user", "content": [{"type": "image", "image":
  "shapes/a.png"}, {"type": "text", "text": "What colour?"}]}, ...]}`;
- MiniCPM-V: `{"image": "shapes/a.png", "conversations": [{"role": "user", "content":
  "<image>\\nWhat colour?"}, ...]}` — without a placeholder the image goes before the first
  user turn's text, as MiniCPM-V's own data loader does.

Every shape becomes messages whose user content is a list of parts (`{"type": "image"}` /
`{"type": "text", "text"}`) plus the list of images in the order they appear. Image paths are
resolved relative to the data file (absolute paths are kept). Each image is opened and hashed
here, so a missing, unreadable or non-image file is a `file:line: field: reason` error (or a
counted skip), and the content hash makes a changed image re-run prepare.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.chats import CHAT_SHAPES, ChatShape, validate_messages
from stages.core.errors import SftflowError
from stages.core.vision import IMAGE_PLACEHOLDER

# MiniCPM-V's conversations: role/content words like the messages format, under "conversations".
MINICPMV_SHAPE = ChatShape("conversations", "role", "content", CHAT_SHAPES["messages"].roles)

# reason key for the prepare report -> the message text that identifies it (prepare counts skips by these)
IMAGE_REASONS = {
    "image_not_found": "image file not found",
    "unreadable_image": "not a readable image",
    "image_count_mismatch": "placeholders for",
    "image_in_assistant_turn": "image in an assistant",
    "bad_image_part": "image part",
}


@dataclass(frozen=True)
class ImageRef:
    """One image of a chat: where it is, what it holds (sha256 of the file) and its size."""

    path: str
    sha256: str
    width: int
    height: int


def is_image_record(obj: Any) -> bool:
    """Whether a record carries images (any of the three shapes).

    >>> is_image_record({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    True
    >>> is_image_record({"messages": [{"role": "user", "content": "hi"}]})
    False
    """
    if not isinstance(obj, dict):
        return False
    if "images" in obj or ("image" in obj and "conversations" in obj):
        return True
    turns = obj.get("messages")
    return isinstance(turns, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in turns)


class ImageReader:
    """Opens, checks and hashes image files once each (a chat set reuses the same images)."""

    def __init__(self) -> None:
        self.seen: dict[Path, ImageRef | SftflowError] = {}

    def read(self, ref: Any, data_file: Path, line: int, field: str) -> ImageRef:
        if not isinstance(ref, str) or not ref.strip():
            raise SftflowError("image part has no path (a non-empty string)", path=data_file, line=line, field=field)
        path = Path(ref) if Path(ref).is_absolute() else data_file.parent / ref
        if path not in self.seen:
            self.seen[path] = _open_image(path)
        found = self.seen[path]
        if isinstance(found, SftflowError):
            raise SftflowError(found.reason, path=data_file, line=line, field=field)
        return found


def _open_image(path: Path) -> ImageRef | SftflowError:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return SftflowError(f"image file not found: {path}")
    data = path.read_bytes()
    try:
        with Image.open(path) as im:
            im.verify()  # checks the file's structure without decoding all pixels
        with Image.open(path) as im:
            width, height = im.size
            im.load()  # a truncated file fails here, not in the middle of training
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return SftflowError(f"not a readable image: {path} ({type(e).__name__}: {e})")
    return ImageRef(str(path), hashlib.sha256(data).hexdigest(), width, height)


def parse_image_record(obj: dict[str, Any], data_file: Path, line: int, reader: ImageReader) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """(messages with content parts, images in order of appearance) of one image chat."""
    if "images" in obj:
        shape = CHAT_SHAPES["sharegpt"] if "conversations" in obj else CHAT_SHAPES["messages"]
        listed = obj["images"]
        if not isinstance(listed, list):
            raise SftflowError("must be a list of image paths", path=data_file, line=line, field="images")
        return _placeholder_record(obj, shape, listed, "images", data_file, line, reader, prepend=False)
    if "image" in obj:
        listed = [obj["image"]]
        return _placeholder_record(obj, MINICPMV_SHAPE, listed, "image", data_file, line, reader, prepend=True)
    return _parts_record(obj, data_file, line, reader)


def _placeholder_record(
    obj: dict[str, Any],
    shape: ChatShape,
    listed: list[Any],
    key: str,
    data_file: Path,
    line: int,
    reader: ImageReader,
    prepend: bool,
) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """Text turns with `<image>` placeholders + a list of images (LLaMA-Factory, MiniCPM-V)."""
    messages = validate_messages(obj, data_file, line, shape)
    counts = [m["content"].count(IMAGE_PLACEHOLDER) for m in messages]
    for i, (m, n) in enumerate(zip(messages, counts)):
        if n and m["role"] != "user":
            raise SftflowError(
                f"an image in an assistant or system turn: images are input, only user turns may hold {IMAGE_PLACEHOLDER}",
                path=data_file, line=line, field=f"{shape.turns}[{i}].{shape.content}",
            )
    if prepend and sum(counts) == 0 and len(listed) == 1:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first] = {**messages[first], "content": IMAGE_PLACEHOLDER + "\n" + messages[first]["content"]}
        counts[first] = 1
    if sum(counts) != len(listed):
        raise SftflowError(
            f"{sum(counts)} {IMAGE_PLACEHOLDER} placeholders for {len(listed)} image(s): each listed image needs"
            f" exactly one {IMAGE_PLACEHOLDER} in a user turn, in order",
            path=data_file, line=line, field=key,
        )
    images = [
        reader.read(ref, data_file, line, f"{key}[{k}]" if key == "images" else key) for k, ref in enumerate(listed)
    ]
    out = []
    for m in messages:
        if m["role"] != "user" or IMAGE_PLACEHOLDER not in m["content"]:
            out.append(m)
            continue
        parts: list[dict[str, Any]] = []
        for j, text in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
            if j:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": "user", "content": parts})
    return out, images


def _parts_record(
    obj: dict[str, Any], data_file: Path, line: int, reader: ImageReader
) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """HF / Qwen messages whose content may be a list of image and text parts."""
    flat, parts_of, images = [], {}, []
    for i, m in enumerate(obj["messages"]):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            flat.append(m)
            continue
        parts: list[dict[str, Any]] = []
        texts: list[str] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
                texts.append(part["text"])
            elif kind == "image":
                if m.get("role") != "user":
                    raise SftflowError(
                        "an image in an assistant or system turn: images are input, only user turns may hold them",
                        path=data_file, line=line, field=where,
                    )
                ref = part.get("image", part.get("path"))
                images.append(reader.read(ref, data_file, line, f"{where}.image"))
                parts.append({"type": "image"})
                texts.append(IMAGE_PLACEHOLDER)
            else:
                raise SftflowError(
                    'an image part must be {"type": "image", "image": path}, a text part {"type": "text", "text": str}',
                    path=data_file, line=line, field=where,
                )
        parts_of[i] = parts
        flat.append({**m, "content": "".join(texts)})
    messages = validate_messages({"messages": flat}, data_file, line)
    # only user turns keep parts; other turns are text (their image parts were refused above)
    return [
        {**msg, "content": parts_of[i]} if i in parts_of and msg["role"] == "user" else msg
        for i, msg in enumerate(messages)
    ], images

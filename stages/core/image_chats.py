"""Chats with images: the three record shapes users bring, read into one form, images checked.

Shapes, detected per record:
- LLaMA-Factory ShareGPT: `{"conversations": [{"from": "human", "value": "<image>What colour?"},
  ...], "images": ["shapes/a.png"]}` (or `"messages"` with role/content) — one `<image>`
  placeholder per listed image, in order;
- HF / Qwen messages: `{"messages": [{"role": "user", "content": [{"type": "image", "image":
  "shapes/a.png"}, {"type": "text", "text": "What colour?"}]}, ...]}`;
- MiniCPM-V: `{"image": "shapes/a.png", "conversations": [{"role": "user", "content":
  "<image>\\nWhat colour?"}, ...]}` — without a placeholder the image goes before the first
  user turn's text, as MiniCPM-V's own data loader does; several images as
  `{"image": {"<image_00>": "a.png", "<image_01>": "b.png"}, ...}`, each name written where its
  image goes.

Videos (Qwen2.5-VL, Qwen3-VL) come as `{"type": "video", "video": "clip.mp4"}` parts, or as
LLaMA-Factory's `<video>` placeholders with a `"videos": [...]` list; a video is a file path
(resolved and refused like an image's), read by PyAV: its header's frame count, size and frame
rate (`VideoRef`), its packets counted against that frame count, its bytes hashed.

Every shape becomes messages whose user content is a list of parts (`{"type": "image"}` /
`{"type": "video"}` / `{"type": "text", "text"}`) plus the list of images and videos in the
order they appear. An image is a path
(resolved inside the data file's folder or `data.image.root`: `ImageReader`) or embedded bytes (a
`datasets` Image cell from parquet, Arrow or the hub). Each image is opened, decoded and hashed
here, so a missing, unreadable or non-image file is a `file:line: field: reason` error (or a
counted skip), and the content hash makes a changed image re-run prepare.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core import json_text
from stages.core.chats import CHAT_SHAPES, ChatShape, validate_messages
from stages.core.errors import SftflowError
from stages.core.vision import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, VideoShape

# MiniCPM-V's conversations: role/content words like the messages format, under "conversations".
MINICPMV_SHAPE = ChatShape("conversations", "role", "content", CHAT_SHAPES["messages"].roles)

# reason key for the prepare report -> the message text that identifies it (prepare counts skips by these)
IMAGE_REASONS = {  # the video reasons first: their messages also hold some image reasons' words
    "video_not_found": "video file not found",
    "unreadable_video": "not a readable video",
    "video_count_mismatch": f"{VIDEO_PLACEHOLDER} placeholders for",
    "embedded_video": "embedded video",
    "video_url": "a video URL",
    "bad_video_part": "video part",
    "relative_video_path_without_root": "a relative video path",
    "image_not_found": "image file not found",
    "unreadable_image": "not a readable image",
    "image_count_mismatch": "placeholders for",
    "image_in_assistant_turn": "image in an assistant",
    "bad_image_part": "image part",
    "image_url": "an image URL",
    "image_outside_root": "outside the image folder",
    "image_symlink_loop": "a symlink loop",
    "unknown_image_name": "is not a key of image",
    "relative_image_path_without_root": "a relative image path",
    "image_aspect_ratio": "aspect ratio",
}


@dataclass(frozen=True)
class ImageRef:
    """One image of a chat: where it is, what it holds (sha256 of the file) and its size."""

    path: str
    sha256: str
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int]:
        """What its tokens depend on: (width, height)."""
        return self.width, self.height


@dataclass(frozen=True)
class VideoRef:
    """One video of a chat: where it is, what it holds (sha256 of the file) and what its header
    says: frame count, frame size and frame rate (frames per second)."""

    path: str
    sha256: str
    frames: int
    width: int
    height: int
    fps: float

    @property
    def shape(self) -> VideoShape:
        """What its tokens depend on (stages/core/vision.py `VideoShape`)."""
        return VideoShape(self.frames, self.width, self.height, self.fps)


def is_image_record(obj: Any) -> bool:
    """Whether a record carries images (any of the three shapes).

    >>> is_image_record({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    True
    >>> is_image_record({"messages": [{"role": "user", "content": "hi"}]})
    False
    """
    if not isinstance(obj, dict):
        return False
    if "images" in obj or "videos" in obj or ("image" in obj and "conversations" in obj):
        return True
    turns = obj.get("messages")
    return isinstance(turns, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in turns)


SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
URL_SCHEMES = ("http://", "https://", "ftp://", "s3://", "gs://", "hf://")


class ImageReader:
    """Opens, checks and hashes each image once (a chat set reuses the same images).

    An image is a path, or embedded bytes (a `datasets` Image cell `{"bytes", "path"}`, raw bytes,
    or a `data:image/...;base64,` URI). Paths resolve inside a base folder: `root`
    (`data.image.root`) when given, else the data file's folder (`bases` maps a source's label to
    its folder where that is not the label's parent: a save_to_disk folder; None for a hub data
    set). A path leading out of the base (`..`, a symlink out of it) or a symlink loop is an
    error; an absolute path is kept as given unless `root` is set, then it must lie inside it.
    URLs are refused: prepare runs offline, and a URL's content can change under the same name.

    Embedded images are written once to `store`, named by content (`<sha256>.<ext>`), and
    referred to as `store_as/<name>` (where `store` will be once the stage's output is in place),
    so the shards and the collator treat them like files; without a store they go to a temporary
    folder that lives as long as the process (eval)."""

    def __init__(self, root: Path | None = None, store: Path | None = None, store_as: Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.store, self.store_as = store, store_as if store_as is not None else store
        self.bases: dict[str, Path | None] = {}
        self.seen: dict[Any, ImageRef | SftflowError] = {}

    def base_for(self, data_file: Path | str) -> Path | None:
        """The folder relative image paths of `data_file` resolve in (None: there is none)."""
        if self.root is not None:
            return self.root
        if str(data_file) in self.bases:
            return self.bases[str(data_file)]
        return Path(data_file).parent

    def read(self, ref: Any, data_file: Path | str, line: int, field: str) -> ImageRef:
        found = self._lookup(ref, data_file)
        if isinstance(found, SftflowError):
            raise SftflowError(found.reason, path=data_file, line=line, field=field)
        return found

    def _lookup(self, ref: Any, data_file: Path | str) -> ImageRef | SftflowError:
        if isinstance(ref, dict) and ref.get("bytes") is not None:  # a datasets Image cell
            ref = ref["bytes"]
        elif isinstance(ref, dict) and "path" in ref:
            ref = ref["path"]
        if isinstance(ref, str) and ref.startswith("data:image"):
            try:
                ref = base64.b64decode(ref.split(",", 1)[1], validate=True)
            except (IndexError, ValueError):
                return SftflowError("not a readable image: a data: URI that is not base64 image data")
        if isinstance(ref, (bytes, bytearray)):
            digest = hashlib.sha256(ref).hexdigest()
            if digest not in self.seen:
                self.seen[digest] = self._embedded(bytes(ref), digest)
            return self.seen[digest]
        if not isinstance(ref, str) or not ref.strip():
            return SftflowError(
                "image part has no path: give a path, or embedded image bytes (a datasets Image column)"
            )
        if ref.lower().startswith(URL_SCHEMES):
            return SftflowError(
                f"an image URL ({ref}): images are read from local files or embedded bytes only (prepare"
                " runs offline and a URL's content can change under the same name): download the images"
                " and give their paths, or embed them in a parquet/Arrow data set"
            )
        path = self._resolve(ref, data_file)
        if isinstance(path, SftflowError):
            return path
        if path not in self.seen:
            self.seen[path] = _open_image(path)
        return self.seen[path]

    def read_video(self, ref: Any, data_file: Path | str, line: int, field: str) -> VideoRef:
        """A video file's `VideoRef` (checked and hashed once), or a `file:line: field` error."""
        found = self._lookup_video(ref, data_file)
        if isinstance(found, SftflowError):
            raise SftflowError(found.reason, path=data_file, line=line, field=field)
        return found

    def _lookup_video(self, ref: Any, data_file: Path | str) -> VideoRef | SftflowError:
        if isinstance(ref, dict) and ref.get("bytes") is None and "path" in ref:
            ref = ref["path"]
        if isinstance(ref, (bytes, bytearray, dict)) or (isinstance(ref, str) and ref.startswith("data:")):
            return SftflowError("embedded video bytes are not read: give each video's file path")
        if not isinstance(ref, str) or not ref.strip():
            return SftflowError('a video part has no path: give the video file\'s path ({"type": "video", "video": path})')
        if ref.lower().startswith(URL_SCHEMES):
            return SftflowError(
                f"a video URL ({ref}): videos are read from local files only (prepare runs offline and a URL's"
                " content can change under the same name): download the videos and give their paths"
            )
        path = self._resolve(ref, data_file, "video")
        if isinstance(path, SftflowError):
            return path
        key = ("video", path)
        if key not in self.seen:
            self.seen[key] = _open_video(path)
        return self.seen[key]

    def _resolve(self, ref: str, data_file: Path | str, what: str = "image") -> Path | SftflowError:
        """`ref` as a path inside its base folder (as given, not resolved: shards keep it so)."""
        given = Path(ref)
        base = self.base_for(data_file)
        if given.is_absolute() and self.root is None:
            path, base = given, None
        elif given.is_absolute():
            path = given
        elif base is None:
            return SftflowError(
                f"a relative {what} path ({ref}) in a data set that has no folder (a hub data set):"
                " set data.image.root to the folder the paths are relative to"
            )
        else:
            path = base / given
        try:
            real = path.resolve()
        except (RuntimeError, OSError) as e:  # Python raises either for a symlink loop
            return SftflowError(f"a symlink loop: {path} ({e})")
        except ValueError as e:  # a NUL in the path
            return SftflowError(f"not a readable {what}: {ref!r} is no file name ({e})")
        if base is None:
            return path
        inside = Path(os.path.normpath(base.absolute()))
        if not Path(os.path.normpath(path.absolute())).is_relative_to(inside):
            return SftflowError(
                f"{what} path {ref} is outside the image folder {base} (set data.image.root to a folder"
                f" holding every {what})"
            )
        if not real.is_relative_to(base.resolve()):
            return SftflowError(
                f"{what} path {ref} is a symlink out of the image folder {base} (to {real}): outside the"
                " image folder, its changes would not re-run prepare"
            )
        return path

    def _embedded(self, data: bytes, digest: str) -> ImageRef | SftflowError:
        checked = _check_image(lambda: io.BytesIO(data), "embedded image bytes")
        if isinstance(checked, SftflowError):
            return checked
        width, height, fmt = checked
        if self.store is None:
            self.store = self.store_as = Path(tempfile.mkdtemp(prefix="sftflow-images-"))
            atexit.register(shutil.rmtree, self.store, True)
        name = f"{digest}{SUFFIXES.get(fmt, '.' + fmt.lower())}"
        target = self.store / name
        if not target.is_file():
            # a temp file of this process's own, renamed into place: prepare's map workers
            # (num_proc) may write the same image at once, and atomic_file's clearing of stale
            # temp files would take another worker's from under it
            self.store.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}-", dir=self.store)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the stored images are ordinary files
            os.replace(tmp, target)
        assert self.store_as is not None
        return ImageRef(str(self.store_as / name), digest, width, height)


def _check_image(open_: Any, what: Any) -> tuple[int, int, str] | SftflowError:
    """(width, height, format) of an image, fully decoded once, or why it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(open_()) as im:
            im.verify()  # checks the file's structure without decoding all pixels
        with Image.open(open_()) as im:
            width, height, fmt = im.width, im.height, str(im.format)
            im.load()  # a truncated file fails here, not in the middle of training
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return SftflowError(f"not a readable image: {what} ({type(e).__name__}: {e})")
    return width, height, fmt


def _open_image(path: Path) -> ImageRef | SftflowError:
    try:
        if not path.is_file():
            return SftflowError(f"image file not found: {path}")
        data = path.read_bytes()
    except OSError as e:  # a name too long for the file system, a folder without read access
        return SftflowError(f"not a readable image: {path} ({type(e).__name__}: {e})")
    checked = _check_image(lambda: io.BytesIO(data), path)
    if isinstance(checked, SftflowError):
        return checked
    width, height, _ = checked
    return ImageRef(str(path), hashlib.sha256(data).hexdigest(), width, height)


def _open_video(path: Path) -> VideoRef | SftflowError:
    """A video file's reference: its bytes hashed, its header read by PyAV (frame count, size,
    frame rate: what `transformers.video_utils.load_video` reports) and its packets counted
    against that frame count, without decoding the pixels: a truncated file or a header that
    promises other frames than the stream holds would change the video's tokens in training."""
    import av

    try:
        if not path.is_file():
            return SftflowError(f"video file not found: {path}")
        data = path.read_bytes()
    except OSError as e:
        return SftflowError(f"not a readable video: {path} ({type(e).__name__}: {e})")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                return SftflowError(f"not a readable video: {path} holds no video stream")
            stream = container.streams.video[0]
            frames, rate, width, height = int(stream.frames), stream.average_rate, stream.width, stream.height
            packets = sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, OSError, ValueError, IndexError, UnicodeDecodeError) as e:
        return SftflowError(f"not a readable video: {path} ({type(e).__name__}: {e})")
    if not frames or not rate or not width or not height:
        return SftflowError(
            f"not a readable video: {path} records no frame count, frame rate or frame size in its header"
            " (re-mux it to mp4: ffmpeg -i in -c copy out.mp4)"
        )
    if packets != frames:
        return SftflowError(f"not a readable video: {path}'s header says {frames} frames, its stream holds {packets}")
    return VideoRef(str(path), hashlib.sha256(data).hexdigest(), frames, width, height, float(rate))


def decode_json_cells(obj: Any) -> Any:
    """A table row whose turn list or image list is stored as JSON text (a CSV cell holds no
    lists) with those cells decoded; anything else is returned as it is (the validators then
    name what is wrong).

    >>> decode_json_cells({"images": '["a.png"]', "image": "b.png"})
    {'images': ['a.png'], 'image': 'b.png'}
    """
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for key in ("messages", "conversations", "images", "image", "videos"):
        value = obj.get(key)
        if isinstance(value, str) and value.lstrip()[:1] in ("[", "{") and not (key == "image" and value.lstrip()[:1] == "["):
            try:  # strictly: a duplicated key or a cell nested 3,000 deep stays text, refused as such
                out[key] = json_text.loads(value, None, None)
            except SftflowError:
                pass
    return out


MINICPMV_NAME = re.compile(r"<image_\d+>")  # MiniCPM-V's multi-image placeholders: <image_00>, <image_01>, ...


def parse_image_record(
    obj: dict[str, Any], data_file: Path | str, line: int, reader: ImageReader, names: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], list[ImageRef | VideoRef]]:
    """(messages with content parts, images in order of appearance) of one image chat; `names`
    maps our field names to the data set's own (`columns`), which errors then name."""
    try:
        return _parse_image_record(obj, data_file, line, reader)
    except SftflowError as e:
        if names and e.field:
            e.field = their_field(e.field, names)
        raise


def their_field(field: str, names: dict[str, str]) -> str:
    """An error's field with its leading key in the data set's own name.

    >>> their_field("images[0]", {"images": "pics"}), their_field("conversations[1].value", {"images": "pics"})
    ('pics[0]', 'conversations[1].value')
    """
    head = re.match(r"[A-Za-z_]+", field)
    if head is None or head.group(0) not in names:
        return field
    return names[head.group(0)] + field[head.end():]


def _parse_image_record(
    obj: dict[str, Any], data_file: Path | str, line: int, reader: ImageReader
) -> tuple[list[dict[str, Any]], list[ImageRef | VideoRef]]:
    if "images" in obj or "videos" in obj:  # LLaMA-Factory: <image> / <video> placeholders + lists
        shape = CHAT_SHAPES["sharegpt"] if "conversations" in obj else CHAT_SHAPES["messages"]
        listed = obj.get("images") if obj.get("images") is not None else []  # a table row without images
        if not isinstance(listed, list):
            raise SftflowError("must be a list of images (paths or embedded)", path=data_file, line=line, field="images")
        videos = obj.get("videos") if obj.get("videos") is not None else []
        if not isinstance(videos, list):
            raise SftflowError("must be a list of video paths", path=data_file, line=line, field="videos")
        fields = [f"images[{k}]" for k in range(len(listed))]
        return _placeholder_record(obj, shape, listed, fields, "images", data_file, line, reader, prepend=False,
                                   videos=videos)
    if "image" in obj:
        image = obj["image"]
        if isinstance(image, dict) and "bytes" not in image:  # a table's struct has every row's names: drop nulls
            image = {name: ref for name, ref in image.items() if ref is not None}
        if isinstance(image, dict) and set(image) - {"<image>"} and "bytes" not in image:
            return _named_images_record(obj, image, data_file, line, reader)
        if isinstance(image, dict) and set(image) == {"<image>"}:  # MiniCPM-V's one-image dict
            image = image["<image>"]
        listed = [] if image is None else [image]
        return _placeholder_record(obj, MINICPMV_SHAPE, listed, ["image"], "image", data_file, line, reader, prepend=True)
    return _parts_record(obj, data_file, line, reader)


def _named_images_record(
    obj: dict[str, Any], named: dict[str, Any], data_file: Path | str, line: int, reader: ImageReader
) -> tuple[list[dict[str, Any]], list[ImageRef | VideoRef]]:
    """MiniCPM-V's several images: `{"image": {"<image_00>": path, ...}}`, each name written where
    its image goes (`<image_00>` in a user turn); as MiniCPM-V's loader, an unknown name is an
    error, and so is an image whose name is written nowhere."""
    turns = obj.get("conversations")
    listed, fields, renamed, used = [], [], [], set()
    if isinstance(turns, list):
        for i, m in enumerate(turns):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, str):
                renamed.append(m)
                continue
            for name in MINICPMV_NAME.findall(content):
                if name not in named:
                    raise SftflowError(
                        f"{name} is not a key of image (it has {', '.join(named)})",
                        path=data_file, line=line, field=f"conversations[{i}].content",
                    )
                listed.append(named[name])
                fields.append(f"image[{name}]")
                used.add(name)
            renamed.append({**m, "content": MINICPMV_NAME.sub(IMAGE_PLACEHOLDER, content)})
    unused = [name for name in named if name not in used]
    if unused and isinstance(turns, list):
        raise SftflowError(
            f"{len(listed)} {IMAGE_PLACEHOLDER} placeholders for {len(listed) + len(unused)} image(s):"
            f" {', '.join(unused)} is written in no turn (each image's name goes where the image does)",
            path=data_file, line=line, field="image",
        )
    return _placeholder_record(
        {**obj, "conversations": renamed if isinstance(turns, list) else turns}, MINICPMV_SHAPE, listed, fields,
        "image", data_file, line, reader, prepend=False,
    )


def _placeholder_record(
    obj: dict[str, Any],
    shape: ChatShape,
    listed: list[Any],
    fields: list[str],
    key: str,
    data_file: Path | str,
    line: int,
    reader: ImageReader,
    prepend: bool,
    videos: list[Any] | None = None,
) -> tuple[list[dict[str, Any]], list[ImageRef | VideoRef]]:
    """Text turns with `<image>` placeholders + a list of images (LLaMA-Factory, MiniCPM-V);
    `fields` names each listed image in errors, `key` the list. `videos` (LLaMA-Factory): the
    `videos` list, whose items `<video>` placeholders stand for; the media come back in text order."""
    messages = validate_messages(obj, data_file, line, shape)
    marks = (IMAGE_PLACEHOLDER,) if videos is None else (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
    splitter = re.compile("(" + "|".join(re.escape(m) for m in marks) + ")")
    counts = [sum(m["content"].count(mark) for mark in marks) for m in messages]
    for i, (m, n) in enumerate(zip(messages, counts)):
        if n and m["role"] != "user":
            raise SftflowError(
                f"an image in an assistant or system turn: images are input, only user turns may hold {' or '.join(marks)}",
                path=data_file, line=line, field=f"{shape.turns}[{i}].{shape.content}",
            )
    if prepend and sum(counts) == 0 and len(listed) == 1:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first] = {**messages[first], "content": IMAGE_PLACEHOLDER + "\n" + messages[first]["content"]}
        counts[first] = 1
    n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n_images != len(listed):
        raise SftflowError(
            f"{n_images} {IMAGE_PLACEHOLDER} placeholders for {len(listed)} image(s): each listed image needs"
            f" exactly one {IMAGE_PLACEHOLDER} in a user turn, in order",
            path=data_file, line=line, field=key,
        )
    n_videos = sum(m["content"].count(VIDEO_PLACEHOLDER) for m in messages) if videos is not None else 0
    if videos is not None and n_videos != len(videos):
        raise SftflowError(
            f"{n_videos} {VIDEO_PLACEHOLDER} placeholders for {len(videos)} video(s): each listed video needs"
            f" exactly one {VIDEO_PLACEHOLDER} in a user turn, in order",
            path=data_file, line=line, field="videos",
        )
    images = iter([reader.read(ref, data_file, line, field) for ref, field in zip(listed, fields)])
    clips = iter([reader.read_video(ref, data_file, line, f"videos[{k}]") for k, ref in enumerate(videos or [])])
    out, media = [], []
    for m in messages:
        if m["role"] != "user" or not any(mark in m["content"] for mark in marks):
            out.append(m)
            continue
        parts: list[dict[str, Any]] = []
        for piece in splitter.split(m["content"]):
            if piece == IMAGE_PLACEHOLDER:
                parts.append({"type": "image"})
                media.append(next(images))
            elif piece == VIDEO_PLACEHOLDER:
                parts.append({"type": "video"})
                media.append(next(clips))
            elif piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": "user", "content": parts})
    return out, media


def _parts_record(
    obj: dict[str, Any], data_file: Path | str, line: int, reader: ImageReader
) -> tuple[list[dict[str, Any]], list[ImageRef | VideoRef]]:
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
            elif kind == "video":
                if m.get("role") != "user":
                    raise SftflowError(
                        "an image in an assistant or system turn: images and videos are input, only user turns may"
                        " hold them",
                        path=data_file, line=line, field=where,
                    )
                ref = part["video"] if part.get("video") is not None else part.get("path")
                images.append(reader.read_video(ref, data_file, line, f"{where}.video"))
                parts.append({"type": "video"})
                texts.append(VIDEO_PLACEHOLDER)
            elif kind == "image":
                if m.get("role") != "user":
                    raise SftflowError(
                        "an image in an assistant or system turn: images are input, only user turns may hold them",
                        path=data_file, line=line, field=where,
                    )
                ref = part["image"] if part.get("image") is not None else part.get("path")
                images.append(reader.read(ref, data_file, line, f"{where}.image"))
                parts.append({"type": "image"})
                texts.append(IMAGE_PLACEHOLDER)
            else:
                raise SftflowError(
                    'an image part must be {"type": "image", "image": path}, a video part {"type": "video", "video": path},'
                    ' a text part {"type": "text", "text": str}',
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

"""Vision-language models: what prepare, train, merge and eval share about images.

Every family is driven by its own processor (`AutoProcessor` of the model folder `base` wrote):
- the chat template writes one placeholder per image (the family's `placeholder`, e.g. Qwen's
  `<|image_pad|>`, Gemma 3's `<start_of_image>`, SmolVLM's `<image>`); the processor replaces it
  with the image's whole token sequence, which for every family depends on the image's size
  only (Qwen's resize to a multiple of patch x merge, SmolVLM's tiles, LLaVA-OneVision's grid,
  MiniCPM-V's slices). `ImageTokens` asks the processor once per size, on a blank image of that
  size, and keeps the text: prepare needs no pixels, only each image's header;
- the collator hands the processor the batch's images and keeps what it returns for the pixels
  (`pixel_values` and the family's own: `image_grid_thw`, `pixel_attention_mask`,
  `image_sizes`, ...), checking that each image still becomes the number of tokens it was
  prepared with;
- what the processor does not say — module names, packing, per-token type ids — is the family
  table (stages/core/vlm_families.py).

Videos (the families whose table entry names a `video` placeholder and whose processor has a
video processor: Qwen2.5-VL, Qwen3-VL) go the same way: a video's text depends on its frame
count, frame size and frame rate (which frames the video processor samples, Qwen3-VL's
timestamps), never on its pixels, so `ImageTokens` asks the processor once per chat shape with
blank frames and the same metadata; the collator decodes the frames the video processor would
sample (PyAV, through `transformers.video_utils.load_video`) and hands them over with that
metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from stages.core.chats import IGNORE_INDEX
from stages.core.errors import SftflowError
from stages.core.vlm_families import Family, family_of, is_vision_type

if TYPE_CHECKING:
    import torch

IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory / MiniCPM-V text placeholder for "an image here" in records
VIDEO_PLACEHOLDER = "<video>"  # LLaMA-Factory's for "a video here"
# what a processor returns from the text; sftflow builds these from the prepared ids instead
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def model_config(model_dir: Path) -> dict[str, Any]:
    """config.json of what `base` wrote (a folder, or a pointer to a hub id: its resolved config)."""
    path = Path(model_dir) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import AutoConfig

    from stages.core.loading import load_source

    name, options = load_source(Path(model_dir))
    return AutoConfig.from_pretrained(name, revision=options["revision"], trust_remote_code=options["trust_remote_code"]).to_dict()


def is_vision_config(config: dict[str, Any]) -> bool:
    """Whether a config.json describes a vision-language model sftflow can train.

    >>> is_vision_config({"model_type": "qwen2_5_vl"}), is_vision_config({"model_type": "llama"})
    (True, False)
    """
    return is_vision_type(config.get("model_type"))


def is_vision_model(model_dir: Path) -> bool:
    """Whether `model_dir` (models/base, an adapter's base, models/merged) holds a VLM."""
    try:
        return is_vision_config(model_config(model_dir))
    except (OSError, ValueError):
        return False


def model_family(model_dir: Path) -> Family:
    return family_of(model_config(model_dir))


def load_processor(model_dir: Path, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """The model's processor (what `base` saved beside the weights or the hub pointer), resizing
    within the given pixel bounds where the family has them (Qwen-VL; elsewhere None only)."""
    from transformers import AutoProcessor

    from stages.core.integrity import verify_dir
    from stages.core.loading import trust_remote_code

    path = Path(model_dir)
    verify_dir(path)
    family = model_family(path)
    processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code(path))
    if min_pixels is None and max_pixels is None:
        return processor
    if not family.pixel_bounds:
        raise SftflowError(
            f"{family.name} sizes images by its image processor (preprocessor_config.json), not by a pixel"
            " budget: leave data.image.min_pixels / max_pixels unset",
            field="data.image.max_pixels",
        )
    size = {k: v for k, v in dict(processor.image_processor.size).items() if k in ("shortest_edge", "longest_edge") and v}
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    processor.image_processor.size = size
    return processor


def prepared_processor(model_dir: Path, manifest: dict[str, Any]) -> Any:
    """The model's processor resizing exactly as prepare counted tokens: its image settings come
    from the prepared manifest, not from params (prepare's params decided the token counts)."""
    processor = load_processor(model_dir)
    for key, value in manifest["vision"]["image_processor"].items():
        if hasattr(processor.image_processor, key):
            setattr(processor.image_processor, key, value)
    for key, value in manifest["vision"].get("video_processor", {}).items():  # where the data holds videos
        if hasattr(processor.video_processor, key):
            setattr(processor.video_processor, key, value)
    return processor


def image_settings(processor: Any) -> dict[str, Any]:
    """The image processor's settings that decide token counts and pixels (its saved config):
    part of the prepared data's identity, and what train checks it resizes with."""
    config = processor.image_processor.to_dict()
    return {k: config[k] for k in sorted(config) if not k.startswith("_")}


class VideoShape(NamedTuple):
    """What a video's tokens depend on: its frame count, frame size and frame rate (the frames
    the video processor samples, and Qwen3-VL's timestamps, follow from these; the pixels do not
    count)."""

    frames: int
    width: int
    height: int
    fps: float


Media = tuple[int, int] | VideoShape  # an image's (width, height), or a video's shape


def video_settings(processor: Any) -> dict[str, Any]:
    """The video processor's settings (its saved config), as `image_settings` for images: they
    decide which frames are sampled and how many tokens they become. Empty without one."""
    video = getattr(processor, "video_processor", None)
    if video is None:
        return {}
    config = video.to_dict()
    return {k: config[k] for k in sorted(config) if not k.startswith("_")}


def sampled_frames(processor: Any, frames: int, fps: float) -> list[int]:
    """The frame indices the video processor takes from a video of `frames` frames at `fps`:
    its own `sample_frames` with its own settings where it samples (`do_sample_frames`, as
    Qwen3-VL), every frame where it does not (Qwen2.5-VL)."""
    from transformers.video_utils import VideoMetadata

    video = processor.video_processor
    if not video.do_sample_frames:
        return list(range(frames))
    # what the processor's preprocess hands sample_frames: every setting it knows but these
    own = ("input_data_format", "do_convert_rgb", "do_sample_frames", "device", "video_metadata", "return_tensors")
    settings = {k: getattr(video, k, None) for k in video.valid_kwargs.__annotations__ if k not in own}
    meta = VideoMetadata(total_num_frames=frames, fps=fps, duration=frames / fps if fps else 0.0)
    return [int(i) for i in video.sample_frames(meta, **settings)]


def video_metadata(processor: Any, shape: VideoShape, indices: list[int] | None = None) -> Any:
    """The metadata `load_video(backend="pyav")` gives for a video of this shape, with the
    frames the video processor samples (`frames_indices`: the frames handed over, already sampled)."""
    import numpy as np
    from transformers.video_utils import VideoMetadata

    frames, width, height, fps = shape
    return VideoMetadata(
        total_num_frames=frames, fps=float(fps), width=width, height=height,
        duration=frames / fps if fps else 0.0, video_backend="pyav",
        frames_indices=np.array(indices if indices is not None else sampled_frames(processor, frames, fps)),
    )


def load_video_frames(path: str, processor: Any) -> tuple[Any, Any]:
    """(the frames the video processor samples from the video file at `path`, decoded by PyAV
    as an (n, height, width, 3) array, and their metadata): only those frames are converted, so a
    long video costs what its samples do."""
    from transformers.video_utils import load_video

    def pick(metadata: Any, **_: Any) -> list[int]:
        return sampled_frames(processor, int(metadata.total_num_frames), float(metadata.fps))

    return load_video(path, backend="pyav", sample_indices_fn=pick)


class ImageTokens:
    """The text each image (and video) of a chat becomes for the processor's model, found once
    per chat shape (its media in text order: each image's (width, height), each video's
    `VideoShape`).

    The processor runs on blank images / blank frames of those shapes behind the family's
    placeholders (kept apart by a plain-text separator) and what it wrote is decoded (special
    tokens kept); the decoded text must tokenize back to the same ids, so putting each part in
    place of its placeholder gives exactly the processor's ids. A whole chat at a time, because
    an image's tokens may depend on more than its size: MiniCPM-V numbers a chat's images, and
    LLaVA-OneVision tiles an image only when it is alone in its chat. A video's blank frames are
    the ones the video processor samples, handed over with the metadata the real file gives
    (`video_metadata`), so its frame sampling and timestamps are the real video's."""

    SEPARATOR = "\n|sftflow-image-boundary|\n"

    def __init__(self, processor: Any, family: Family) -> None:
        self.processor, self.family = processor, family
        self.placeholder: str = getattr(processor, family.placeholder)
        # the chat template's text for one video, where the family and its processor take videos
        takes_video = family.video is not None and getattr(processor, "video_processor", None) is not None
        self.video_placeholder: str | None = getattr(processor, family.video, None) if takes_video else None
        self.tokenizer = processor.tokenizer
        self._cache: dict[tuple[Media, ...], list[str]] = {}

    def placeholder_of(self, media: Media) -> str:
        """The placeholder the chat template writes for this image or video."""
        if not isinstance(media, VideoShape):
            return self.placeholder
        if self.video_placeholder is None:
            raise SftflowError(f"{self.family.name} takes no videos here: give images, or use Qwen2.5-VL or Qwen3-VL",
                               field="model.name_or_path")
        return self.video_placeholder

    def expansions(self, sizes: list[Media]) -> list[str]:
        """Each image's (video's) text, for a chat whose media have these shapes, in text order."""
        key = tuple(VideoShape(*m) if isinstance(m, VideoShape) else (int(m[0]), int(m[1])) for m in sizes)
        if key and key not in self._cache:
            import numpy as np
            from PIL import Image

            text = self.SEPARATOR.join(self.placeholder_of(m) for m in key)
            inputs: dict[str, Any] = {}
            blanks = [Image.new("RGB", m) for m in key if not isinstance(m, VideoShape)]
            if blanks:
                inputs["images"] = [blanks]
            videos = [m for m in key if isinstance(m, VideoShape)]
            if videos:
                metas = [video_metadata(self.processor, v) for v in videos]
                inputs |= {"videos": [np.zeros((len(m.frames_indices), v.height, v.width, 3), np.uint8)
                                      for v, m in zip(videos, metas)],
                           "video_metadata": metas, "do_sample_frames": False}
            out = self.processor(text=[text], add_special_tokens=False, **inputs)
            ids = list(out["input_ids"][0])
            text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            parts = text.split(self.SEPARATOR)
            if self.tokenizer(text, add_special_tokens=False)["input_ids"] != ids or len(parts) != len(key):
                raise SftflowError(
                    "the processor's text for a chat's images does not tokenize back to its own ids:"
                    " this tokenizer and processor do not belong together",
                    field="model.tokenizer",
                )
            self._cache[key] = parts
        return self._cache.get(key, [])

    def expand(self, text: str, sizes: list[Media]) -> tuple[str, list[tuple[int, int]]]:
        """`text` with its i-th image or video placeholder (in text order) replaced by that
        medium's text, and where each lies in the result ([start, end) characters).

        Raises ValueError when the text holds other placeholders than the media, in order."""
        return expand_placeholders(text, [self.placeholder_of(m) for m in sizes], self.expansions(sizes),
                                   (self.placeholder, self.video_placeholder))


def expand_placeholders(
    text: str, placeholder: str | list[str], replacements: list[str], kinds: tuple[str | None, ...] = ()
) -> tuple[str, list[tuple[int, int]]]:
    """Replace the i-th placeholder with replacements[i]; also return each replacement's span.
    `placeholder` is the one placeholder of every replacement, or each one's own (an image's or
    a video's), which the text must hold in that order; `kinds`: other placeholders the text
    must not hold more of.

    >>> expand_placeholders("a<p>b<p>c", "<p>", ["XX", "YYY"])
    ('aXXbYYYc', [(1, 3), (4, 7)])
    >>> expand_placeholders("<v>a<p>", ["<v>", "<p>"], ["V", "P"])
    ('VaP', [(0, 1), (2, 3)])
    """
    import re

    wanted = [placeholder] * len(replacements) if isinstance(placeholder, str) else list(placeholder)
    known = {k for k in (*kinds, *wanted, *([placeholder] if isinstance(placeholder, str) else [])) if k}
    pattern = "|".join(re.escape(k) for k in sorted(known, key=len, reverse=True))
    found = list(re.finditer(pattern, text)) if pattern else []
    if [m.group(0) for m in found] != wanted:
        if len(known) <= 1:
            raise ValueError(f"the rendered chat holds {len(found)} image slot(s) for {len(replacements)} image(s)")
        raise ValueError(f"the rendered chat holds the slots {[m.group(0) for m in found]} for media {wanted}")
    out, spans, at, last = [], [], 0, 0
    for m, rep in zip(found, replacements):
        out.append(text[last : m.start()])
        at += m.start() - last
        spans.append((at, at + len(rep)))
        out.append(rep)
        at += len(rep)
        last = m.end()
    out.append(text[last:])
    return "".join(out), spans


def token_type_ids(input_ids: torch.Tensor, family: Family, processor: Any) -> dict[str, torch.Tensor]:
    """The per-token types the family's model reads, from the ids: Qwen's mm_token_type_ids
    (1 image, 2 video), Gemma 3's token_type_ids (1 image); nothing for the others."""
    if family.token_types is None:
        return {}
    types = (input_ids == processor.image_token_id).long()
    video = getattr(processor, "video_token_id", None)
    if family.token_types == "mm_token_type_ids" and video is not None:
        types = types + 2 * (input_ids == video).long()
    return {family.token_types: types}


def _checked_file(p: str) -> None:
    if not Path(p).is_file():  # shards keep paths as prepare saw them: relative to where it ran
        raise SftflowError(
            f"file not found from {Path.cwd()}: run train/merge/eval in the folder prepare ran in"
            " (the pipeline's folder), or re-run prepare",
            path=p,
        )


def pixel_inputs(samples: list[dict[str, Any]], processor: Any, family: Family) -> dict[str, torch.Tensor]:
    """What the processor gives the model for each sample's images and videos (a prepared row:
    its `input_ids`, `images`, each `{"path", "size", ...}`, and `videos`, each `{"path",
    "frames", "size", "fps", ...}`), in order. Each image must still have its prepared size (a
    video its frame count, size and rate), and each sample's images (videos) must still become as
    many image (video) tokens as its row holds: a replaced file or changed processor settings
    would otherwise put a different number of features than tokens."""
    from PIL import Image

    opened: list[list[Any]] = []
    for sample in samples:
        opened.append([])
        for im in sample.get("images") or []:
            p = im["path"]
            _checked_file(p)
            with Image.open(p) as f:
                rgb = f.convert("RGB")
            if [rgb.width, rgb.height] != list(im["size"]):
                raise SftflowError(
                    f"the image is {rgb.width}x{rgb.height}, prepared as {im['size'][0]}x{im['size'][1]}:"
                    " re-run `sftflow prepare`",
                    path=p,
                )
            opened[-1].append(rgb)
    out: dict[str, Any] = {}
    with_images = [(sample, ims) for sample, ims in zip(samples, opened) if ims]
    if with_images:
        placeholder = getattr(processor, family.placeholder)
        got = processor(text=[placeholder * len(ims) for _, ims in with_images], images=[ims for _, ims in with_images],
                        add_special_tokens=False, padding=True, return_tensors="pt")
        _check_counts([s for s, _ in with_images], got, processor.image_token_id, "images", "image")
        out |= got
    with_videos = [sample for sample in samples if sample.get("videos")]
    if with_videos:
        out |= _video_inputs(with_videos, processor, family)
    return {k: v for k, v in out.items() if k not in TEXT_KEYS}


def _video_inputs(samples: list[dict[str, Any]], processor: Any, family: Family) -> dict[str, Any]:
    """The processor's video inputs (`pixel_values_videos`, `video_grid_thw`, Qwen2.5-VL's
    `second_per_grid_ts`) for the samples' videos: the frames the video processor samples,
    decoded with PyAV, with the metadata prepare counted their tokens with."""
    if family.video is None or getattr(processor, "video_processor", None) is None:
        raise SftflowError(f"{family.name} takes no videos here: give images, or use Qwen2.5-VL or Qwen3-VL",
                           field="model.name_or_path")
    frames, metas = [], []
    for sample in samples:
        for v in sample["videos"]:
            _checked_file(v["path"])
            video, meta = load_video_frames(v["path"], processor)
            found = [int(meta.total_num_frames), int(meta.width), int(meta.height)]
            if found != [v["frames"], *v["size"]] or abs(float(meta.fps) - v["fps"]) > 1e-6 * max(1.0, v["fps"]):
                raise SftflowError(
                    f"the video has {found[0]} frames of {found[1]}x{found[2]} at {meta.fps:g} fps, prepared with"
                    f" {v['frames']} of {v['size'][0]}x{v['size'][1]} at {v['fps']:g}: re-run `sftflow prepare`",
                    path=v["path"],
                )
            frames.append(video)
            metas.append(meta)
    placeholder = getattr(processor, family.video)
    got = processor(text=[placeholder * len(s["videos"]) for s in samples], videos=frames, video_metadata=metas,
                    do_sample_frames=False, add_special_tokens=False, padding=True, return_tensors="pt")
    _check_counts(samples, got, processor.video_token_id, "videos", "video")
    return dict(got)


def _check_counts(samples: list[dict[str, Any]], got: Any, token: int, column: str, what: str) -> None:
    for sample, n in zip(samples, (got["input_ids"] == token).sum(dim=1).tolist()):
        want = sum(1 for t in sample["input_ids"] if t == token)
        if n != want:
            raise SftflowError(
                f"the chat's {column} become {n} {what} tokens, its prepared row holds {want}: the {column} or the"
                " processor's settings changed; re-run `sftflow prepare`",
                path=sample[column][0]["path"],
            )


def rope_positions(input_ids: list[int], grids: list[tuple[int, int, int]], merge_size: int, image_token: int) -> Any:
    """Qwen-VL's 3-D rotary positions (temporal, height, width) for one sample, as a (3, L) tensor.

    Text tokens count up on all three axes; an image's tokens sit on a (h, w) grid starting at
    the position after the text before it, and the text after it resumes past the grid's larger
    side. transformers computes this inside the model from `mm_token_type_ids`; a padding-free
    packed row holds several samples, so their positions are computed here, per sample, and
    concatenated (the packed = padded loss test holds this to the model's own computation).

    >>> rope_positions([7, 9, 9, 9, 9, 8], [(1, 4, 4)], 2, 9).tolist()
    [[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]
    """
    import torch

    out = torch.zeros(3, len(input_ids), dtype=torch.long)
    pos, i, k = 0, 0, 0
    while i < len(input_ids):
        if input_ids[i] != image_token:
            out[:, i] = pos
            pos, i = pos + 1, i + 1
            continue
        t, h, w = grids[k]
        gh, gw = h // merge_size, w // merge_size
        n = t * gh * gw
        tt = torch.arange(t).repeat_interleave(gh * gw)
        hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
        ww = torch.arange(gw).repeat(t * gh)
        out[:, i : i + n] = torch.stack([tt, hh, ww]) + pos
        pos += max(gh, gw)  # as transformers does for still images
        i, k = i + n, k + 1
    return out


def load_vlm(model_dir: Path, dtype: str = "float32", **kwargs: Any) -> Any:
    """The vision-language model (its family's image-text-to-text class) in the given dtype."""
    from transformers import AutoModelForImageTextToText

    from stages.core.loading import load_source, torch_dtype

    name, options = load_source(Path(model_dir))
    return AutoModelForImageTextToText.from_pretrained(
        name, revision=options["revision"], trust_remote_code=options["trust_remote_code"], dtype=torch_dtype(dtype),
        use_safetensors=True,  # never a pickled .bin
        **kwargs,
    )


def module_prefix(model: Any, last: str, what: str) -> str:
    """The dotted name of the outermost module whose name ends in `last` (a family table name)
    inside a (possibly peft-wrapped) VLM."""
    for name, _ in model.named_modules():
        if name == last or name.endswith("." + last):
            return name
    raise SftflowError(f"cannot find the {what} ({last}) inside this vision-language model")


def language_model_prefix(model: Any, family: Family) -> str:
    return module_prefix(model, family.language_model, "language model")


def vision_tower_prefix(model: Any, family: Family) -> str:
    return module_prefix(model, family.tower, "vision tower")


def projector_prefixes(model: Any, family: Family) -> tuple[str, ...]:
    names = [n for n, _ in model.named_modules()]
    return tuple(module_prefix(model, p, "projector") for p in family.projector
                 if any(n == p or n.endswith("." + p) for n in names))


class VisionCollator:
    """Token rows + their images -> the VLM's inputs (padded, or one padding-free row where the
    family packs).

    Picklable (a plain object holding the processor), so `train.dataloader_workers` worker
    processes decode and resize the next batches' images while a step runs."""

    def __init__(self, processor: Any, family: Family, pad_id: int, packing: bool) -> None:
        self.processor, self.family, self.pad_id = processor, family, pad_id
        self.packing = packing and family.packing != "none"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if any(f.get("images") or f.get("videos") for f in features):
            batch |= pixel_inputs(features, self.processor, self.family)
        if self.packing and any(f.get("videos") for f in features):
            # the run plan pads runs whose data holds videos (stages/train/plan.py): never here
            raise SftflowError("a packed batch with videos: video rows train in padded batches (train.packing: none)",
                               field="train.packing")
        if self.packing:
            batch |= self._packed(features, batch.get("image_grid_thw"))
        else:
            batch |= self._padded(features)
        batch |= token_type_ids(batch["input_ids"], self.family, self.processor)
        return batch

    def _padded(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def _packed(self, features: list[dict[str, Any]], grids: Any) -> dict[str, Any]:
        import torch

        ids, labels, text_pos, rope = [], [], [], []
        grids = [tuple(int(x) for x in g) for g in grids.tolist()] if grids is not None else []
        k = 0
        for f in features:
            row = list(f["input_ids"])
            ids += row
            # a sample's first token is never predicted from the previous sample's last
            labels += [IGNORE_INDEX, *list(f["labels"])[1:]]
            text_pos.append(torch.arange(len(row)))
            if self.family.packing == "mrope":
                n = len(f.get("images") or [])
                rope.append(rope_positions(row, grids[k : k + n], self.processor.image_processor.merge_size,
                                           self.processor.image_token_id))
                k += n
        positions = torch.cat(text_pos)[None]
        if self.family.packing == "mrope":  # (4, 1, N): text positions first (they carry the sample bounds)
            positions = torch.cat([positions, torch.cat(rope, dim=1)], dim=0)[:, None, :]
        # without a cache, transformers keeps the chats apart by the restarting positions
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": positions,
                "use_cache": False}

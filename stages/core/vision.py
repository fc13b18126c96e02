"""Vision-language models: what prepare, train, merge and eval share about images.

Qwen2-VL / Qwen2.5-VL (the family supported first) see an image as `<|vision_start|>`, then
one `<|image_pad|>` per merged patch, then `<|vision_end|>`. The chat template writes a single
`<|image_pad|>` per image; the processor expands it to the image's count, which follows from
the *resized* image: each side rounded to a multiple of patch x merge (28 px) within
[min_pixels, max_pixels], then (h/14)(w/14)/2² tokens. Their processor class
(`Qwen2_5_VLProcessor`) cannot be built without torchvision (it insists on a video processor),
so sftflow does the expansion itself with the image processor alone — which transformers
builds with its PIL backend when torchvision is missing — and the count is checked against the
`image_grid_thw` the image processor returns whenever pixels are made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.chats import IGNORE_INDEX
from stages.core.errors import SftflowError

if TYPE_CHECKING:
    import torch

# model_type of the config -> the family's conventions. Qwen2-VL and Qwen2.5-VL share them.
VISION_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
IMAGE_PLACEHOLDER = "<image>"
# processor files copied verbatim from a source folder when present (they need no torchvision to copy)
PROCESSOR_FILES = ("video_preprocessor_config.json", "processor_config.json", "chat_template.json")  # LLaMA-Factory / MiniCPM-V text placeholder for "an image here"

# QLoRA quantizes a VLM's language model only: these stay in full precision (4-bit ViT weights
# cost accuracy for little memory). train builds the 4-bit model with them, merge rebuilds the
# same one. transformers matches each from the start of a module's name (or as its suffix):
# "model.visual" is the tower in transformers 5's layout, "visual" in older checkpoints' layout.
FULL_PRECISION_IN_4BIT = ("model.visual", "visual", "lm_head")

@dataclass(frozen=True)
class VisionTokens:
    """The token ids and strings that frame an image in the token stream."""

    image_pad: int
    vision_start: int
    vision_end: int
    pad_text: str = "<|image_pad|>"

    @property
    def never_trained(self) -> frozenset[int]:
        """Ids that never carry loss: the model cannot predict pixels, and the markers are
        part of the prompt."""
        return frozenset((self.image_pad, self.vision_start, self.vision_end))


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
    return config.get("model_type") in VISION_MODEL_TYPES


def is_vision_model(model_dir: Path) -> bool:
    """Whether `model_dir` (models/base, an adapter's base, models/merged) holds a VLM."""
    try:
        return is_vision_config(model_config(model_dir))
    except (OSError, ValueError):
        return False


def vision_tokens(config: dict[str, Any]) -> VisionTokens:
    """The family's image token ids, from the model config (they must match the tokenizer)."""
    return VisionTokens(config["image_token_id"], config["vision_start_token_id"], config["vision_end_token_id"])


def check_tokenizer(tok: Any, tokens: VisionTokens, model_dir: Path) -> None:
    """The tokenizer must spell the vision tokens with the config's ids, or images land nowhere."""
    for name, want in (("<|image_pad|>", tokens.image_pad), ("<|vision_start|>", tokens.vision_start),
                       ("<|vision_end|>", tokens.vision_end)):
        got = tok.convert_tokens_to_ids(name)
        if got != want:
            raise SftflowError(
                f"the tokenizer maps {name} to {got}, the model config expects {want}: use the model's own tokenizer",
                path=model_dir,
                field="model.tokenizer",
            )


def load_image_processor(model_dir: Path, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """The model's image processor (preprocessor_config.json), resizing within the given bounds.

    AutoImageProcessor picks the torchvision backend where torchvision is installed and the
    PIL one otherwise; both resize with the same rule, so token counts agree."""
    from transformers import AutoImageProcessor

    from stages.core.loading import load_source

    path = Path(model_dir)
    name, options = load_source(path)
    if (path / "preprocessor_config.json").is_file():
        name, options["revision"] = str(path), None  # base saved the hub model's processor here
    proc = AutoImageProcessor.from_pretrained(name, revision=options["revision"], trust_remote_code=options["trust_remote_code"])
    size = dict(proc.size)
    size = {k: v for k, v in size.items() if k in ("shortest_edge", "longest_edge") and v}
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    proc.size = size
    return proc


def image_grid(width: int, height: int, processor: Any) -> tuple[int, int, int]:
    """(t, h, w) patch grid of one image after the processor's resize: what the vision tower sees.

    >>> from types import SimpleNamespace
    >>> p = SimpleNamespace(patch_size=14, merge_size=2, size={"shortest_edge": 3136, "longest_edge": 12544})
    >>> image_grid(100, 60, p)
    (1, 4, 8)
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = processor.patch_size * processor.merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=processor.size["shortest_edge"],
                        max_pixels=processor.size["longest_edge"])
    return 1, h // processor.patch_size, w // processor.patch_size


def image_token_count(grid: tuple[int, int, int] | list[int], merge_size: int) -> int:
    """How many `<|image_pad|>` tokens stand for an image with this grid.

    >>> image_token_count((1, 4, 8), 2)
    8
    """
    t, h, w = grid
    return t * h * w // merge_size**2


def expand_image_pads(text: str, counts: list[int], pad_text: str = "<|image_pad|>") -> str:
    """Replace the i-th single `pad_text` the template wrote with counts[i] copies.

    >>> expand_image_pads("a<p>b<p>c", [2, 3], "<p>")
    'a<p><p>b<p><p><p>c'
    """
    parts = text.split(pad_text)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"the rendered chat holds {len(parts) - 1} image slots for {len(counts)} images")
    out = [parts[0]]
    for n, rest in zip(counts, parts[1:]):
        out += [pad_text * n, rest]
    return "".join(out)


def rope_positions(input_ids: list[int], grids: list[tuple[int, int, int]], merge_size: int, image_pad: int) -> Any:
    """Qwen2-VL's 3-D rotary positions (temporal, height, width) for one sample, as a (3, L) tensor.

    Text tokens count up on all three axes; an image's tokens sit on a (h, w) grid starting at
    the position after the text before it, and the text after it resumes past the grid's larger
    side. transformers computes this inside the model from `mm_token_type_ids`; a padding-free
    packed row holds several samples, so their positions are computed here, per sample, and
    concatenated (the packed = unpacked loss test holds this to the model's own computation).

    >>> rope_positions([7, 9, 9, 9, 9, 8], [(1, 4, 4)], 2, 9).tolist()
    [[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]
    """
    import torch

    out = torch.zeros(3, len(input_ids), dtype=torch.long)
    pos, i, k = 0, 0, 0
    while i < len(input_ids):
        if input_ids[i] != image_pad:
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


def pixel_inputs(paths: list[str], processor: Any, grids: list[Any] | None = None) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` for the images at `paths`, in order; when `grids` (from
    the prepared shards) are given, the processor's grids must equal them: a changed image or
    resize setting would otherwise put a different number of features than tokens."""
    from PIL import Image

    images = []
    for p in paths:
        if not Path(p).is_file():  # shards keep paths as prepare saw them: relative to where it ran
            raise SftflowError(
                f"image not found from {Path.cwd()}: run train/merge/eval in the folder prepare ran in"
                " (the pipeline's folder), or re-run prepare",
                path=p,
            )
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    out = processor(images=images, return_tensors="pt")
    if grids is not None:
        got = [tuple(int(x) for x in g) for g in out["image_grid_thw"].tolist()]
        want = [tuple(int(x) for x in g) for g in grids]
        if got != want:
            bad = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            raise SftflowError(
                f"the image resizes to grid {got[bad]}, but was prepared as {want[bad]}: re-run `sftflow prepare`",
                path=paths[bad],
            )
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


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


def language_model_prefix(model: Any) -> str:
    """The dotted name of the language model inside a (possibly peft-wrapped) VLM."""
    for name, _ in model.named_modules():
        if name.endswith("language_model"):
            return name
    raise SftflowError("cannot find the language model inside this vision-language model")


def vision_tower_prefix(model: Any) -> str:
    for name, _ in model.named_modules():
        if name.endswith("visual"):
            return name
    raise SftflowError("cannot find the vision tower inside this vision-language model")


class VisionCollator:
    """Token rows + their images -> the VLM's inputs (padded or one padding-free row).

    Picklable (a plain object holding the image processor), so `train.dataloader_workers`
    worker processes decode and resize the next batches' images while a step runs."""

    def __init__(self, processor: Any, tokens: VisionTokens, pad_id: int, packing: bool) -> None:
        self.processor, self.tokens, self.pad_id, self.packing = processor, tokens, pad_id, packing

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        images = [im for f in features for im in f.get("images") or []]
        batch: dict[str, Any] = {}
        if images:
            batch |= pixel_inputs([im["path"] for im in images], self.processor, [im["grid"] for im in images])
        if self.packing:
            batch |= self._packed(features)
        else:
            batch |= self._padded(features)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.tokens.image_pad).int()
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

    def _packed(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids, labels, text_pos, rope = [], [], [], []
        merge = self.processor.merge_size
        for f in features:
            row = list(f["input_ids"])
            ids += row
            # a sample's first token is never predicted from the previous sample's last
            labels += [IGNORE_INDEX, *list(f["labels"])[1:]]
            text_pos.append(torch.arange(len(row)))
            grids = [tuple(im["grid"]) for im in f.get("images") or []]
            rope.append(rope_positions(row, grids, merge, self.tokens.image_pad))
        positions = torch.cat([torch.cat(text_pos)[None], torch.cat(rope, dim=1)], dim=0)  # (4, N)
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": positions[:, None, :],  # (4, 1, N): text positions first (sample bounds)
        }

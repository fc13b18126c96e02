"""The vision-language families sftflow trains, and the little it must know about each.

Everything about *pixels and tokens* comes from the model's own processor (`AutoProcessor`):
how an image is resized, how many tokens it becomes, which strings stand for it, what the
model's forward takes. What the processor does not say lives here, once per family:
- `placeholder`: the processor attribute holding the text the chat template writes for one
  image (the processor replaces it with the image's whole token sequence), and `video` the same
  for a video where the family takes videos;
- the module names of the three parts `train.vision` switches (vision tower, projector,
  language model), which QLoRA keeps in full precision and LoRA targets;
- `packing`: how several image chats share one padding-free row: `mrope` (Qwen's 3-D rotary
  positions, computed per chat), `positions` (1-D positions restarting per chat) or `none`
  (padded batches only, with the reason in `why_padded`);
- `token_types`: the per-token input the model reads besides the ids (Qwen's
  `mm_token_type_ids` place its 3-D positions; Gemma 3's `token_type_ids` let an image's tokens
  attend to each other both ways in training), derived from the ids;
- `pixel_bounds`: whether `data.image.min_pixels` / `max_pixels` mean something to the image
  processor (Qwen's resize to a pixel budget) — elsewhere the processor's own size rules.

>>> family_of({"model_type": "qwen2_5_vl"}).tower, family_of({"model_type": "gemma3"}).packing
('visual', 'none')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.core.errors import SftflowError


@dataclass(frozen=True)
class Family:
    """One family's conventions (module names are the last components under the model)."""

    name: str
    tower: str
    projector: tuple[str, ...]
    language_model: str
    placeholder: str = "image_token"
    video: str | None = None
    packing: str = "positions"  # mrope | positions | none
    why_padded: str = ""
    token_types: str | None = None  # mm_token_type_ids | token_type_ids | None
    pixel_bounds: bool = False

    def full_precision_in_4bit(self) -> tuple[str, ...]:
        """Modules QLoRA leaves unquantized: 4-bit ViT or projector weights cost accuracy for
        little memory, and lm_head is never quantized. transformers matches each pattern as a
        regex from the start of a module's dotted name, up to a dot.

        >>> print(*FAMILIES["gemma3"].full_precision_in_4bit())
        (?:.*\\.)?vision_tower (?:.*\\.)?multi_modal_projector lm_head
        """
        return (*(rf"(?:.*\.)?{name}" for name in (self.tower, *self.projector)), "lm_head")


_QWEN = {"tower": "visual", "projector": ("merger",), "language_model": "language_model", "video": "video_token",
         "packing": "mrope", "token_types": "mm_token_type_ids", "pixel_bounds": True}

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("Qwen2-VL", **_QWEN),
    "qwen2_5_vl": Family("Qwen2.5-VL", **_QWEN),
    # Qwen3-VL's tower also feeds "deepstack" features from inner layers through mergers of its own
    "qwen3_vl": Family("Qwen3-VL", **{**_QWEN, "projector": ("merger", "deepstack_merger_list")}),
    "gemma3": Family(
        "Gemma 3", "vision_tower", ("multi_modal_projector",), "language_model", placeholder="boi_token",
        packing="none", token_types="token_type_ids",
        why_padded="an image's tokens attend to each other both ways (token_type_ids), which the packed "
        "row's causal kernels cannot express",
    ),
    "idefics3": Family("Idefics3", "vision_model", ("connector",), "text_model"),
    "smolvlm": Family("SmolVLM", "vision_model", ("connector",), "text_model"),
    "llava_onevision": Family("LLaVA-OneVision", "vision_tower", ("multi_modal_projector", "image_newline"),
                              "language_model", video="video_token"),
    "internvl": Family("InternVL", "vision_tower", ("multi_modal_projector",), "language_model", video="video_token"),
    "minicpmv4_6": Family(
        "MiniCPM-V 4.6", "vision_tower", ("merger",), "language_model", video="video_token", packing="none",
        why_padded="its language model (Qwen3.5) mixes linear-attention layers whose state would run on"
        " from one packed chat into the next",
    ),
}


def is_vision_type(model_type: str | None) -> bool:
    """Whether sftflow trains this model_type as a vision-language model.

    >>> is_vision_type("qwen3_vl"), is_vision_type("llama")
    (True, False)
    """
    return model_type in FAMILIES


def family_of(config: dict[str, Any]) -> Family:
    """The family of a config.json (as a dict)."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise SftflowError(
            f"model_type {kind!r} is not a vision-language family sftflow knows ({', '.join(FAMILIES)})",
            field="model.name_or_path",
        )
    return FAMILIES[kind]

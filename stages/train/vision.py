"""`train` for vision-language models: which parts train, and the collator that brings the pixels.

Parts (names from the family table, stages/core/vlm_families.py: Qwen-VL's `visual` with its
`merger`, Gemma 3's / LLaVA's `vision_tower` + `multi_modal_projector`, SmolVLM's `vision_model` +
`connector`): the vision tower, the projector (vision features -> language-model width) and the
language model (+ `lm_head`). `train.vision` switches each on or off:
- lora / qlora: `target_modules: all-linear` means the language model's linear layers only
  (tune_llm) — the vision tower's linears too with tune_vision; tune_projector trains the
  projector in full and saves it with the adapter (`modules_to_save`). Explicit target_modules
  (a list or a regex) are used as given.
- full: each part's weights train or stay frozen by its switch; `train.full.frozen_modules`
  freezes more.

The collator reads each batch's images from the paths in the shards and hands them to the
model's own processor (with the image settings prepare counted tokens with), which gives the
pixel inputs; it checks each image still becomes its prepared number of tokens. Where the
family packs, padding-free rows hold several image chats: their images' inputs are
concatenated in order, and positions restart per chat (Qwen-VL: 4 rows, text positions then
its 3-D positions, built per chat), so attention and positions equal those of each chat alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.params import TrainParams, VisionParams
from stages.core.vision import (
    TEXT_KEYS,
    VisionCollator,
    language_model_prefix,
    load_processor,
    load_vlm,
    model_family,
    prepared_processor,
    projector_prefixes,
    vision_tower_prefix,
)
from stages.core.vlm_families import Family
from stages.train import attention as packed_attention
from stages.train.adapters import add_adapters, enable_checkpointing, freeze, rank_device, trainable_in_fp32
from stages.train.attention import VISION_VARLEN, pin_vision_attention
from stages.train.plan import RunPlan


def build_vision_model(params: TrainParams, plan: RunPlan, base_dir: Path, dtype: str, params_file: str) -> Any:
    """The VLM to hand to Trainer, with exactly the parts `train.vision` names trainable."""
    family = model_family(base_dir)
    # Qwen-VL's tower attends within image windows: flash-attn by name; torch's varlen kernel is
    # pinned on the loaded tower (from_pretrained would look for a hub kernel of that name)
    tower = plan.vision_attention or "sdpa"
    attention = {"text_config": plan.attention, "vision_config": "sdpa" if tower == VISION_VARLEN else tower, "": plan.attention}
    if params.method == "qlora":
        model = _load_vlm_4bit(params, base_dir, attention, rank_device(plan.device), plan.dtype, family)
    else:
        model = load_vlm(base_dir, dtype, attn_implementation=attention)
    if tower == VISION_VARLEN:
        pin_vision_attention(model.get_submodule(vision_tower_prefix(model, family)), VISION_VARLEN)
    hand_bounds_to_language_model(model, family)
    if params.gradient_checkpointing:
        enable_checkpointing(model)
    keep_tower_in_step(model, family, blank_image(load_processor(base_dir), family))
    if params.method == "full":
        freeze_parts(model, params.vision, family)
        if params.full.frozen_modules:
            freeze(model, params.full.frozen_modules, params_file)
        return model
    model = add_adapters(model, vision_lora(params, model, family), params_file)
    if params.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable_in_fp32(model)
    return model


def hand_bounds_to_language_model(model: Any, family: Family) -> None:
    """Packed image chats: the language model's attention gets each chat's bounds as the
    flash-attention kwargs, derived once per forward from the text positions (Qwen-VL's first
    of 4 position rows, or the one row of 1-D positions). The batch cannot carry them as text
    rows do: the model hands its kwargs to the vision tower too, whose attention passes
    cu_seqlens of its own; and flash-attention 2 without them would find the bounds again in
    every layer, waiting on the GPU each time."""
    language_model = model.get_submodule(language_model_prefix(model, family))

    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        positions = kwargs.get("position_ids")
        if positions is None or kwargs.get("attention_mask") is not None or "cu_seq_lens_q" in kwargs:
            return None
        if positions.dim() == 3 and tuple(positions.shape[:2]) == (4, 1):
            text = positions[0]
        elif positions.dim() == 2 and positions.shape[0] == 1:
            text = positions
        else:
            return None
        cu, longest = packed_attention.boundaries({"position_ids": text})
        if len(cu) <= 2:  # one sample: nothing to separate
            return None
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return args, kwargs

    language_model.register_forward_pre_hook(hook, with_kwargs=True)


def blank_image(processor: Any, family: Family) -> dict[str, Any]:
    """What the processor gives the model for one small black image (the pixel inputs only):
    the cheapest image the tower takes."""
    from PIL import Image

    placeholder = getattr(processor, family.placeholder)
    side = 2 * getattr(processor.image_processor, "patch_size", 14) * getattr(processor.image_processor, "merge_size", 1)
    out = processor(text=[placeholder], images=[[Image.new("RGB", (side, side))]], return_tensors="pt")
    return {k: v for k, v in out.items() if k not in TEXT_KEYS}


def keep_tower_in_step(model: Any, family: Family, blank: dict[str, Any]) -> None:
    """Run the vision tower on a blank image, with zero weight, in every training forward
    whose batch holds no image.

    Why: under ZeRO-3 each rank gathers the tower's parameters as it runs it; a rank whose
    micro-batch is text-only would skip the tower while its peers gather, and the collectives
    fall out of step (the hang LLaMA-Factory and others work around the same way). Under
    ZeRO-2/DDP a trainable projector or tower would get a gradient on some ranks and none on
    others. The blank image runs where real images do — after the token embedding, before the
    language model — and joins the embeddings outside any module, as the real image features
    do, so every rank enters the same modules in the same order, forward and backward: ZeRO-3
    records that order once and checks it on every rank (a rank whose order changed drops its
    prefetch plan and waits in a collective its peers never enter). Adding
    `0 * tower_output.sum()` to the embeddings leaves the loss and every gradient as they were
    (the tower's gradients from it are exact zeros). Its cost: one tower pass over the smallest
    image per text-only micro-batch. The image goes through the model's own
    `get_image_features`, so tower and projector run as for a real image."""
    tower = vision_tower_prefix(model, family)
    owner = model.get_submodule(tower.rsplit(".", 1)[0]) if "." in tower else model
    language_model = model.get_submodule(language_model_prefix(model, family))
    wanted = {"on": False}

    def before_model(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        no_image = kwargs.get("pixel_values") is None and not kwargs.get("mm_encoder_outputs")
        wanted["on"] = module.training and no_image

    def before_language_model(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if not wanted["on"] or embeds is None:
            return None
        wanted["on"] = False
        inputs = {k: v.to(embeds.device, dtype=embeds.dtype if v.is_floating_point() else v.dtype) for k, v in blank.items()}
        kwargs["inputs_embeds"] = embeds + 0.0 * image_features_sum(owner, inputs).to(embeds.dtype)
        return args, kwargs

    owner.register_forward_pre_hook(before_model, with_kwargs=True)
    language_model.register_forward_pre_hook(before_language_model, with_kwargs=True)


def image_features_sum(owner: Any, inputs: dict[str, Any]) -> Any:
    """The sum of what the model's `get_image_features` gives for these pixel inputs (one
    tensor, or one per image as Qwen-VL splits them): a scalar that depends on every tower and
    projector weight the images pass through."""
    out = owner.get_image_features(**inputs)
    features = getattr(out, "pooler_output", out)
    if isinstance(features, (list, tuple)):
        return sum(f.sum() for f in features)
    return features.sum()


def part_of(name: str, llm: str, tower: str, projectors: tuple[str, ...]) -> str:
    """Which part a parameter/module name belongs to: vision, projector or llm (a projector
    may sit inside the tower, as Qwen-VL's merger does).

    >>> [part_of(n, "model.language_model", "model.visual", ("model.visual.merger",)) for n in
    ...  ("model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight", "lm_head.weight")]
    ['vision', 'projector', 'llm']
    """
    if any(name == p or name.startswith(p + ".") for p in projectors):
        return "projector"
    if name == tower or name.startswith(tower + "."):
        return "vision"
    return "llm"


def _parts(model: Any, family: Family) -> tuple[str, str, tuple[str, ...]]:
    return language_model_prefix(model, family), vision_tower_prefix(model, family), projector_prefixes(model, family)


def freeze_parts(model: Any, vision: VisionParams, family: Family) -> None:
    """Full SFT: each part's parameters train only when its switch is on."""
    llm, tower, projectors = _parts(model, family)
    on = {"vision": vision.tune_vision, "projector": vision.tune_projector, "llm": vision.tune_llm}
    for name, p in model.named_parameters():
        p.requires_grad = on[part_of(name, llm, tower, projectors)]


def linear_targets(model: Any, vision: VisionParams, family: Family) -> str:
    """A regex (peft full-matches it against module names) selecting the linear layers of the
    parts that train: the language model's (tune_llm) and the vision tower's (tune_vision),
    never lm_head or the projector (those train in full through modules_to_save)."""
    import torch

    llm, tower, projectors = _parts(model, family)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        part = part_of(name, llm, tower, projectors)
        if (part == "llm" and name.startswith(llm) and vision.tune_llm) or (part == "vision" and vision.tune_vision):
            names.append(name)
    if not names:
        return r"(?!x)x"  # matches nothing: only modules_to_save train
    # one alternation per part keeps the regex short: prefix, any layer, then the layer's own name
    groups = []
    for prefix in sorted({llm if n.startswith(llm) else tower for n in names}):
        leaves = sorted({n[len(prefix) + 1 :].split(".", 2)[-1] for n in names if n.startswith(prefix + ".")})
        groups.append(rf"{re.escape(prefix)}\..*\.({'|'.join(re.escape(leaf) for leaf in leaves)})")
    return "|".join(f"(?:{g})" for g in groups)


def vision_lora(params: TrainParams, model: Any, family: Family) -> TrainParams:
    """train.lora with the VLM's defaults filled in: targets from train.vision when all-linear,
    the projector in modules_to_save when tune_projector."""
    import dataclasses

    lora = params.lora
    targets = linear_targets(model, params.vision, family) if lora.target_modules == "all-linear" else lora.target_modules
    to_save = tuple(lora.modules_to_save)
    if params.vision.tune_projector:
        to_save += tuple(n for n in saved_projectors(model, family) if n not in to_save)
    if targets == r"(?!x)x" and not to_save:
        raise SftflowError("train.vision switches leave nothing to train", field="train.vision")
    return dataclasses.replace(params, lora=dataclasses.replace(lora, target_modules=targets, modules_to_save=to_save))


def saved_projectors(model: Any, family: Family) -> tuple[str, ...]:
    """The projector's names as peft's modules_to_save takes them: a module's last name, or for a
    list of modules (Qwen3-VL's deepstack mergers) each member's, which peft can copy one by one."""
    import torch

    names = []
    for prefix in projector_prefixes(model, family):
        module, last = model.get_submodule(prefix), prefix.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.ModuleList):
            names += [f"{last}.{i}" for i in range(len(module))]
        else:
            names.append(last)
    return tuple(names)


def _load_vlm_4bit(params: TrainParams, base_dir: Path, attention: Any, device: str, dtype: str, family: Family) -> Any:
    """The VLM with its language model quantized (NF4/FP4); the vision tower, projector and
    lm_head stay in full precision, as 4-bit ViT weights cost accuracy for little memory. The
    4-bit weights dequantize to `dtype` (the plan's; `qlora.compute_dtype: auto` follows it), as
    for text."""
    from peft import prepare_model_for_kbit_training

    from stages.core.loading import bnb_4bit_config

    config = bnb_4bit_config(params.qlora, dtype)
    config.llm_int8_skip_modules = list(family.full_precision_in_4bit())  # what merge rebuilds too
    model = load_vlm(base_dir, "float32", quantization_config=config, device_map={"": device},
                     attn_implementation=attention)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=params.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def build_vision_collator(base_dir: Path, tok: Any, packing: str, manifest: dict[str, Any]) -> VisionCollator:
    """The collator, with the processor resizing exactly as prepare counted."""
    return VisionCollator(prepared_processor(base_dir, manifest), model_family(base_dir), tok.pad_token_id,
                          packing in ("padding_free", "auto"))

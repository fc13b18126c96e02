"""`train` for vision-language models: which parts train, and the collator that brings the pixels.

Parts (Qwen2-VL/2.5-VL names): the vision tower `visual` (patch embedding + ViT blocks), the
projector `visual.merger` (ViT features -> language-model width), and the language model
(`language_model` + `lm_head`). `train.vision` switches each on or off:
- lora / qlora: `target_modules: all-linear` means the language model's linear layers only
  (tune_llm) — the vision tower's linears too with tune_vision; tune_projector trains the
  merger in full and saves it with the adapter (`modules_to_save`). Explicit target_modules
  (a list or a regex) are used as given.
- full: each part's weights train or stay frozen by its switch; `train.full.frozen_modules`
  freezes more.

The collator reads each batch's images from the paths in the shards, resizes them with the
model's image processor (checking the grids match what prepare counted tokens for) and gives
the model `pixel_values`, `image_grid_thw` and `mm_token_type_ids` (which tokens are image
tokens: the model places its 3-D rotary positions from them). Padding-free rows pack several
image chats into one: their images' pixels and grids are concatenated in order, and the
4-row position_ids (text positions restarting per sample, then the 3-D positions) are built
per sample, so attention and positions equal those of each chat alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.params import TrainParams, VisionParams
from stages.core.vision import (
    FULL_PRECISION_IN_4BIT,
    VisionCollator,
    language_model_prefix,
    load_image_processor,
    load_vlm,
    model_config,
    vision_tokens,
    vision_tower_prefix,
)
from stages.train import attention as packed_attention
from stages.train.adapters import add_adapters, enable_checkpointing, freeze, rank_device, trainable_in_fp32
from stages.train.attention import VISION_VARLEN, pin_vision_attention
from stages.train.plan import RunPlan


def build_vision_model(params: TrainParams, plan: RunPlan, base_dir: Path, dtype: str, params_file: str) -> Any:
    """The VLM to hand to Trainer, with exactly the parts `train.vision` names trainable."""
    # the tower attends within each image window: flash-attn by name; torch's varlen kernel is
    # pinned on the loaded tower (from_pretrained would look for a hub kernel of that name)
    tower = plan.vision_attention or "sdpa"
    attention = {"text_config": plan.attention, "vision_config": "sdpa" if tower == VISION_VARLEN else tower, "": plan.attention}
    if params.method == "qlora":
        model = _load_vlm_4bit(params, base_dir, attention, rank_device(plan.device), plan.dtype)
    else:
        model = load_vlm(base_dir, dtype, attn_implementation=attention)
    if tower == VISION_VARLEN:
        pin_vision_attention(model.get_submodule(vision_tower_prefix(model)), VISION_VARLEN)
    hand_bounds_to_language_model(model)
    if params.gradient_checkpointing:
        enable_checkpointing(model)
    keep_tower_in_step(model)
    if params.method == "full":
        freeze_parts(model, params.vision)
        if params.full.frozen_modules:
            freeze(model, params.full.frozen_modules, params_file)
        return model
    model = add_adapters(model, vision_lora(params, model), params_file)
    if params.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable_in_fp32(model)
    return model


def hand_bounds_to_language_model(model: Any) -> None:
    """Packed image chats: the language model's attention gets each chat's bounds as the
    flash-attention kwargs, derived once per forward from the text positions (the first of the
    4 position rows). The batch cannot carry them as text rows do: the model hands its kwargs to
    the vision tower too, whose attention passes cu_seqlens of its own; and flash-attention 2
    without them would find the bounds again in every layer, waiting on the GPU each time."""
    language_model = model.get_submodule(language_model_prefix(model))

    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        positions = kwargs.get("position_ids")
        packed = positions is not None and positions.dim() == 3 and tuple(positions.shape[:2]) == (4, 1)
        if not packed or kwargs.get("attention_mask") is not None or "cu_seq_lens_q" in kwargs:
            return None
        cu, longest = packed_attention.boundaries({"position_ids": positions[0]})
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return args, kwargs

    language_model.register_forward_pre_hook(hook, with_kwargs=True)


def blank_image(visual: Any) -> tuple[Any, Any]:
    """`pixel_values` and `image_grid_thw` of the smallest image the tower takes: one merged
    token (merge x merge patches) of zeros, in the tower's dtype and device.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> embed = SimpleNamespace(in_channels=3, temporal_patch_size=2, patch_size=14)
    >>> visual = SimpleNamespace(patch_embed=embed, spatial_merge_size=2, dtype=torch.float32,
    ...                          device=torch.device("cpu"))
    >>> pixels, grid = blank_image(visual)
    >>> tuple(pixels.shape), grid.tolist()
    ((4, 1176), [[1, 2, 2]])
    """
    import torch

    embed, merge = visual.patch_embed, visual.spatial_merge_size
    width = embed.in_channels * embed.temporal_patch_size * embed.patch_size**2
    pixels = torch.zeros(merge * merge, width, dtype=visual.dtype, device=visual.device)
    return pixels, torch.tensor([[1, merge, merge]], device=visual.device)


def keep_tower_in_step(model: Any) -> None:
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
    (the tower's gradients from it are exact zeros). Its cost: one tower pass over 4 patches per
    text-only micro-batch."""
    tower = vision_tower_prefix(model)
    owner = model.get_submodule(tower.rsplit(".", 1)[0]) if "." in tower else model
    visual = model.get_submodule(tower)
    language_model = model.get_submodule(language_model_prefix(model))
    blank = {"wanted": False}

    def before_model(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        no_image = kwargs.get("pixel_values") is None and not kwargs.get("mm_encoder_outputs")
        blank["wanted"] = module.training and no_image

    def before_language_model(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if not blank["wanted"] or embeds is None:
            return None
        blank["wanted"] = False
        pixels, grid = blank_image(visual)
        out = visual(pixels, grid_thw=grid)
        features = getattr(out, "pooler_output", out)
        kwargs["inputs_embeds"] = embeds + 0.0 * features.sum().to(embeds.dtype)
        return args, kwargs

    owner.register_forward_pre_hook(before_model, with_kwargs=True)
    language_model.register_forward_pre_hook(before_language_model, with_kwargs=True)


def part_of(name: str, llm: str, visual: str) -> str:
    """Which part a parameter/module name belongs to: vision, projector or llm.

    >>> [part_of(n, "model.language_model", "model.visual") for n in
    ...  ("model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight", "lm_head.weight")]
    ['vision', 'projector', 'llm']
    """
    if name.startswith(visual + ".merger") or name == visual + ".merger":
        return "projector"
    if name.startswith(visual):
        return "vision"
    return "llm"


def freeze_parts(model: Any, vision: VisionParams) -> None:
    """Full SFT: each part's parameters train only when its switch is on."""
    llm, visual = language_model_prefix(model), vision_tower_prefix(model)
    on = {"vision": vision.tune_vision, "projector": vision.tune_projector, "llm": vision.tune_llm}
    for name, p in model.named_parameters():
        p.requires_grad = on[part_of(name, llm, visual)]


def linear_targets(model: Any, vision: VisionParams) -> str:
    """A regex (peft full-matches it against module names) selecting the linear layers of the
    parts that train: the language model's (tune_llm) and the vision tower's (tune_vision),
    never lm_head or the projector (those train in full through modules_to_save)."""
    import torch

    llm, visual = language_model_prefix(model), vision_tower_prefix(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        part = part_of(name, llm, visual)
        if (part == "llm" and name.startswith(llm) and vision.tune_llm) or (part == "vision" and vision.tune_vision):
            names.append(name)
    if not names:
        return r"(?!x)x"  # matches nothing: only modules_to_save train
    # one alternation per part keeps the regex short: prefix, any layer, then the layer's own name
    groups = []
    for prefix in sorted({llm if n.startswith(llm) else visual for n in names}):
        leaves = sorted({n[len(prefix) + 1 :].split(".", 2)[-1] for n in names if n.startswith(prefix + ".")})
        groups.append(rf"{re.escape(prefix)}\..*\.({'|'.join(re.escape(leaf) for leaf in leaves)})")
    return "|".join(f"(?:{g})" for g in groups)


def vision_lora(params: TrainParams, model: Any) -> TrainParams:
    """train.lora with the VLM's defaults filled in: targets from train.vision when all-linear,
    the projector in modules_to_save when tune_projector."""
    import dataclasses

    lora = params.lora
    targets = linear_targets(model, params.vision) if lora.target_modules == "all-linear" else lora.target_modules
    to_save = tuple(lora.modules_to_save)
    if params.vision.tune_projector and "merger" not in to_save:
        to_save += ("merger",)
    if targets == r"(?!x)x" and not to_save:
        raise SftflowError("train.vision switches leave nothing to train", field="train.vision")
    return dataclasses.replace(params, lora=dataclasses.replace(lora, target_modules=targets, modules_to_save=to_save))


def _load_vlm_4bit(params: TrainParams, base_dir: Path, attention: Any, device: str, dtype: str) -> Any:
    """The VLM with its language model quantized (NF4/FP4); the vision tower and lm_head stay
    in full precision, as 4-bit ViT weights cost accuracy for little memory. The 4-bit weights
    dequantize to `dtype` (the plan's; `qlora.compute_dtype: auto` follows it), as for text."""
    from peft import prepare_model_for_kbit_training

    from stages.core.loading import bnb_4bit_config

    config = bnb_4bit_config(params.qlora, dtype)
    config.llm_int8_skip_modules = list(FULL_PRECISION_IN_4BIT)  # what merge rebuilds too
    model = load_vlm(base_dir, "float32", quantization_config=config, device_map={"": device},
                     attn_implementation=attention)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=params.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def build_vision_collator(base_dir: Path, tok: Any, packing: str, manifest: dict[str, Any]) -> VisionCollator:
    """The collator, with the image processor resizing exactly as prepare counted (its bounds
    come from the prepared manifest, not from params: prepare's params decided the token counts)."""
    sizes = manifest["vision"]["image_processor"]
    processor = load_image_processor(base_dir, sizes["min_pixels"], sizes["max_pixels"])
    tokens = vision_tokens(model_config(base_dir))
    return VisionCollator(processor, tokens, tok.pad_token_id, packing in ("padding_free", "auto"))

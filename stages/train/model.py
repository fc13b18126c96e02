"""The model `train` optimises: base (fp32, bf16 or 4-bit) + LoRA/DoRA adapters, or all weights.

One function per method keeps the knobs readable: `lora` and `qlora` share the adapter
config (regex targets, modules_to_save, layers_to_transform; DoRA, rsLoRA; an
adapter to continue from), `qlora` loads the base through bitsandbytes NF4/FP4 first, `full`
freezes only what `train.full.frozen_modules` names. Trainable weights are always fp32.
Vision-language bases go to stages/train/vision.py; the attention kernel and the device come
from the run plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.core.loading import load_causal_lm
from stages.core.params import TrainParams
from stages.core.vision import is_vision_model
from stages.train.adapters import add_adapters, enable_checkpointing, freeze, rank_device, trainable_in_fp32
from stages.train.plan import RunPlan
from stages.train.vision import build_vision_model


def base_dtype(params: TrainParams, plan: RunPlan) -> str:
    """16-bit frozen weights (the plan's bf16 or fp16) halve memory and skip autocast's per-step
    weight casts; weights that train (full SFT) stay fp32 so small updates are not rounded away."""
    return plan.dtype if params.method != "full" else "float32"


def build_model(params: TrainParams, plan: RunPlan, base_dir: Path, params_file: str = "params.yaml") -> Any:
    """The model to hand to Trainer, with exactly the intended weights trainable."""
    if is_vision_model(base_dir):
        return build_vision_model(params, plan, base_dir, base_dtype(params, plan), params_file)
    if params.method == "qlora":
        model = _load_4bit(params, plan, base_dir)
    else:
        model = load_causal_lm(base_dir, base_dtype(params, plan), attn_implementation=plan.attention)
    if params.gradient_checkpointing:
        enable_checkpointing(model)
    if params.method == "full":
        freeze(model, params.full.frozen_modules, params_file)
        return model
    model = add_adapters(model, params, params_file)
    if params.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable_in_fp32(model)
    return model


def count_parameters(model: Any) -> dict[str, Any]:
    """Total and trainable parameters, counting 4-bit packed weights (2 per byte) and ZeRO-3
    partitioned ones (`ds_numel`) at their real size."""
    total = trainable = 0
    for p in model.parameters():
        n = p.ds_numel if getattr(p, "ds_numel", 0) and p.numel() == 0 else p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
        total += n
        trainable += n if p.requires_grad else 0
    return {
        "total": total,
        "trainable": trainable,
        "trainable_pct": round(100.0 * trainable / max(total, 1), 4),
    }


def _load_4bit(params: TrainParams, plan: RunPlan, base_dir: Path) -> Any:
    """The base quantized on load (NF4/FP4, optional double quant), each rank on its own device.

    Under ZeRO-3 (peft's QLoRA + DeepSpeed ZeRO-3 recipe) the packed 4-bit weights are stored in
    the plan's dtype (`plan.quant_storage`) and every other weight is loaded in it too, so ZeRO-3
    shards them all as one dtype; there is no device_map (ZeRO-3 places the shards) and no
    `prepare_model_for_kbit_training`, whose fp32 upcast of the other weights would break that
    one dtype (trl's SFTTrainer skips it for sharded QLoRA the same way)."""
    from peft import prepare_model_for_kbit_training

    from stages.core.loading import bnb_4bit_config

    config = bnb_4bit_config(params.qlora, plan.dtype, plan.quant_storage)
    if plan.quant_storage is not None:
        return load_causal_lm(base_dir, plan.quant_storage, quantization_config=config, attn_implementation=plan.attention)
    model = load_causal_lm(
        base_dir,
        "float32",
        quantization_config=config,
        device_map={"": rank_device(plan.device)},
        attn_implementation=plan.attention,
    )
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=params.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )

"""The model `train` optimises: base (fp32, bf16 or 4-bit) + LoRA/DoRA adapters, or all weights.

One function per method keeps the knobs readable: `lora` and `qlora` share the adapter
config (regex targets, modules_to_save, layers_to_transform; DoRA, rsLoRA; an
adapter to continue from), `qlora` loads the base through bitsandbytes NF4/FP4 first, `full`
freezes only what `train.full.frozen_modules` names. Trainable weights are always fp32.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.loading import load_causal_lm
from stages.core.params import TrainParams
from stages.train import kernels
from stages.train.attention import register as register_varlen_attention


def attention_for(packing: str) -> str:
    """The attention kernel for a packing mode: padding-free rows need one that keeps samples
    apart — flash-attention 2 on CUDA when installed, our per-sample SDPA otherwise."""
    import importlib.util

    import torch

    if packing == "none":
        return "sdpa"
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return register_varlen_attention()


def base_dtype(params: TrainParams) -> str:
    """bf16 frozen weights halve memory and skip autocast's per-step weight casts; weights that
    train (full SFT) stay fp32 so small updates are not rounded away."""
    return "bfloat16" if params.precision == "bf16" and params.method != "full" else "float32"


def build_model(params: TrainParams, base_dir: Path, params_file: str = "params.yaml") -> Any:
    """The model to hand to Trainer, with exactly the intended weights trainable."""
    attn = attention_for(params.packing)
    # --- vision-language models (stages/train/vision.py) ---
    from stages.core.vision import is_vision_model

    if is_vision_model(base_dir):
        from stages.train.vision import build_vision_model

        return build_vision_model(params, base_dir, attn, base_dtype(params), params_file)
    # --- end vision-language models ---
    if params.method == "qlora":
        model = _load_4bit(params, base_dir, attn)
    else:
        model = load_causal_lm(base_dir, base_dtype(params), attn_implementation=attn)
    if params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if params.method == "full":
        _freeze(model, params.full.frozen_modules, params_file)
        if kernels.resolve(params) == "fused":
            kernels.apply(model, "fused")
        return model
    model = _add_adapters(model, params, params_file)
    if (kind := kernels.resolve(params)) != "plain":
        kernels.apply(model, kind)
    if params.gradient_checkpointing:
        model.enable_input_require_grads()
    for p in model.parameters():  # adapters may inherit the base's bf16; they train in fp32
        if p.requires_grad and p.dtype != _fp32():
            p.data = p.data.float()
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


def _fp32() -> Any:
    import torch

    return torch.float32


def _load_4bit(params: TrainParams, base_dir: Path, attn: str) -> Any:
    """The base quantized on load (NF4/FP4, optional double quant), each rank on its own device."""
    import torch
    from peft import prepare_model_for_kbit_training

    from stages.core.loading import bnb_4bit_config

    config = bnb_4bit_config(params.qlora)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(
        base_dir, "float32", quantization_config=config, device_map={"": device}, attn_implementation=attn
    )
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=params.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def _add_adapters(model: Any, params: TrainParams, params_file: str) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = params.lora
    if lora.init_adapter:
        path = Path(lora.init_adapter)
        if not (path / "adapter_config.json").exists():
            raise SftflowError(
                f"{path} holds no PEFT adapter (adapter_config.json)",
                path=params_file,
                field="train.lora.init_adapter",
            )
        return PeftModel.from_pretrained(model, str(path), is_trainable=True)
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=list(lora.modules_to_save) or None,
        layers_to_transform=list(lora.layers_to_transform) if lora.layers_to_transform is not None else None,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft's message names the modules it could not find
        raise SftflowError(str(e), path=params_file, field="train.lora") from e


def _freeze(model: Any, patterns: tuple[str, ...], params_file: str) -> None:
    """Freeze parameters whose name matches any pattern; a pattern matching nothing is a typo."""
    names = [name for name, _ in model.named_parameters()]
    for i, pattern in enumerate(patterns):
        if not any(re.search(pattern, n) for n in names):
            raise SftflowError(
                f"matches no parameter (names look like {names[0]!r})",
                path=params_file,
                field=f"train.full.frozen_modules[{i}]",
            )
    for name, p in model.named_parameters():
        if any(re.search(pattern, name) for pattern in patterns):
            p.requires_grad = False

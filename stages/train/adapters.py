"""What the text and vision model builders share: LoRA adapters, frozen weights, the device of
this rank, and the rule that trainable weights are fp32."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.params import TrainParams


def add_adapters(model: Any, params: TrainParams, params_file: str) -> Any:
    """`model` wrapped by peft with `train.lora`'s adapters (or the adapter `init_adapter` names)."""
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
        from stages.core.integrity import verify_dir

        verify_dir(path)
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
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft's message names the modules it could not find
        raise SftflowError(str(e), path=params_file, field="train.lora") from e


def freeze(model: Any, patterns: tuple[str, ...], params_file: str) -> None:
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


def rank_device(device: str) -> str:
    """Where this process puts a model it loads itself (4-bit bases): its own GPU under a
    launcher (LOCAL_RANK), else the plan's device.

    >>> rank_device("cpu")
    'cpu'
    """
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if device == "cuda" else "cpu"


def enable_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in backward (non-reentrant: works with frozen inputs)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def trainable_in_fp32(model: Any) -> None:
    """Adapters may inherit a bf16 base's dtype; trainable weights are kept and updated in fp32
    so small updates are not rounded away."""
    for p in model.parameters():
        if p.requires_grad and p.dtype.is_floating_point and p.element_size() < 4:
            p.data = p.data.float()

"""GPU kernels behind `train.kernels` on CUDA: Liger's Triton kernels where installed, sftflow's chunked loss otherwise.

Liger Kernel (PyPI `liger-kernel`, the optional `gpu` extra) replaces a supported family's
RMSNorm, SwiGLU MLP and rotary embedding with Triton kernels and computes the LM head and the
cross-entropy together from the last hidden states in chunks (fused linear cross-entropy, FLCE):
no logits tensor exists in a training step. It is applied the library's own way: transformers'
`TrainingArguments(use_liger_kernel=True, liger_kernel_config=...)`, which calls
`liger_kernel.transformers._apply_liger_kernel_to_instance` on the (peft-unwrapped) model when
training starts. Triton needs CUDA: on the CPU Liger is never chosen.

The loss, decided here with the kernels (one of `LOSSES`):
- with FLCE, the loss is Liger's, inside the model's forward: Trainer hands the model the labels
  (no `compute_loss_func`) and `num_items_in_batch`, so it is the sum over trained tokens divided
  by the trained tokens of the whole accumulated batch, like sftflow's own loss (loss.py).
  sftflow's `logits_to_keep` is not passed: FLCE selects no positions, it reads every hidden row
  against its shifted label and skips the -100 ones itself (packed rows carry -100 at each
  sample's first token, so no sample is predicted from the one before it).
- without Liger, or under DeepSpeed ZeRO-3 (FLCE reads the head weight outside the head's own
  forward, where ZeRO-3 keeps it partitioned): sftflow's LM head + loss in chunks of trained rows
  (`chunked`, loss.py), or the model's head then sftflow's loss over trained logits (`logits`)
  where the chunked loss cannot run either (ZeRO-3, `train.trained_logits_only: false`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.params import TrainParams
from stages.core.vision import model_config

LIGER_LOSS = "liger_fused_linear_cross_entropy"
LOSSES = (LIGER_LOSS, "chunked", "logits")
PIN = "liger-kernel==0.8.5"  # the `gpu` extra (pyproject.toml)


@dataclass(frozen=True)
class GpuKernels:
    """The CUDA part of the run plan: whether Liger runs (and its config), which loss, and why."""

    liger: dict[str, bool] | None  # transformers' liger_kernel_config; None: Liger does not run
    loss: str  # one of LOSSES
    kernels_why: str
    loss_why: str


def base_model_type(base_dir: Path) -> str | None:
    """The base's `config.model_type` (Liger's kernels are per family), or None where unreadable."""
    try:
        return model_config(base_dir).get("model_type")
    except (OSError, ValueError):
        return None


def liger_models() -> frozenset[str]:
    """The model types (config.model_type) the installed liger-kernel patches; empty when it or
    Triton is not installed (the run plan's probe: a CPU-only torch has no Triton, so a CPU
    machine imports nothing here)."""
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return frozenset()
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # a Triton that cannot load here (driver, CPU-only build): as if not installed
        return frozenset()
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def choose(
    params: TrainParams,
    *,
    on_cuda: bool,
    model_type: str | None,
    liger_models: Collection[str],
    zero_stage: int,
    vision: bool = False,
    params_file: str = "params.yaml",
) -> GpuKernels | None:
    """The GPU kernels and loss for a run on CUDA (None on the CPU: the CPU wing decides there,
    stages/train/cpu/entry.py); a pure function of the params and what is installed.

    `train.kernels: auto` on CUDA: Liger where installed and it patches this model type (text
    models: Liger's vision-language forwards replace the whole model forward, untried with
    sftflow's image rows), with its fused linear cross-entropy as the loss; otherwise
    transformers + peft with sftflow's chunked loss. `liger` asks for Liger and is refused where
    it cannot run; `plain` is transformers + peft and the model's head as they are.

    >>> qwen = {"model_type": "qwen2", "liger_models": {"qwen2", "llama"}, "zero_stage": 0}
    >>> k = choose(TrainParams(), on_cuda=True, **qwen)
    >>> sorted(n for n, on in k.liger.items() if on), k.loss
    (['fused_linear_cross_entropy', 'rms_norm', 'rope', 'swiglu'], 'liger_fused_linear_cross_entropy')
    >>> choose(TrainParams(), on_cuda=True, model_type="qwen2", liger_models=(), zero_stage=0).loss
    'chunked'
    >>> k = choose(TrainParams(), on_cuda=True, **{**qwen, "zero_stage": 3})
    >>> k.liger["fused_linear_cross_entropy"], k.loss
    (False, 'logits')
    >>> choose(TrainParams(kernels="plain"), on_cuda=True, **qwen).liger is None
    True
    >>> choose(TrainParams(), on_cuda=False, **qwen) is None
    True
    >>> choose(TrainParams(kernels="liger"), on_cuda=True, **{**qwen, "model_type": "gpt2"})
    Traceback (most recent call last):
    stages.core.errors.SftflowError: params.yaml: train.kernels: liger cannot run: liger-kernel has no kernels for model type 'gpt2'; use auto or plain
    """
    if not on_cuda or params.kernels == "fast":  # fast: the CPU wing's, wherever it was asked for
        if params.kernels == "liger":
            raise SftflowError(
                "liger runs Triton kernels on a CUDA GPU and this run is on the CPU: use auto, plain or fast",
                path=params_file,
                field="train.kernels",
            )
        return None
    problem = _liger_problem(model_type, liger_models, vision)
    if params.kernels == "liger" and problem:
        raise SftflowError(f"liger cannot run: {problem}; use auto or plain", path=params_file, field="train.kernels")
    if params.kernels in ("auto", "liger") and not problem:
        why = "train.kernels: liger" if params.kernels == "liger" else f"auto on CUDA with liger-kernel installed ({model_type})"
        if zero_stage == 3:
            return GpuKernels(
                _liger_config(flce=False),
                "logits",
                why + "; without its fused linear cross-entropy under ZeRO-3",
                "ZeRO-3 keeps the head weight partitioned outside the head's forward, which Liger's fused"
                " linear cross-entropy and sftflow's chunked loss read: the model's head, then the loss",
            )
        return GpuKernels(
            _liger_config(flce=True),
            LIGER_LOSS,
            why,
            "Liger's fused linear cross-entropy in the model's forward: LM head + loss in chunks, no logits kept",
        )
    why = "train.kernels: plain" if params.kernels == "plain" else f"auto on CUDA: transformers + peft ({problem})"
    if params.kernels != "plain" and zero_stage != 3 and params.trained_logits_only:
        return GpuKernels(None, "chunked", why, "the LM head + loss in chunks of trained rows (stages/train/loss.py)")
    return GpuKernels(None, "logits", why, "the model's LM head, then the loss")


def _liger_problem(model_type: str | None, installed: Collection[str], vision: bool) -> str | None:
    """Why Liger cannot run for this model here, or None."""
    if not installed:
        return f"liger-kernel is not installed (`pip install -e '.[gpu]'`: {PIN})"
    if vision:
        return "a vision-language model: Liger would replace its whole forward, untried with sftflow's image rows"
    if model_type not in installed:
        return f"liger-kernel has no kernels for model type {model_type!r}"
    return None


def _liger_config(flce: bool) -> dict[str, bool]:
    """transformers' `liger_kernel_config` (the apply function of the family keeps the keys it takes)."""
    return {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": flce}


def liger_report(model: Any) -> dict[str, Any]:
    """What Liger patched in a trained model: modules now running Liger's kernels, by name
    (Liger renames what it patches), and whether the forward computes the fused loss."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names: dict[str, int] = {}
    for module in inner.modules():
        name = module._get_name()
        if name.startswith("Liger"):
            names[name] = names.get(name, 0) + 1
    forward = getattr(inner.forward, "__func__", inner.forward)
    return {"modules": dict(sorted(names.items())), "fused_linear_cross_entropy": "liger_kernel" in forward.__module__}

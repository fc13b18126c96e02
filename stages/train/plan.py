"""The run plan: how `train` runs, decided once from the params and the machine, before anything loads.

`decide` is a pure function of `TrainParams` and a `Machine` (what `probe_machine` reads off this
host: GPUs, native bf16, flash-attention, a C++ compiler), so every choice that depends on the
device is tested by handing it a made-up machine. Everything downstream — the model builder,
the Trainer arguments, the process group, the CPU speed wing — reads the plan instead of the
params plus probes of its own, and `reports/train.json` carries it as `plan`, so a user sees
what ran and why.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stages.core.devices import Hardware, check_usable, detect_hardware
from stages.core.errors import SftflowError
from stages.core.params import TrainParams, needs_cuda_optimizer
from stages.core.vlm_families import Family
from stages.train import distributed, gpu_kernels
from stages.train.attention import TORCH_VARLEN, VISION_VARLEN
from stages.train.attention import register as register_varlen_attention
from stages.train.cpu import entry as cpu


@dataclass(frozen=True)
class Machine:
    """What the plan depends on besides the params: the CUDA GPUs torch sees (and whether they
    compute in bf16), whether this CPU computes bf16 natively, whether flash-attention is
    installed, why sftflow's C++ pieces cannot be built here (None: they can), and the mallocs
    that can be preloaded (name -> shared library); `liger`: the model types the installed
    liger-kernel patches (empty: not installed, or no CUDA)."""

    hardware: Hardware = field(default_factory=Hardware)
    cpu_bf16: bool = True
    flash_attn: bool = False
    native_problem: str | None = None
    allocators: Mapping[str, str] = field(default_factory=dict)
    liger: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RunPlan:
    """Every decision about how one training run computes, taken once (see `decide`)."""

    device: Literal["cpu", "cuda"]
    # resolved (never auto), decided before the attention kernel: flash-attention needs bf16/fp16
    precision: Literal["fp32", "bf16", "fp16"]
    attention: str  # the model's attn_implementation: sdpa, sdpa_varlen, varlen, flash_attention_2 or eager
    chunked_loss: bool  # the LM head + loss in chunks of trained rows (stages/train/loss.py)
    cpu: cpu.CpuChoices  # the CPU speed wing's part: kernels, allocator, dropout masks
    launch: distributed.Launch
    deepspeed: dict[str, Any] | None  # the DeepSpeed config, read once (None: no DeepSpeed)
    why: dict[str, str] = field(default_factory=dict)  # the reason behind each choice, by field
    warnings: tuple[str, ...] = ()  # said before training starts
    # Liger Kernel's config (transformers' liger_kernel_config; None: Liger does not run) and the
    # loss: liger_fused_linear_cross_entropy, chunked or logits (stages/train/gpu_kernels.py)
    liger: Mapping[str, bool] | None = None
    loss: str = "logits"
    tf32: bool = False  # fp32 on an Ampere+ GPU: matmuls in TF32 (TrainingArguments.tf32)
    # DDP's find_unused_parameters: False where every trainable weight gets a gradient each step
    # (LoRA/QLoRA: saves DDP's per-step search of the graph); None: transformers' own rule
    find_unused_parameters: bool | None = None
    # the 4-bit base's storage dtype under ZeRO-3 (bnb_4bit_quant_storage); None: bitsandbytes' uint8
    quant_storage: str | None = None
    vision_attention: str | None = None  # a VLM's vision tower: sdpa, flash_attention_2 or flash_varlen_torch
    packing: str = "auto"  # train.packing as it runs: a VLM family that cannot pack gets "none"

    @property
    def dtype(self) -> str:
        """The torch dtype name of the precision: what a 16-bit frozen base and 4-bit compute use."""
        return DTYPES[self.precision]

    @property
    def zero_stage(self) -> int:
        return distributed.zero_stage(self.deepspeed)

    @property
    def kernels(self) -> str:
        return "liger" if self.liger is not None else self.cpu.kernels

    def report(self) -> dict[str, Any]:
        """The plan as `reports/train.json` shows it."""
        return {
            "device": self.device,
            "precision": self.precision,
            "tf32": self.tf32,
            "attention": self.attention,
            "packing": self.packing,
            **({"vision_attention": self.vision_attention} if self.vision_attention else {}),
            "kernels": self.kernels,
            "chunked_loss": self.chunked_loss,
            "loss": self.loss,
            "liger": dict(self.liger) if self.liger is not None else None,
            "allocator": self.cpu.allocator,
            "dropout_masks": self.cpu.dropout_masks,
            "processes": self.launch.world_size,
            "zero_stage": self.zero_stage,
            "why": dict(self.why),
        }


def probe_machine() -> Machine:
    """Read this host: the one place in `train` that asks torch which devices there are."""
    from stages.train.cpu import preload

    found = {name: path for name in preload.LIBRARIES if (path := preload.find(name))}
    return Machine(
        hardware=detect_hardware(),
        cpu_bf16=_cpu_has_bf16(),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        native_problem=cpu.native_problem(),
        allocators=found,
        liger=gpu_kernels.liger_models(),
    )


def decide(
    params: TrainParams,
    machine: Machine,
    *,
    vision: bool | Family = False,
    videos: bool = False,
    model_type: str | None = None,
    softcap: float | None = None,
    env: Mapping[str, str] | None = None,
    params_file: str = "params.yaml",
) -> RunPlan:
    """The plan for `params` on `machine` (`vision`: the base is a vision-language model — its
    family, where known, decides packing and the tower's attention; `videos`: the prepared data
    holds videos (its manifest lists them), which train in padded batches;
    `model_type`: its config's model_type, which Liger's kernels go by;
    `softcap`: its attention logit softcapping, `attention.logit_softcap`; `env`: the launch
    overrides, os.environ when None).

    >>> plan = decide(TrainParams(), Machine(allocators={"jemalloc": "/lib/libjemalloc.so.2"}), env={})
    >>> plan.device, plan.attention, plan.kernels, plan.chunked_loss, plan.cpu.allocator
    ('cpu', 'sdpa_varlen', 'fast', True, 'jemalloc')
    >>> gpu = Machine(hardware=Hardware(gpus=1, capability=(8, 0)), flash_attn=True)
    >>> plan = decide(TrainParams(), gpu, env={})
    >>> plan.device, plan.precision, plan.attention, plan.kernels, plan.cpu.allocator, plan.cpu.dropout_masks
    ('cuda', 'bf16', 'flash_attention_2', 'plain', 'system', 'torch')
    >>> decide(TrainParams(packing="none"), Machine(), env={}).attention
    'sdpa'
    """
    warnings: list[str] = []
    device, why_device, warning = _device(params.device, machine.hardware)
    warnings += [warning] if warning else []
    launch = distributed.resolve_launch(params.distributed, dict(env) if env is not None else None)
    deepspeed = distributed.deepspeed_config(params.distributed, params_file)
    why: dict[str, str] = {"device": why_device}
    precision, tf32, why["precision"] = _precision(params.precision, device, machine.hardware)
    if precision == "bf16" and device == "cpu" and not machine.cpu_bf16:
        warnings.append("train: this CPU has no native bf16 (avx512_bf16/AMX): bf16 will be emulated and slow")
    if device == "cpu" and needs_cuda_optimizer(params.optim):
        raise SftflowError(
            f"{params.optim} is a bitsandbytes optimizer and runs on a CUDA GPU only; this run is on the CPU"
            " (adamw_torch_fused or adamw_torch there)",
            path=params_file,
            field="train.optim",
        )
    zero3_4bit = params.method == "qlora" and distributed.zero_stage(deepspeed) == 3
    if zero3_4bit and vision:
        raise SftflowError(
            "zero3 with qlora is written for text models (4-bit weights stored in the compute dtype);"
            " a vision-language model's 4-bit loader places each rank itself: use zero2 or none",
            path=params_file,
            field="train.distributed.deepspeed",
        )
    flash = _flash_kernels(device, precision, machine.hardware)
    packing = params.packing
    if isinstance(vision, Family) and vision.packing == "none" and packing != "none":
        packing, why["packing"] = "none", f"padded batches ({vision.name}): {vision.why_padded}"
    elif videos and packing != "none":
        packing, why["packing"] = "none", VIDEO_ROWS_PADDED
    attention, why["attention"] = _attention(packing, device, flash, machine.flash_attn, softcap)
    register_varlen_attention()  # its names valid attn_implementations before any model loads
    vision_attention = None
    if isinstance(vision, Family) and vision.packing != "mrope":
        vision_attention, why["vision_attention"] = "sdpa", f"{vision.name}'s tower attends over one image (tile) at a time"
    elif vision:
        vision_attention, why["vision_attention"] = _vision_attention(flash, machine.flash_attn)
    wing = cpu.choose(
        params,
        on_cpu=device == "cpu",
        zero_stage=distributed.zero_stage(deepspeed),
        vision=vision,
        native_problem=machine.native_problem,
        allocators=machine.allocators,
    )
    why |= {"kernels": wing.kernels_why, "allocator": wing.allocator_why, "dropout_masks": wing.dropout_masks_why}
    chunked = wing.chunked_loss and params.trained_logits_only
    why["chunked_loss"] = (
        "with fast kernels: the LM head + loss in chunks of trained rows" if chunked else "the model's LM head, then the loss"
    )
    gpu = gpu_kernels.choose(
        params,
        on_cuda=device == "cuda",
        model_type=model_type,
        liger_models=machine.liger,
        zero_stage=distributed.zero_stage(deepspeed),
        vision=vision,
        params_file=params_file,
    )
    if gpu is not None:  # on CUDA the kernels and the loss are the GPU's choice (stages/train/gpu_kernels.py)
        chunked = gpu.loss == "chunked"
        why |= {"kernels": gpu.kernels_why, "chunked_loss": gpu.loss_why}
    why["loss"] = why["chunked_loss"]
    find_unused, why["find_unused_parameters"] = _find_unused(params, vision)
    return RunPlan(
        device=device,
        precision=precision,
        attention=attention,
        chunked_loss=chunked,
        cpu=wing,
        launch=launch,
        deepspeed=deepspeed,
        why=why,
        warnings=tuple(warnings),
        liger=gpu.liger if gpu is not None else None,
        loss=gpu.loss if gpu is not None else ("chunked" if chunked else "logits"),
        tf32=tf32,
        find_unused_parameters=find_unused,
        quant_storage=DTYPES[precision] if zero3_4bit else None,
        vision_attention=vision_attention,
        packing=packing,
    )


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# a packed row's 3-D positions are built per chat for still images only (stages/core/vision.py
# rope_positions); a video's temporal positions follow its timing (Qwen2.5-VL scales them by
# second_per_grid_ts, Qwen3-VL splits them per frame), which the model computes in a padded batch
VIDEO_ROWS_PADDED = "padded batches: video rows: positions follow the video's timing, which the model computes per row"


def _device(requested: str, hw: Hardware) -> tuple[Literal["cpu", "cuda"], str, str | None]:
    """(device, why, a warning or None): `train.device`, the GPUs torch sees, and the stop on
    an NVIDIA GPU torch cannot use (stages/core/devices.py `check_usable`).

    >>> _device("auto", Hardware(gpus=2, capability=(9, 0)))[:2]
    ('cuda', '2 CUDA GPU(s) visible (sm90)')
    >>> _device("cpu", Hardware(gpus=2, capability=(9, 0)))[:2]
    ('cpu', 'train.device: cpu')
    """
    warning = check_usable(hw, "cpu" if requested == "cpu" else "auto", "train.device")
    if requested == "cpu":
        return "cpu", "train.device: cpu", warning
    if hw.gpus == 0:
        if requested == "cuda":
            raise SftflowError("train.device: cuda, but torch sees no CUDA GPU", field="train.device")
        return "cpu", "no CUDA GPU visible", None
    return "cuda", f"{hw.gpus} CUDA GPU(s) visible ({hw.sm})", None


def _precision(requested: str, device: str, hw: Hardware) -> tuple[Literal["fp32", "bf16", "fp16"], bool, str]:
    """(precision, tf32, why) for `train.precision` on `device`.

    auto: bf16 where the GPU computes it natively (sm80+), fp16 with loss scaling on older GPUs,
    fp32 on the CPU: bf16 autocast on a CPU rounds differently per CPU model (AMX, avx512_bf16
    or emulation), so the default pipeline's losses would change with the machine. fp32 on an
    sm80+ GPU runs its matmuls in TF32 (10-bit mantissa inputs, fp32 accumulation: the speed of
    16-bit tensor cores for fp32 training). bf16 on a GPU without native bf16 is refused, not
    emulated: torch would run it several times slower than fp16, and flash-attention refuses it;
    fp16 on the CPU is refused (its loss scaling and kernels are CUDA's).

    >>> _precision("auto", "cuda", Hardware(gpus=1, capability=(7, 0)))[:2]
    ('fp16', False)
    >>> _precision("auto", "cuda", Hardware(gpus=1, capability=(8, 0)))[:2]
    ('bf16', False)
    >>> _precision("fp32", "cuda", Hardware(gpus=1, capability=(9, 0)))
    ('fp32', True, 'train.precision: fp32; TF32 matmuls on sm90 (Ampere and newer)')
    >>> _precision("auto", "cpu", Hardware())
    ('fp32', False, 'auto on the CPU: fp32 (the same losses on every CPU model; bf16 on request)')
    """
    gpu = device == "cuda"
    if requested == "auto":
        if not gpu:
            return "fp32", False, "auto on the CPU: fp32 (the same losses on every CPU model; bf16 on request)"
        if hw.bf16:
            return "bf16", False, f"auto on {hw.sm}: bf16, native on compute capability 8.0+"
        return "fp16", False, f"auto on {hw.sm}: fp16 with loss scaling (no native bf16 below compute capability 8.0)"
    if requested == "bf16" and gpu and not hw.bf16:
        raise SftflowError(
            f"bf16 needs a GPU that computes it natively (compute capability 8.0+: A100, L4, H100, RTX 30xx+);"
            f" this one is {hw.sm}, where bf16 is emulated several times slower: use fp16 or auto",
            field="train.precision",
        )
    if requested == "fp16" and not gpu:
        raise SftflowError(
            "fp16 (autocast with loss scaling) runs on a CUDA GPU; on the CPU use fp32 or bf16",
            field="train.precision",
        )
    if requested == "fp32" and gpu and hw.bf16:
        return "fp32", True, f"train.precision: fp32; TF32 matmuls on {hw.sm} (Ampere and newer)"
    return requested, False, f"train.precision: {requested}"  # type: ignore[return-value]


def _find_unused(params: TrainParams, vision: bool) -> tuple[bool | None, str]:
    """DDP's `find_unused_parameters`. LoRA/QLoRA adapters all get a gradient every step, so
    False spares DDP a walk of the autograd graph per step (and peft models, not being
    `PreTrainedModel`s, would otherwise get True). A vision model whose tower or projector
    trains keeps True: a micro-batch without images leaves them without a gradient. Full
    fine-tuning keeps transformers' own rule (True unless gradient checkpointing).

    >>> _find_unused(TrainParams(), vision=False)[0], _find_unused(TrainParams(method="full"), vision=False)[0]
    (False, None)
    """
    if params.method == "full":
        return None, "full fine-tuning: transformers' rule (True unless gradient checkpointing)"
    if vision and (params.vision.tune_vision or params.vision.tune_projector):
        return True, "a trainable vision tower or projector gets no gradient from a text-only micro-batch"
    return False, "LoRA adapters all get a gradient every step"


def with_attention(plan: RunPlan, attention: str) -> RunPlan:
    """The same plan with another attention implementation (benchmarks: HF Trainer's own `sdpa`).

    >>> with_attention(decide(TrainParams(), Machine(), env={}), "sdpa").attention
    'sdpa'
    """
    return dataclasses.replace(plan, attention=attention, why={**plan.why, "attention": "set by the caller"})


def _flash_kernels(device: str, precision: str, hw: Hardware) -> str | None:
    """Where flash kernels (flash-attn's and torch's own) run: CUDA, bf16/fp16, compute capability
    8.0+ (they refuse fp32 at the first forward, and Turing/Volta GPUs); the GPU as NVIDIA writes
    it (sm80), else None. Without a known capability, native bf16 stands for 8.0+.

    >>> _flash_kernels("cuda", "bf16", Hardware(gpus=1, capability=(9, 0)))
    'sm90'
    >>> [_flash_kernels("cuda", "fp32", Hardware(gpus=1, capability=(9, 0))),
    ...  _flash_kernels("cuda", "fp16", Hardware(gpus=1, capability=(7, 5))), _flash_kernels("cpu", "bf16", Hardware())]
    [None, None, None]
    """
    if device != "cuda" or precision not in ("bf16", "fp16"):
        return None
    ampere = hw.capability >= (8, 0) if hw.capability is not None else hw.bf16
    return (hw.sm if hw.capability is not None else "the GPU") if ampere else None


def _attention(packing: str, device: str, flash: str | None, flash_attn: bool, softcap: float | None) -> tuple[str, str]:
    """The attention kernel (and why): padding-free rows need one that keeps samples apart and
    honours sliding windows exactly (stages/train/attention.py). Soft-capped attention logits
    (Gemma 2) are computed by flash-attn's kernel or the model's eager attention only.

    >>> _attention("auto", "cpu", None, False, None)[0], _attention("auto", "cuda", "sm80", True, None)[0]
    ('sdpa_varlen', 'flash_attention_2')
    >>> _attention("auto", "cuda", "sm90", False, None)[0], _attention("auto", "cuda", None, True, None)[0]
    ('varlen', 'sdpa_varlen')
    >>> _attention("auto", "cuda", "sm90", False, 50.0)[0], _attention("none", "cpu", None, False, 50.0)[0]
    ('eager', 'eager')
    """
    if softcap is not None and (packing == "none" or not (flash and flash_attn)):
        return "eager", (
            f"attention logit softcapping ({softcap:g}): neither SDPA nor torch's varlen kernel computes it;"
            " the model's own eager attention" + (" with transformers' per-sample masks" if packing != "none" else "")
        )
    if packing == "none":
        return "sdpa", "padded batches: transformers' SDPA with the padding mask"
    if flash and flash_attn:
        return "flash_attention_2", f"packed rows on {flash}: flash-attn's varlen kernel, one call per layer"
    if flash:
        return TORCH_VARLEN, f"packed rows on {flash} without flash-attn: torch's varlen_attn, one call per layer"
    if device == "cuda":
        return "sdpa_varlen", (
            "packed rows: flash kernels need bf16/fp16 on compute capability 8.0+; one SDPA call per sample"
        )
    return "sdpa_varlen", "packed rows: one SDPA call per sample (stages/train/attention.py)"


def _vision_attention(flash: str | None, flash_attn: bool) -> tuple[str, str]:
    """The vision tower's attention (Qwen2-VL/2.5-VL): its image windows through one varlen
    kernel call per layer where flash kernels run, else its own SDPA call per window.

    >>> [_vision_attention("sm90", True)[0], _vision_attention("sm90", False)[0], _vision_attention(None, True)[0]]
    ['flash_attention_2', 'flash_varlen_torch', 'sdpa']
    """
    if flash and flash_attn:
        return "flash_attention_2", f"{flash}: flash-attn's varlen kernel over the image windows"
    if flash:
        return VISION_VARLEN, f"{flash} without flash-attn: torch's varlen_attn over the image windows"
    return "sdpa", "one SDPA call per image window (flash kernels need bf16/fp16 on compute capability 8.0+)"


def _cpu_has_bf16() -> bool:
    """Whether this x86 CPU computes bf16 natively (otherwise autocast to bf16 only costs time)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: let torch decide
    return "avx512_bf16" in flags or "amx_bf16" in flags

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

from stages.core.devices import Hardware, detect_hardware
from stages.core.params import TrainParams
from stages.train import distributed
from stages.train.attention import register as register_varlen_attention
from stages.train.cpu import entry as cpu


@dataclass(frozen=True)
class Machine:
    """What the plan depends on besides the params: the CUDA GPUs torch sees (and whether they
    compute in bf16), whether this CPU computes bf16 natively, whether flash-attention is
    installed, why sftflow's C++ pieces cannot be built here (None: they can), and the mallocs
    that can be preloaded (name -> shared library)."""

    hardware: Hardware = field(default_factory=Hardware)
    cpu_bf16: bool = True
    flash_attn: bool = False
    native_problem: str | None = None
    allocators: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPlan:
    """Every decision about how one training run computes, taken once (see `decide`)."""

    device: Literal["cpu", "cuda"]
    precision: Literal["fp32", "bf16"]
    attention: str  # the model's attn_implementation: sdpa, sdpa_varlen or flash_attention_2
    chunked_loss: bool  # the LM head + loss in chunks of trained rows (stages/train/loss.py)
    cpu: cpu.CpuChoices  # the CPU speed wing's part: kernels, allocator, dropout masks
    launch: distributed.Launch
    deepspeed: dict[str, Any] | None  # the DeepSpeed config, read once (None: no DeepSpeed)
    why: dict[str, str] = field(default_factory=dict)  # the reason behind each choice, by field
    warnings: tuple[str, ...] = ()  # said before training starts

    @property
    def zero_stage(self) -> int:
        return distributed.zero_stage(self.deepspeed)

    @property
    def kernels(self) -> str:
        return self.cpu.kernels

    def report(self) -> dict[str, Any]:
        """The plan as `reports/train.json` shows it."""
        return {
            "device": self.device,
            "precision": self.precision,
            "attention": self.attention,
            "kernels": self.cpu.kernels,
            "chunked_loss": self.chunked_loss,
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
    )


def decide(
    params: TrainParams,
    machine: Machine,
    *,
    vision: bool = False,
    env: Mapping[str, str] | None = None,
    params_file: str = "params.yaml",
) -> RunPlan:
    """The plan for `params` on `machine` (`vision`: the base is a vision-language model;
    `env`: the launch overrides, os.environ when None).

    >>> plan = decide(TrainParams(), Machine(allocators={"jemalloc": "/lib/libjemalloc.so.2"}), env={})
    >>> plan.device, plan.attention, plan.kernels, plan.chunked_loss, plan.cpu.allocator
    ('cpu', 'sdpa_varlen', 'fast', True, 'jemalloc')
    >>> gpu = Machine(hardware=Hardware(gpus=1, bf16=True), flash_attn=True)
    >>> plan = decide(TrainParams(precision="bf16"), gpu, env={})
    >>> plan.device, plan.attention, plan.kernels, plan.cpu.allocator, plan.cpu.dropout_masks
    ('cuda', 'flash_attention_2', 'plain', 'system', 'torch')
    >>> decide(TrainParams(packing="none"), Machine(), env={}).attention
    'sdpa'
    """
    device: Literal["cpu", "cuda"] = "cuda" if machine.hardware.gpus > 0 else "cpu"
    launch = distributed.resolve_launch(params.distributed, dict(env) if env is not None else None)
    deepspeed = distributed.deepspeed_config(params.distributed, params_file)
    why: dict[str, str] = {"device": f"{machine.hardware.gpus} CUDA GPU(s) visible" if device == "cuda" else "no CUDA GPU visible"}
    warnings: list[str] = []
    if params.precision == "bf16" and device == "cpu" and not machine.cpu_bf16:
        warnings.append("train: this CPU has no native bf16 (avx512_bf16/AMX): bf16 will be emulated and slow")
    attention, why["attention"] = _attention(params.packing, device, machine.flash_attn)
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
    return RunPlan(
        device=device,
        precision=params.precision,
        attention=attention,
        chunked_loss=chunked,
        cpu=wing,
        launch=launch,
        deepspeed=deepspeed,
        why=why,
        warnings=tuple(warnings),
    )


def with_attention(plan: RunPlan, attention: str) -> RunPlan:
    """The same plan with another attention implementation (benchmarks: HF Trainer's own `sdpa`).

    >>> with_attention(decide(TrainParams(), Machine(), env={}), "sdpa").attention
    'sdpa'
    """
    return dataclasses.replace(plan, attention=attention, why={**plan.why, "attention": "set by the caller"})


def _attention(packing: str, device: str, flash_attn: bool) -> tuple[str, str]:
    """The attention kernel for a packing mode: padding-free rows need one that keeps samples
    apart — flash-attention 2 on CUDA when installed, sftflow's per-sample SDPA otherwise."""
    if packing == "none":
        return "sdpa", "padded batches: transformers' SDPA with the padding mask"
    if device == "cuda" and flash_attn:
        return "flash_attention_2", "packed rows on CUDA with flash-attn installed"
    return register_varlen_attention(), "packed rows: one SDPA call per sample (stages/train/attention.py)"


def _cpu_has_bf16() -> bool:
    """Whether this x86 CPU computes bf16 natively (otherwise autocast to bf16 only costs time)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: let torch decide
    return "avx512_bf16" in flags or "amx_bf16" in flags

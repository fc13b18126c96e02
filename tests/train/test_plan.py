"""The run plan: every device-dependent choice is a pure function, tested with made-up machines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.core.devices import Hardware
from stages.core.errors import SftflowError
from stages.core.params import DistributedParams, TrainParams
from stages.train.plan import Machine, decide

CPU = Machine(allocators={"jemalloc": "/usr/lib/libjemalloc.so.2"})
GPU = Machine(hardware=Hardware(gpus=1, bf16=True), allocators={"jemalloc": "/usr/lib/libjemalloc.so.2"})


def test_a_gpu_runs_the_plain_path_and_the_cpu_its_speed_wing() -> None:
    gpu, cpu = decide(TrainParams(), GPU, env={}), decide(TrainParams(), CPU, env={})
    assert (gpu.device, gpu.kernels, gpu.chunked_loss, gpu.cpu.allocator, gpu.cpu.dropout_masks) == (
        "cuda", "plain", False, "system", "torch"
    )  # fmt: skip
    assert (cpu.device, cpu.kernels, cpu.chunked_loss, cpu.cpu.allocator, cpu.cpu.dropout_masks) == (
        "cpu", "fast", True, "jemalloc", "sftflow"
    )  # fmt: skip
    assert cpu.report()["why"]["kernels"] == "auto on the CPU"
    assert gpu.why["dropout_masks"] == "training on a GPU: its dropout runs there"
    assert decide(TrainParams(dropout_masks="torch"), CPU, env={}).why["dropout_masks"] == "train.dropout_masks: torch"
    assert decide(TrainParams(allocator="system"), CPU, env={}).cpu.allocator == "system"


def test_attention_follows_packing_and_flash_attention_only_on_cuda() -> None:
    flash_gpu = Machine(hardware=Hardware(gpus=1, bf16=True), flash_attn=True)
    assert decide(TrainParams(), flash_gpu, env={}).attention == "flash_attention_2"
    assert decide(TrainParams(), Machine(flash_attn=True), env={}).attention == "sdpa_varlen"  # a CPU
    assert decide(TrainParams(), GPU, env={}).attention == "sdpa_varlen"  # not installed
    assert decide(TrainParams(packing="none"), flash_gpu, env={}).attention == "sdpa"


def test_no_compiler_keeps_torchs_masks_and_says_why() -> None:
    plan = decide(TrainParams(), Machine(native_problem="no C++ compiler found"), env={})
    assert plan.cpu.dropout_masks == "torch" and plan.why["dropout_masks"] == "no C++ compiler found"


def test_zero3_runs_plain_and_refuses_an_explicit_fast(tmp_path: Path) -> None:
    """ZeRO-3 gathers a weight only inside its own module's forward; fast reads base, adapter
    and head weights directly, so under ZeRO-3 (a shipped preset or a user's own JSON) auto runs
    plain and an explicit fast is an error naming the key; gradient checkpointing runs plain."""
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for ds in ("zero3", str(own)):
        zero3 = DistributedParams(deepspeed=ds)
        plan = decide(TrainParams(distributed=zero3), CPU, env={})
        assert (plan.kernels, plan.chunked_loss, plan.zero_stage) == ("plain", False, 3)
        with pytest.raises(SftflowError, match=r"train\.kernels: fast cannot run under ZeRO-3"):
            decide(TrainParams(kernels="fast", distributed=zero3), CPU, env={})
    zero2 = DistributedParams(deepspeed="zero2")
    assert decide(TrainParams(distributed=zero2), CPU, env={}).kernels == "fast"
    for kind in ("auto", "fast"):
        assert decide(TrainParams(kernels=kind, gradient_checkpointing=True), CPU, env={}).kernels == "plain"


def test_full_fine_tuning_and_vision_models_keep_peft_forwards() -> None:
    full = decide(TrainParams(method="full"), CPU, env={})
    assert (full.kernels, full.chunked_loss, full.cpu.dropout_masks) == ("plain", False, "torch")
    vlm = decide(TrainParams(), CPU, vision=True, env={})
    assert (vlm.kernels, vlm.chunked_loss) == ("plain", True)


def test_launch_comes_from_the_environment_and_bf16_emulation_is_said() -> None:
    plan = decide(TrainParams(distributed=DistributedParams(nproc_per_node=2)), GPU, env={"NNODES": "2"})
    assert plan.launch.world_size == 4 and plan.report()["processes"] == 4
    assert decide(TrainParams(precision="bf16"), Machine(cpu_bf16=False), env={}).warnings
    assert not decide(TrainParams(precision="bf16"), GPU, env={}).warnings


def test_train_report_carries_the_plan(tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    from stages.train.trainer import train
    from tests.conftest import four_adamw_steps

    report = train(four_adamw_steps(kernels="plain", max_steps=1), tiny_base, prepared, tmp_path / "o", tmp_path / "c", tmp_path / "l.csv")
    assert report["plan"]["device"] == "cpu" and report["plan"]["kernels"] == "plain"
    assert report["plan"]["attention"] == report["attention"] == "sdpa_varlen"
    assert set(report["plan"]["why"]) >= {"device", "attention", "kernels", "allocator", "dropout_masks"}

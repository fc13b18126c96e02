"""The run plan: every device-dependent choice is a pure function, tested with made-up machines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.core.devices import Hardware
from stages.core.errors import SftflowError
from stages.core.params import DistributedParams, QLoraParams, TrainParams, VisionParams
from stages.train.plan import Machine, decide

CPU = Machine(allocators={"jemalloc": "/usr/lib/libjemalloc.so.2"})
GPU = Machine(hardware=Hardware(gpus=1, capability=(8, 0)), allocators={"jemalloc": "/usr/lib/libjemalloc.so.2"})


def gpu(major: int, minor: int, gpus: int = 1) -> Machine:
    return Machine(hardware=Hardware(gpus=gpus, capability=(major, minor)))


def test_a_gpu_runs_the_plain_path_and_the_cpu_its_speed_wing() -> None:
    gpu, cpu = decide(TrainParams(), GPU, env={}), decide(TrainParams(), CPU, env={})
    # no liger-kernel on GPU: plain with the chunked loss (tests/train/test_gpu_kernels.py)
    assert (gpu.device, gpu.kernels, gpu.chunked_loss, gpu.cpu.allocator, gpu.cpu.dropout_masks) == (
        "cuda", "plain", True, "system", "torch"
    )  # fmt: skip
    assert (cpu.device, cpu.kernels, cpu.chunked_loss, cpu.cpu.allocator, cpu.cpu.dropout_masks) == (
        "cpu", "fast", True, "jemalloc", "sftflow"
    )  # fmt: skip
    assert cpu.report()["why"]["kernels"] == "auto on the CPU"
    assert gpu.why["dropout_masks"] == "training on a GPU: its dropout runs there"
    assert decide(TrainParams(dropout_masks="torch"), CPU, env={}).why["dropout_masks"] == "train.dropout_masks: torch"
    assert decide(TrainParams(allocator="system"), CPU, env={}).cpu.allocator == "system"


def test_attention_follows_packing_and_flash_attention_only_on_cuda() -> None:
    flash_gpu = Machine(hardware=Hardware(gpus=1, capability=(8, 0)), flash_attn=True)
    assert decide(TrainParams(), flash_gpu, env={}).attention == "flash_attention_2"
    assert decide(TrainParams(), Machine(flash_attn=True), env={}).attention == "sdpa_varlen"  # a CPU
    assert decide(TrainParams(), GPU, env={}).attention == "varlen"  # not installed: torch's varlen kernel
    assert decide(TrainParams(precision="fp32"), flash_gpu, env={}).attention == "sdpa_varlen"  # fp32: no flash
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


@pytest.mark.parametrize(
    "machine, precision, tf32",
    [
        (gpu(7, 0), "fp16", False),  # V100
        (gpu(7, 5), "fp16", False),  # T4
        (gpu(8, 0), "bf16", False),  # A100
        (gpu(8, 9), "bf16", False),  # L4
        (gpu(9, 0, gpus=8), "bf16", False),  # H100 node
        (Machine(), "fp32", False),  # the CPU: the default pipeline's losses on every CPU model
        (Machine(cpu_bf16=True), "fp32", False),  # even one with AMX: bf16 only on request
    ],
)
def test_auto_precision_follows_the_compute_capability(machine: Machine, precision: str, tf32: bool) -> None:
    plan = decide(TrainParams(), machine, env={})
    assert (plan.precision, plan.tf32) == (precision, tf32)
    assert plan.report()["precision"] == precision and plan.report()["why"]["precision"].startswith("auto on")
    assert plan.dtype == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]


def test_asked_precisions_tf32_and_the_refusals() -> None:
    fp32 = decide(TrainParams(precision="fp32"), gpu(8, 0), env={})
    assert (fp32.precision, fp32.tf32, fp32.report()["tf32"]) == ("fp32", True, True)
    assert "TF32" in fp32.why["precision"]
    assert decide(TrainParams(precision="fp32"), gpu(7, 5), env={}).tf32 is False  # no TF32 before Ampere
    assert decide(TrainParams(precision="fp16"), gpu(9, 0), env={}).precision == "fp16"  # asked: kept
    assert decide(TrainParams(precision="bf16"), Machine(), env={}).precision == "bf16"  # the CPU, on request
    # bf16 on sm75 is emulated by torch, several times slower than fp16: refused, naming the key and the GPU
    with pytest.raises(SftflowError, match=r"train\.precision: bf16 needs a GPU that computes it natively.*sm75"):
        decide(TrainParams(precision="bf16"), gpu(7, 5), env={})
    with pytest.raises(SftflowError, match=r"train\.precision: fp16 .* runs on a CUDA GPU"):
        decide(TrainParams(precision="fp16"), Machine(), env={})


def test_an_nvidia_gpu_torch_cannot_use_stops_train_unless_the_cpu_is_asked() -> None:
    for broken, cause in (
        (Hardware(nvidia="/dev/nvidia0", torch_cuda="13.0"), "driver/CUDA-build mismatch"),
        (Hardware(nvidia="/usr/bin/nvidia-smi", torch_cuda=None), "torch is a CPU-only build"),
    ):
        with pytest.raises(SftflowError, match=cause) as err:
            decide(TrainParams(), Machine(hardware=broken), env={})
        assert err.value.field == "train.device" and "set train.device: cpu" in str(err.value)
        plan = decide(TrainParams(device="cpu"), Machine(hardware=broken), env={})
        assert (plan.device, plan.precision, plan.why["device"]) == ("cpu", "fp32", "train.device: cpu")
        assert any("running on the CPU although" in w and cause in w for w in plan.warnings)
    assert decide(TrainParams(device="cpu"), gpu(9, 0), env={}).device == "cpu"
    with pytest.raises(SftflowError, match=r"train\.device: cuda, but torch sees no CUDA GPU"):
        decide(TrainParams(device="cuda"), Machine(), env={})


def test_8bit_optimizers_need_cuda_and_ddp_skips_the_unused_search_for_adapters() -> None:
    with pytest.raises(SftflowError, match=r"train\.optim: paged_adamw_8bit is a bitsandbytes optimizer"):
        decide(TrainParams(optim="paged_adamw_8bit"), Machine(), env={})
    assert decide(TrainParams(optim="adamw_8bit"), gpu(8, 0), env={}).device == "cuda"
    assert decide(TrainParams(optim="adafactor"), Machine(), env={}).device == "cpu"
    assert decide(TrainParams(), gpu(8, 0), env={}).find_unused_parameters is False
    assert decide(TrainParams(method="qlora"), gpu(8, 0), env={}).find_unused_parameters is False
    assert decide(TrainParams(method="full"), gpu(8, 0), env={}).find_unused_parameters is None
    tower = TrainParams(vision=VisionParams(tune_projector=True))
    assert decide(tower, gpu(8, 0), vision=True, env={}).find_unused_parameters is True
    assert decide(tower, gpu(8, 0), vision=False, env={}).find_unused_parameters is False


def test_qlora_under_zero3_stores_4bit_weights_in_the_compute_dtype() -> None:
    """peft's QLoRA + ZeRO-3 recipe: bnb_4bit_quant_storage = the dtype every other weight is
    loaded in, so ZeRO-3 shards one dtype; without ZeRO-3 bitsandbytes keeps its uint8 packing."""
    from stages.core.loading import bnb_4bit_config
    from stages.core.params import parse_params

    qlora = parse_params({"train": {"method": "qlora", "distributed": {"deepspeed": "zero3"}}}).train  # no refusal
    plan = decide(qlora, gpu(9, 0, gpus=8), env={})
    assert (plan.zero_stage, plan.precision, plan.quant_storage) == (3, "bf16", "bfloat16")
    config = bnb_4bit_config(qlora.qlora, plan.dtype, plan.quant_storage)
    assert (str(config.bnb_4bit_quant_storage), str(config.bnb_4bit_compute_dtype)) == ("torch.bfloat16", "torch.bfloat16")
    on_t4 = decide(qlora, gpu(7, 5, gpus=2), env={})
    assert on_t4.quant_storage == "float16"
    assert decide(TrainParams(method="qlora"), gpu(9, 0), env={}).quant_storage is None
    with pytest.raises(SftflowError, match=r"train\.distributed\.deepspeed: zero3 with qlora is written for text models"):
        decide(qlora, gpu(9, 0, gpus=8), vision=True, env={})
    assert decide(TrainParams(distributed=DistributedParams(deepspeed="zero3")), gpu(9, 0), env={}).quant_storage is None
    plain = bnb_4bit_config(TrainParams().qlora)  # merge: auto computes in float32, stored as uint8
    assert (str(plain.bnb_4bit_compute_dtype), str(plain.bnb_4bit_quant_storage)) == ("torch.float32", "torch.uint8")
    fixed = bnb_4bit_config(QLoraParams(compute_dtype="float16"), "bfloat16")
    assert str(fixed.bnb_4bit_compute_dtype) == "torch.float16"  # an explicit compute_dtype wins


def test_the_launcher_sets_expandable_segments_on_cuda_only_unless_the_user_did() -> None:
    from stages.train.distributed import cuda_environment

    assert cuda_environment("cuda", {"PATH": "/bin"}) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert cuda_environment("cuda", {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) == {}
    assert cuda_environment("cpu", {}) == {}


def test_trainer_arguments_carry_the_optimizer_and_precision_knobs(tmp_path: Path) -> None:
    """Built from params as train builds them: every knob reaches TrainingArguments; a GPU
    plan's (fp16, tf32: refused by TrainingArguments without a GPU) through the same dict."""
    from stages.train.trainer import optimizer_and_precision, training_arguments

    params = TrainParams(
        optim="adamw_torch", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, warmup_steps=3,
        weight_decay=0.1, max_grad_norm=0.5, report_to=(),
    )  # fmt: skip
    args = training_arguments(params, decide(params, CPU, env={}), tmp_path, has_eval=False)
    assert (args.optim, args.adam_beta1, args.adam_beta2, args.adam_epsilon) == ("adamw_torch", 0.8, 0.95, 1e-6)
    assert (args.warmup_steps, args.weight_decay, args.max_grad_norm) == (3, 0.1, 0.5)
    assert (args.bf16, args.fp16, args.tf32, args.ddp_find_unused_parameters) == (False, False, None, False)
    default = training_arguments(TrainParams(report_to=()), decide(TrainParams(), CPU, env={}), tmp_path, False)
    assert (default.optim, default.warmup_steps, default.bf16) == ("adamw_torch_fused", 0.0, False)  # today's
    assert training_arguments(TrainParams(warmup_ratio=0.1, report_to=()), decide(TrainParams(), CPU, env={}),
                              tmp_path, False).warmup_steps == 0.1  # fmt: skip
    t4 = optimizer_and_precision(params, decide(params, gpu(7, 5), env={}))
    a100 = optimizer_and_precision(TrainParams(precision="fp32"), decide(TrainParams(precision="fp32"), gpu(8, 0), env={}))
    assert (t4["fp16"], t4["bf16"], t4["tf32"]) == (True, False, None)
    assert (a100["fp16"], a100["bf16"], a100["tf32"]) == (False, False, True)


def test_train_report_carries_the_plan(tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    from stages.train.trainer import train
    from tests.conftest import four_adamw_steps

    report = train(four_adamw_steps(kernels="plain", max_steps=1), tiny_base, prepared, tmp_path / "o", tmp_path / "c", tmp_path / "l.csv")
    assert report["plan"]["device"] == "cpu" and report["plan"]["kernels"] == "plain"
    assert report["plan"]["attention"] == report["attention"] == "sdpa_varlen"
    assert set(report["plan"]["why"]) >= {"device", "attention", "kernels", "allocator", "dropout_masks"}

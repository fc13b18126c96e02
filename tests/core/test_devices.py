"""Where merge, eval and chat put the model. No GPU here: the choice is a pure function of the
hardware, tested on every shape of machine; the CPU path is the one the other tests run."""

from __future__ import annotations

import pytest

from stages.core.devices import (
    Hardware,
    Placement,
    check_usable,
    choose_placement,
    detect_hardware,
    gpu_dtype,
    unusable_gpu,
)
from stages.core.errors import SftflowError

CPU = Hardware(gpus=0)
AMPERE = Hardware(gpus=1, capability=(8, 0))  # A100; also L4 (8.9), H100 (9.0): native bf16
TURING = Hardware(gpus=1, capability=(7, 5))  # T4, RTX 20xx: fp16 only
VOLTA = Hardware(gpus=1, capability=(7, 0))  # V100
NODE = Hardware(gpus=8, capability=(9, 0))
NO_DRIVER = Hardware(nvidia="/dev/nvidia0", torch_cuda="13.0")  # torch's CUDA build meets an old driver
CPU_TORCH = Hardware(nvidia="/usr/bin/nvidia-smi", torch_cuda=None)  # a CPU-only torch on a GPU box


@pytest.mark.parametrize("purpose", ["merge", "eval", "chat"])
def test_no_gpu_keeps_the_fp32_cpu_path(purpose: str) -> None:
    p = choose_placement(purpose, CPU, "auto", batch_size=32)
    assert p == Placement("cpu", "float32", None, 32)
    assert p.load_kwargs() == {}  # from_pretrained exactly as before: no device_map


def test_native_bf16_comes_from_the_compute_capability_not_torchs_emulation_flag() -> None:
    """torch.cuda.is_bf16_supported() says yes on sm75 too (emulated): the capability decides."""
    assert [gpu_dtype(hw) for hw in (VOLTA, TURING, AMPERE, NODE)] == ["float16", "float16", "bfloat16", "bfloat16"]
    assert Hardware(gpus=1, bf16=True, capability=(7, 5)).bf16 is False  # the capability wins
    assert Hardware(gpus=1, bf16=True).bf16 is True  # no capability known: the flag as given
    assert Hardware(gpus=0, capability=(9, 0)).bf16 is False


def test_eval_uses_the_first_gpu_unless_spreading_is_asked() -> None:
    """One process, one GPU: a small model is not spread over every GPU of the box."""
    assert choose_placement("eval", AMPERE, batch_size=32) == Placement("cuda", "bfloat16", "cuda:0", "auto")
    assert choose_placement("eval", TURING, batch_size=32) == Placement("cuda", "float16", "cuda:0", "auto")
    assert choose_placement("eval", NODE).load_kwargs() == {"device_map": "cuda:0"}
    assert choose_placement("eval", NODE, spread=True).load_kwargs() == {"device_map": "auto"}  # eval.device_map: auto


def test_merge_on_a_gpu_stays_fp32() -> None:
    """The fold W + s·BA is done in fp32 on any device; merge.dtype casts only the saved copy."""
    for hw in (AMPERE, TURING, NODE):
        p = choose_placement("merge", hw)
        assert (p.device, p.dtype, p.device_map) == ("cuda", "float32", "auto")


def test_chat_on_a_gpu_keeps_its_batch() -> None:
    assert choose_placement("chat", TURING, batch_size=1) == Placement("cuda", "float16", "cuda:0", 1)


def test_forcing_cpu_on_a_gpu_machine_and_cuda_without_one() -> None:
    assert choose_placement("eval", AMPERE, "cpu", batch_size=8) == Placement("cpu", "float32", None, 8)
    assert choose_placement("eval", AMPERE, "cuda").device == "cuda"
    with pytest.raises(SftflowError, match="no CUDA GPU") as err:
        choose_placement("eval", CPU, "cuda")
    assert err.value.field == "eval.device"


def test_a_gpu_torch_cannot_use_stops_every_command_unless_the_cpu_is_asked() -> None:
    assert "driver/CUDA-build mismatch" in unusable_gpu(NO_DRIVER) and "CUDA 13.0" in unusable_gpu(NO_DRIVER)
    assert "torch is a CPU-only build" in unusable_gpu(CPU_TORCH)
    assert unusable_gpu(CPU) is None and unusable_gpu(Hardware(gpus=1, capability=(8, 0), nvidia="/dev/nvidia0")) is None
    for purpose, field in (("merge", "merge.device"), ("eval", "eval.device"), ("chat", "device")):
        for hw in (NO_DRIVER, CPU_TORCH):
            with pytest.raises(SftflowError, match=f"set {field}: cpu") as err:
                choose_placement(purpose, hw)
            assert err.value.field == field
        assert choose_placement(purpose, NO_DRIVER, "cpu").device == "cpu"
    assert "running on the CPU although an NVIDIA GPU is present" in check_usable(CPU_TORCH, "cpu", "train.device")
    assert check_usable(AMPERE, "auto", "train.device") is None


def test_this_machine_is_detected_as_it_is() -> None:
    import torch

    hw = detect_hardware()
    assert hw.gpus == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert hw.torch_cuda == torch.version.cuda
    assert (hw.capability is not None) == (hw.gpus > 0)


def test_eval_and_merge_params_take_device_and_backend() -> None:
    from stages.core.params import parse_params

    p = parse_params({"eval": {"device": "cpu", "backend": "vllm", "device_map": "auto"}, "merge": {"device": "cuda"}})
    assert (p.eval.device, p.eval.backend, p.eval.device_map, p.merge.device) == ("cpu", "vllm", "auto", "cuda")
    assert parse_params({}).eval.device_map == "single"
    with pytest.raises(SftflowError, match=r"eval.backend: expected one of 'hf' \| 'vllm'"):
        parse_params({"eval": {"backend": "tgi"}})
    with pytest.raises(SftflowError, match=r"eval.device_map: expected one of 'single' \| 'auto'"):
        parse_params({"eval": {"device_map": "balanced"}})


def test_vllm_backend_without_vllm_says_how_to_get_it(tmp_path) -> None:
    import importlib.util

    from stages.core.params import EvalParams
    from stages.evaluate.harness import eval_model

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(SftflowError, match="pip install vllm"):
        eval_model(EvalParams(backend="vllm"), tmp_path, tok=None, stop="")

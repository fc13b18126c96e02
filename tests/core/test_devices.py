"""Where merge, eval and chat put the model. No GPU here: the choice is a pure function of the
hardware, tested on every shape of machine; the CPU path is the one the other tests run."""

from __future__ import annotations

import pytest

from stages.core.devices import Hardware, Placement, choose_placement, detect_hardware
from stages.core.errors import SftflowError

CPU = Hardware(gpus=0)
AMPERE = Hardware(gpus=1, bf16=True)  # A100, L4, RTX 30xx/40xx: bf16
TURING = Hardware(gpus=1, bf16=False)  # T4, V100, RTX 20xx: fp16 only
NODE = Hardware(gpus=8, bf16=True)


@pytest.mark.parametrize("purpose", ["merge", "eval", "chat"])
def test_no_gpu_keeps_the_fp32_cpu_path(purpose: str) -> None:
    p = choose_placement(purpose, CPU, "auto", batch_size=32)
    assert p == Placement("cpu", "float32", None, 32)
    assert p.load_kwargs() == {}  # from_pretrained exactly as before: no device_map


def test_eval_on_a_gpu_is_bf16_where_supported_fp16_elsewhere_with_auto_batch() -> None:
    assert choose_placement("eval", AMPERE, batch_size=32) == Placement("cuda", "bfloat16", "auto", "auto")
    assert choose_placement("eval", TURING, batch_size=32) == Placement("cuda", "float16", "auto", "auto")
    assert choose_placement("eval", NODE).load_kwargs() == {"device_map": "auto"}  # spread over all 8


def test_merge_on_a_gpu_stays_fp32() -> None:
    """The fold W + s·BA is done in fp32 on any device; merge.dtype casts only the saved copy."""
    for hw in (AMPERE, TURING, NODE):
        p = choose_placement("merge", hw)
        assert (p.device, p.dtype, p.device_map) == ("cuda", "float32", "auto")


def test_chat_on_a_gpu_keeps_its_batch() -> None:
    assert choose_placement("chat", TURING, batch_size=1) == Placement("cuda", "float16", "auto", 1)


def test_forcing_cpu_on_a_gpu_machine_and_cuda_without_one() -> None:
    assert choose_placement("eval", AMPERE, "cpu", batch_size=8) == Placement("cpu", "float32", None, 8)
    assert choose_placement("eval", AMPERE, "cuda").device == "cuda"
    with pytest.raises(SftflowError, match="no CUDA GPU"):
        choose_placement("eval", CPU, "cuda")


def test_this_machine_is_detected_as_it_is() -> None:
    import torch

    hw = detect_hardware()
    assert hw.gpus == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_eval_and_merge_params_take_device_and_backend() -> None:
    from stages.core.params import parse_params

    p = parse_params({"eval": {"device": "cpu", "backend": "vllm"}, "merge": {"device": "cuda"}})
    assert (p.eval.device, p.eval.backend, p.merge.device) == ("cpu", "vllm", "cuda")
    with pytest.raises(SftflowError, match=r"eval.backend: expected one of 'hf' \| 'vllm'"):
        parse_params({"eval": {"backend": "tgi"}})


def test_vllm_backend_without_vllm_says_how_to_get_it(tmp_path) -> None:
    import importlib.util

    from stages.core.params import EvalParams
    from stages.evaluate.harness import eval_model

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(SftflowError, match="pip install vllm"):
        eval_model(EvalParams(backend="vllm"), tmp_path, tok=None, stop="")

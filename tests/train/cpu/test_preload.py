"""`train.allocator`: a preloaded malloc changes where tensors live, never what a step computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages.train.cpu import preload
from tests.conftest import bin_path, run

JEMALLOC = preload.find("jemalloc")


def train_command(tmp: Path, base: Path, prepared: Path, allocator: str) -> dict:
    """`sftflow train` as DVC runs it, 4 steps with LoRA dropout; its report."""
    knobs = {"allocator": allocator, "max_steps": 4, "batch_size": 4, "save_steps": 0, "threads": 1}
    knobs |= {"report_to": [], "learning_rate": 1e-3, "lr_scheduler": "constant", "lora": {"dropout": 0.05}}
    params = tmp / f"{allocator}.yaml"
    params.write_text(yaml.safe_dump({"train": knobs}))
    out = tmp / allocator
    paths = {"--out": out / "adapter", "--report": out / "train.json", "--plot": out / "loss.csv"}
    paths |= {"--checkpoints": out / "ckpt", "--tensorboard": out / "tb"}
    cmd = [bin_path("sftflow"), "train", "--params", str(params), "--model", str(base), "--data", str(prepared)]
    run([*cmd, *(str(x) for pair in paths.items() for x in pair)], cwd=tmp)
    return json.loads((out / "train.json").read_text())


@pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc2 is not installed (setup.sh installs it where it can)")
def test_the_train_command_starts_itself_with_jemalloc_and_computes_the_same(
    tiny_base: Path, prepared: Path, tmp_path: Path
) -> None:
    """auto on the CPU: the command starts itself again with LD_PRELOAD, the report says the
    library was loaded; the losses and the adapter's bytes equal glibc's malloc's."""
    auto = train_command(tmp_path, tiny_base, prepared, "auto")
    glibc = train_command(tmp_path, tiny_base, prepared, "system")
    assert auto["allocator"] == {
        "kind": "jemalloc",
        "why": "auto on the CPU: jemalloc preloaded (glibc's heap keeps freed activation pages)",
        "library": JEMALLOC,
        "loaded": True,
    }
    assert auto["plan"]["allocator"] == "jemalloc" and glibc["allocator"]["kind"] == "system"
    assert len(auto["losses"]) == 4 and auto["losses"] == glibc["losses"]
    adapters = [(tmp_path / k / "adapter" / "adapter_model.safetensors").read_bytes() for k in ("auto", "system")]
    assert adapters[0] == adapters[1]


def test_a_missing_malloc_is_named_with_its_package() -> None:
    from stages.core.errors import SftflowError
    from stages.core.params import TrainParams
    from stages.train.plan import Machine, decide

    with pytest.raises(SftflowError, match=r"train\.allocator: tcmalloc: libtcmalloc_minimal\.so\.4 is not installed"):
        decide(TrainParams(allocator="tcmalloc"), Machine(), env={})
    plan = decide(TrainParams(), Machine(), env={})
    assert plan.cpu.allocator == "system" and "glibc's malloc" in plan.why["allocator"]
    gpu = decide(TrainParams(), Machine(hardware=type(Machine().hardware)(gpus=1), allocators={"jemalloc": "/x"}), env={})
    assert gpu.cpu.allocator == "system" and gpu.cpu.allocator_library is None


def test_a_malloc_the_loader_refused_is_not_asked_for_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command starts itself again only once: a library already in LD_PRELOAD but not loaded
    (the loader refused it) gives no new environment, so there is no loop of restarts."""
    from stages.core.params import TrainParams
    from stages.train.cpu.entry import preload_environment
    from stages.train.plan import Machine, decide

    lib = "/nonexistent/libjemalloc.so.2"
    choices = decide(TrainParams(), Machine(allocators={"jemalloc": lib}), env={}).cpu
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert preload_environment(choices)["LD_PRELOAD"] == lib
    monkeypatch.setenv("LD_PRELOAD", lib)
    assert preload_environment(choices) is None

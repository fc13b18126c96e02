"""One retraining round: `dvc repro`, then the gate; accept on pass, keep the old model on fail.

This is what the scheduled CI job runs (`.github/workflows/retrain.yml`) and what a user runs
by hand after adding raw chats. DVC decides what reruns (new chats: prepare..eval; nothing new:
nothing); the gate decides whether the result replaces the accepted model. On a failed gate
the previous `dvc.lock` is restored and `dvc checkout` puts the accepted model's outputs back
from the cache, so the workspace never holds a rejected model under an accepted lock file; the
rejected run's metrics stay in `reports/` to read why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from stages.core.errors import SftflowError
from stages.core.io import atomic_file
from stages.core.params import GateParams
from stages.tools.gate import GateResult, accept, gate


def dvc_bin() -> str:
    """The dvc next to this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def _dvc(*args: str) -> None:
    code = subprocess.call([dvc_bin(), *args])
    if code != 0:
        raise SftflowError(
            f"`dvc {' '.join(args)}` failed (exit {code}); see its output above", path="dvc.yaml"
        )


def retrain(params: GateParams, params_path: Path, metrics_path: Path) -> GateResult:
    """Reproduce the pipeline in the current directory and gate the result."""
    lock = Path("dvc.lock")
    accepted_lock = lock.read_bytes() if lock.exists() else None
    _dvc("repro")
    accepted_path = Path(params.accepted)
    result = gate(params, metrics_path, accepted_path, params_path)
    if result.passed:
        accept(metrics_path, accepted_path)
    elif accepted_lock is not None:
        with atomic_file(lock) as tmp:
            tmp.write_bytes(accepted_lock)
        _dvc("checkout", "dvc.yaml")  # this pipeline's outputs only, not every dvc.yaml in the repo
    return result

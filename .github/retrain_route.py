"""Which runner the retrain workflow uses: prints GitHub step outputs (key=value lines).

The `runner` input of a manual run wins over .github/retrain-runner.json ("runs_on"). Hosted
runners (ubuntu-*) have no GPU: they get the CPU-only torch wheels instead of PyPI's default
multi-GB CUDA build. "cml" runs on the GPU machine the launch-gpu job starts (label cml-gpu).

    python3 .github/retrain_route.py '["self-hosted", "gpu"]'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CONFIG = Path(__file__).resolve().parent / "retrain-runner.json"


def route(runner_input: str, config: dict) -> dict[str, str]:
    try:
        runs_on = json.loads(runner_input) if runner_input.strip() else config.get("runs_on", "ubuntu-latest")
    except json.JSONDecodeError:
        runs_on = runner_input.strip()  # a bare label such as ubuntu-latest
    if not (isinstance(runs_on, str) or (isinstance(runs_on, list) and all(isinstance(x, str) for x in runs_on))):
        raise SystemExit(f"runs_on must be a label or a list of labels, got {runs_on!r}")
    cml = runs_on == "cml"
    if cml:
        runs_on = ["self-hosted", "cml-gpu"]
    hosted = isinstance(runs_on, str) and runs_on.startswith("ubuntu-")
    return {
        "runs_on": json.dumps(runs_on),
        "cml": "true" if cml else "false",
        "cml_cloud": config.get("cml_cloud") or "aws",
        "cml_cloud_type": config.get("cml_cloud_type") or "g5.xlarge",
        "torch_index_url": config.get("torch_index_url") or (CPU_INDEX if hosted else ""),
    }


if __name__ == "__main__":
    outputs = route(sys.argv[1] if len(sys.argv) > 1 else "", json.loads(CONFIG.read_text()))
    print("\n".join(f"{k}={v}" for k, v in outputs.items()))

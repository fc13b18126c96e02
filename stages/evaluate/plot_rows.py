"""eval's metrics as plottable rows (`plots/eval.json`), for `dvc plots show` / `diff`.

eval writes `reports/eval.json` as flat `task.metric.base|tuned|delta` keys (what `dvc
metrics diff` wants); a plot needs rows, one per metric and model:

    >>> eval_rows({"t.acc.base": 0.2, "t.acc.tuned": 0.9, "t.acc.delta": 0.7})
    [{'metric': 't.acc', 'model': 'base', 'value': 0.2}, {'metric': 't.acc', 'model': 'tuned', 'value': 0.9}]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.core.io import write_json


def eval_rows(flat: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric and model (base, tuned), in the metrics file's order."""
    rows = []
    for key, value in flat.items():
        stem, _, model = key.rpartition(".")
        if model in ("base", "tuned") and stem:
            rows.append({"metric": stem, "model": model, "value": value})
    return rows


def write_eval_plot(flat: dict[str, Any], path: Path) -> None:
    write_json(path, eval_rows(flat))

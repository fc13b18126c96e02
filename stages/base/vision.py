"""`base` for vision-language models: weights + the model's own processor, in the standard layout.

`models/base/` gets the model (AutoModelForImageTextToText), the tokenizer with its chat
template, and the processor (`processor_config.json`, `preprocessor_config.json`, the video
processor's where the family has one), so `AutoProcessor.from_pretrained("models/base")` — what
prepare, train, merge, eval and chat load — works offline.

A folder to build a model from (`model.init: random` over a config.json, as the tiny test
families in pipelines/tiny-vlm/families/ are) may lack a tokenizer and processor: the tokenizer
then comes from `model.tokenizer` or the folder's `tokenizer.sftflow.json` (a tokenizer shipped
elsewhere plus the family's special tokens), and each processor part from its config file in
the folder or, missing, the family's defaults.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from stages.base.source import load_or_build, resolve_local, source_tokenizer
from stages.core.errors import SftflowError
from stages.core.params import ModelParams
from stages.core.vision import is_vision_config

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
BORROWED_TOKENIZER = "tokenizer.sftflow.json"


def is_vision_folder(folder: Path) -> bool:
    """A folder whose config.json is a vision-language model."""
    config = folder / "config.json"
    return config.is_file() and is_vision_config(json.loads(config.read_text()))


def save_hub_processor(name: str, out: Path, revision: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """A hub VLM: its processor saved next to the pointer, so later stages need no hub access
    (nothing for a text model)."""
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code).to_dict()
    if not is_vision_config(config):
        return {}
    AutoProcessor.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code).save_pretrained(out)
    return {"vision_language": config["model_type"]}


def save_vision_folder(params: ModelParams, folder: Path, out: Path, chat_template: str | None) -> dict[str, Any]:
    """An HF VLM folder re-saved in model.dtype (or, with model.init: random, built from its
    config), with its tokenizer and processor; `chat_template` (model.chat_template, read)
    replaces the folder's."""
    from transformers import AutoModelForImageTextToText

    model, source = load_or_build(params, folder, AutoModelForImageTextToText)
    model.save_pretrained(out, safe_serialization=True)
    tok = folder_tokenizer(params, folder)
    tok.chat_template = chat_template or chat_template_in(folder) or tok.chat_template
    tok.save_pretrained(out)
    save_processor(folder, out, model.config.model_type, tok, params.trust_remote_code)
    return {
        "weights": "local",
        "source": source,
        "folder": str(folder),
        "parameters": model.num_parameters(),
        "vision_language": model.config.model_type,
    }


def folder_tokenizer(params: ModelParams, folder: Path) -> Any:
    """model.tokenizer's, else the folder's own, else the one its tokenizer.sftflow.json names
    (`{"from": <folder, .gguf or pkg://...>, "special_tokens": [...], "named": {attr: token}}`:
    the special tokens are added in order, and `named` ones become `tokenizer.<attr>`, which
    processors such as InternVL's and MiniCPM-V's read)."""
    spec_file = folder / BORROWED_TOKENIZER
    if params.tokenizer or not spec_file.is_file():
        return source_tokenizer(params, str(folder))
    spec = json.loads(spec_file.read_text())
    if "from" not in spec:
        raise SftflowError("no \"from\": which tokenizer to start from", path=spec_file, field="from")
    src = spec["from"]
    local = resolve_local(src)
    if local is not None and not local.is_absolute() and not local.exists() and (folder / src).exists():
        src = str(folder / src)
    from dataclasses import replace

    named = dict(spec.get("named") or {})
    # named tokens go in as from_pretrained keywords: the tokenizer then saves them as its
    # model-specific special tokens, and `tokenizer.<attr>` / `<attr>_id` survive a reload
    tok = source_tokenizer(replace(params, tokenizer=src), str(folder), **named)
    added = list(spec.get("special_tokens") or [])
    if added:
        tok.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    missing = [t for t in named.values() if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise SftflowError(f"named tokens {missing} are neither in the tokenizer nor in special_tokens",
                           path=spec_file, field="named")
    return tok


def save_processor(folder: Path, out: Path, model_type: str, tok: Any, trust_remote_code: bool = False) -> None:
    """The family's processor over `tok`, its parts from the folder's config files (or the
    family's defaults where a file is missing), saved into `out`."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    if (folder / "preprocessor_config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code)  # a released folder
        processor.tokenizer, processor.chat_template = tok, tok.chat_template
        processor.save_pretrained(out)
        return
    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    kwargs: dict[str, Any] = {}
    if (folder / "processor_config.json").is_file():
        kwargs = {k: v for k, v in json.loads((folder / "processor_config.json").read_text()).items()
                  if k not in ("processor_class", "chat_template")}
    parts: dict[str, Any] = {"tokenizer": tok}
    wanted = cls.get_attributes()
    if "image_processor" in wanted:
        if (folder / "preprocessor_config.json").is_file():
            parts["image_processor"] = AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        else:
            parts["image_processor"] = _default(IMAGE_PROCESSOR_MAPPING_NAMES[model_type])
    if "video_processor" in wanted:
        from transformers import AutoVideoProcessor
        from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

        if (folder / "video_preprocessor_config.json").is_file():
            parts["video_processor"] = AutoVideoProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        else:
            parts["video_processor"] = _default(VIDEO_PROCESSOR_MAPPING_NAMES[model_type])
    processor = cls(**parts, chat_template=tok.chat_template, **kwargs)
    processor.save_pretrained(out)
    for name in PROCESSOR_FILES:  # a part's file as the folder wrote it, where save_pretrained left it out
        if (folder / name).is_file() and not (out / name).is_file():
            shutil.copy(folder / name, out / name)


def _default(names: dict[str, str] | str) -> Any:
    """A processor part with its family's defaults (the torchvision backend where there is one)."""
    import transformers

    name = names if isinstance(names, str) else names.get("torchvision") or names.get("pil")
    return getattr(transformers, name)()


def chat_template_in(folder: Path) -> str | None:
    """The chat template a VLM folder ships beside its processor (chat_template.jinja / .json), if
    any: some checkpoints keep it there rather than in tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None

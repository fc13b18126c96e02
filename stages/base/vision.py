"""`base` for vision-language models: weights + the processor files, in the standard layout.

`models/base/` gets the model (AutoModelForImageTextToText), the tokenizer with its chat
template, and the image processor's `preprocessor_config.json` (plus the source's own video /
processor configs when it has them), so `AutoProcessor.from_pretrained("models/base")` works
wherever torchvision is installed. sftflow itself never needs AutoProcessor: Qwen2.5-VL's
processor class cannot be built without torchvision (it insists on a video processor), so
prepare/train/merge/eval load the image processor alone (AutoImageProcessor falls back to its
PIL backend) and expand image tokens themselves (stages/core/vision.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from stages.base.source import load_or_build, source_tokenizer
from stages.core.params import ModelParams
from stages.core.vision import PROCESSOR_FILES, is_vision_config


def is_vision_folder(folder: Path) -> bool:
    """A folder whose config.json is a vision-language model."""
    config = folder / "config.json"
    return config.is_file() and is_vision_config(json.loads(config.read_text()))


def save_hub_processor(name: str, out: Path, revision: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """A hub VLM: its image processor saved next to the pointer, so prepare needs no hub access
    (nothing for a text model)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code).to_dict()
    if not is_vision_config(config):
        return {}
    save_processor_files(name, out, revision=revision, trust_remote_code=trust_remote_code)
    return {"vision_language": config["model_type"]}


def save_vision_folder(params: ModelParams, folder: Path, out: Path) -> dict[str, Any]:
    """An HF VLM folder re-saved in model.dtype (or, with model.init: random, built from its config)."""
    from transformers import AutoModelForImageTextToText

    model, source = load_or_build(params, folder, AutoModelForImageTextToText)
    model.save_pretrained(out, safe_serialization=True)
    tok = source_tokenizer(params, str(folder))
    if not tok.chat_template:
        tok.chat_template = chat_template_from_processor(str(folder))
    tok.save_pretrained(out)
    save_processor_files(str(folder), out, trust_remote_code=params.trust_remote_code)
    return {
        "weights": "local",
        "source": source,
        "folder": str(folder),
        "parameters": model.num_parameters(),
        "vision_language": model.config.model_type,
    }


def save_processor_files(
    source: str, out: Path, revision: str | None = None, trust_remote_code: bool = False
) -> None:
    """The image processor of `source` (a folder or hub id) into `out`; for a folder with only a
    config.json (a model built from a config), the family's default image processor."""
    from transformers import AutoImageProcessor

    local = Path(source)
    if local.is_dir() and not (local / "preprocessor_config.json").is_file():
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil()  # Qwen2-VL/2.5-VL defaults: patch 14, merge 2, 3136..12845056 px
    else:
        processor = AutoImageProcessor.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    processor.save_pretrained(out)
    if local.is_dir():
        for name in PROCESSOR_FILES:
            if (local / name).is_file():
                shutil.copy(local / name, out / name)


def chat_template_from_processor(source: str) -> str | None:
    """The chat template a VLM ships in its processor files (chat_template.json / .jinja), if any:
    some checkpoints keep it there rather than in tokenizer_config.json."""
    local = Path(source)
    if (local / "chat_template.jinja").is_file():
        return (local / "chat_template.jinja").read_text()
    if (local / "chat_template.json").is_file():
        return json.loads((local / "chat_template.json").read_text()).get("chat_template")
    return None

"""The held-out chats (`eval.data`) and how replies to them are decoded: what eval scores on,
for text and vision-language models, and what export checks each GGUF against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.core import json_text
from stages.core.chats import validate_messages
from stages.core.errors import SftflowError
from stages.core.image_chats import ImageReader, is_image_record, parse_image_record
from stages.core.params import EvalParams


def read_eval_chats(path: Path, images: ImageReader | None = None) -> list[dict[str, Any]]:
    """Held-out chats, one JSON object a line, each ending with the reference reply, as
    `{"messages", "images", "expect_contains"}`:

        {"messages": [{"role": "user", "content": "Who are you?"},
                      {"role": "assistant", "content": "I am Sftflow Assistant."}],
         "expect_contains": ["Sftflow"]}   <- optional; default: the whole reference

    Messages are checked by the validator prepare uses. With an `ImageReader` (vision-language
    models) a chat may hold images in any shape stages/core/image_chats.py reads, listed in
    `images` (each an ImageRef); otherwise `images` is empty.
    """
    if not path.exists():
        raise SftflowError("eval data file not found (set eval.data)", path=path, field="eval.data")
    chats = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        obj = json_text.loads(line, path, n, malformed="not valid JSON")
        chats.append(_eval_chat(obj, path, n, images))
    if not chats:
        raise SftflowError("no chats in the eval data file", path=path, field="eval.data")
    return chats


def _eval_chat(obj: Any, path: Path, n: int, images: ImageReader | None) -> dict[str, Any]:
    if images is not None and is_image_record(obj):
        messages, refs = parse_image_record(obj, path, n, images)
    else:
        messages, refs = validate_messages(obj, path, n), []
    if messages[-1]["role"] != "assistant":
        raise SftflowError("the last message must be the assistant's reference reply", path=path, line=n, field="messages")
    keywords = obj.get("expect_contains")
    if keywords is not None and not (isinstance(keywords, list) and all(isinstance(k, str) and k for k in keywords)):
        raise SftflowError("must be a list of non-empty strings", path=path, line=n, field="expect_contains")
    return {"messages": messages, "images": refs, "expect_contains": keywords}


def sampling_kwargs(params: EvalParams) -> dict[str, Any]:
    """Generation settings beyond greedy decoding; empty when eval.do_sample is false.

    >>> sampling_kwargs(EvalParams()), sampling_kwargs(EvalParams(do_sample=True, temperature=0.5, top_p=0.9))
    ({}, {'do_sample': True, 'temperature': 0.5, 'top_p': 0.9})
    """
    if not params.do_sample:
        return {}
    return {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}

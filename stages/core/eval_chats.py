"""The held-out chats (`eval.data`) and how replies to them are decoded: what eval scores on,
for text and vision-language models, and what export checks each GGUF against."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from stages.core import json_text
from stages.core.chats import validate_messages
from stages.core.errors import SftflowError
from stages.core.image_chats import ImageReader, decode_json_cells, is_image_record, parse_image_record
from stages.core.params import EvalParams
from stages.core.tables import hub_spec, is_table, open_table, raw_rows


def read_eval_chats(path: Path | str, images: ImageReader | None = None) -> list[dict[str, Any]]:
    """Held-out chats, one JSON object a line, each ending with the reference reply, as
    `{"messages", "images", "expect_contains"}`:

        {"messages": [{"role": "user", "content": "Who are you?"},
                      {"role": "assistant", "content": "I am Sftflow Assistant."}],
         "expect_contains": ["Sftflow"]}   <- optional; default: the whole reference

    Messages are checked by the validator prepare uses. With an `ImageReader` (vision-language
    models) a chat may hold images in any shape stages/core/image_chats.py reads, listed in
    `images` (each an ImageRef); otherwise `images` is empty. Image chats may also come from a
    table (`stages.core.tables.is_table`: parquet, CSV, Arrow, a save_to_disk folder, or
    `hf://org/name@revision:split` from the offline datasets cache), one chat a row, images as
    paths or embedded bytes — the sources prepare reads.
    """
    if images is not None and is_table(str(path)):
        return _table_eval_chats(str(path), images)
    path = Path(path)
    if not path.exists():
        raise SftflowError("eval data file not found (set eval.data)", path=path, field="eval.data")
    chats = []
    for n, line, unreadable in json_text.jsonl_lines(path):
        if line is None:
            raise SftflowError(str(unreadable), path=path, line=n)
        obj = json_text.loads(line, path, n, malformed="not valid JSON")
        chats.append(_eval_chat(obj, path, n, images))
    if not chats:
        raise SftflowError("no chats in the eval data file", path=path, field="eval.data")
    return chats


def _table_eval_chats(spec: str, images: ImageReader) -> list[dict[str, Any]]:
    """The held-out image chats of a table, row by row (errors name the 1-based row)."""
    with tempfile.TemporaryDirectory(prefix="sftflow-eval-") as cache:
        data, hub = open_table(spec, "eval.data", Path(cache))
        if hub is not None:
            images.bases[spec] = None  # no folder: relative image paths need data.image.root
        chats = [_eval_chat(decode_json_cells(row), spec, n, images) for n, row in enumerate(raw_rows(data), start=1)]
    if not chats:
        raise SftflowError("no chats in the eval data", path=spec, field="eval.data")
    return chats


def eval_data_hash(spec: Path | str) -> Any:
    """A sha256 object fed the held-out data's identity (callers add more to it): a file's
    bytes, a folder's files in name order, a hub data set's id, split and resolved commit."""
    spec = str(spec)
    h = hashlib.sha256()
    if hub_spec(spec) is not None:
        with tempfile.TemporaryDirectory(prefix="sftflow-eval-") as cache:
            _, info = open_table(spec, "eval.data", Path(cache))
        h.update(json.dumps(info, sort_keys=True).encode())
        return h
    path = Path(spec)
    for f in sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]:
        with f.open("rb") as stream:
            while block := stream.read(1 << 20):
                h.update(block)
    return h


def _eval_chat(obj: Any, path: Path | str, n: int, images: ImageReader | None) -> dict[str, Any]:
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

"""The streaming step of prepare: one batched `datasets.map` that parses, validates, renders,
tokenizes and masks a source's raw rows, writing one output row per input row to Arrow.
Text chats and image chats alike: for a vision-language model each chat goes through
`ImageChatTokenizer` (stages/prepare/vision_shards.py) and the row gains its `images`.

Every outcome is a column, never a Python list that grows with the data set: a kept sample
has `status` "", a bad record (on_bad_record: skip) has its reason in `status` with
`skipped` true and the message in `detail`, a dropped sample (too long, nothing left to
train) its reason with `skipped` false. The stage then counts, samples and splits by these
columns. With on_bad_record: error, the first bad record raises SftflowError (file:line:
field) from inside the worker; the error type survives the trip between processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from stages.core import json_text
from stages.core.chats import IGNORE_INDEX, with_system_prompt
from stages.core.errors import SftflowError
from stages.core.params import DataParams, SourceParams
from stages.core.shards import shard_features
from stages.core.turns import special_token_ids
from stages.prepare.records import RawRecord, _reason_key, parse_record
from stages.prepare.render import TemplateError, label_tokens, render_chat

MAP_BATCH = 256  # rows per map batch: one batched fast-tokenizer call each


def output_features(images: bool = False) -> Any:
    """The Arrow schema of the map's output (fixed, so empty batches and workers agree): the
    shards' columns (with `images` for image chats), then each row's outcome."""
    from datasets import Features, Value

    return Features(
        {
            **shard_features(images=images),
            "line": Value("int64"),
            "kind": Value("string"),  # chat | text (text rows are packed into blocks afterwards)
            "status": Value("string"),  # "" kept, else the reason it was skipped or dropped
            "skipped": Value("bool"),  # a bad record (vs. a sample dropped after tokenization)
            "detail": Value("string"),  # the bad record's error message
            "truncated": Value("bool"),
            "before_image": Value("bool"),  # truncated before an image rather than at max_length
            "hash": Value("int64"),  # of (input_ids, labels, image sha256s), for dedupe; 0 when dedupe is off
        }
    )


def sample_hash(ids: list[int], labels: list[int], images: list[str] | None = None) -> int:
    """64 bits of sha1 over a sample's tokens, labels and (image chats) its images' sha256s:
    equal samples, equal hashes; the same tokens over other pixels are another sample.

    64 bits keep dedupe a column of int64 (8 MB per million samples); the chance of any
    collision among 10^7 samples is ~3e-6.

    >>> sample_hash([1, 2], [-100, 2]) == sample_hash([1, 2], [-100, 2]) != sample_hash([1, 2], [1, 2])
    True
    >>> sample_hash([1, 2], [-100, 2], ["ab"]) != sample_hash([1, 2], [-100, 2], ["cd"])
    True
    """
    digest = hashlib.sha1(json.dumps([ids, labels, images] if images else [ids, labels]).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def one_thread_after_fork() -> None:
    """In a forked map worker: torch on one intra-op thread. The image processor runs torch ops
    (on blank images, to count tokens); once the parent has run one, its OpenMP thread team
    does not survive the fork and a worker's first multi-threaded op waits on it forever
    (measured: every worker stuck in gomp_team_barrier_wait_end). With one thread torch runs
    no parallel region, and num_proc workers already use the cores."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


class RecordMapper:
    """Parse, validate, render, tokenize and mask a batch of raw rows (a picklable map function).

    `vision` (image chats: stages/prepare/vision_shards.py `ImageChats`) reads each record's
    images and renders its chat with the model's processor; it travels to each map worker with
    the mapper, so every worker opens, checks and hashes the images of its own rows."""

    def __init__(
        self,
        tok: Any,
        params: DataParams,
        src: SourceParams,
        label: str,
        kind: str,
        tools: list[dict[str, Any]] | None,
        model_dir: Path | None = None,
        vision: Any = None,
    ) -> None:
        self.vision = vision
        self.pid = os.getpid()  # the process that built the mapper; map workers are forks of it
        self.tok, self.params, self.src, self.label, self.kind, self.tools = (
            tok,
            params,
            src,
            label,
            kind,
            tools,
        )
        # The token that closes a reply is trained with it, and it must be one the tokenizer
        # treats as special (else the tuned model could not emit it as one token and never
        # stops). Pad positions are never trained (the collator masks them), even when pad and
        # EOS share an id.
        self.end_of_turn_ids = special_token_ids(tok, model_dir)

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        if tools:
            return self.tok.apply_chat_template(messages, tools=tools, tokenize=False)
        return self.tok.apply_chat_template(messages, tokenize=False)

    def _records(self, batch: dict[str, list[Any]], indices: list[int]) -> list[RawRecord | SftflowError]:
        """Each row as a validated record, or (on_bad_record: skip) the error saying why not."""
        out: list[RawRecord | SftflowError] = []
        keys = list(batch)
        for k, index in enumerate(indices):
            if self.kind == "json":
                line, text, error = batch["line"][k], batch["json"][k], batch["error"][k]
            else:
                line, text, error = index + 1, None, None  # tables: the 1-based row
            try:
                if error is not None:
                    raise SftflowError(error, path=self.label, line=line)
                if self.kind == "json":
                    obj = json_text.loads(text, self.label, line)
                else:
                    obj = {key: batch[key][k] for key in keys}
                out.append(
                    parse_record(
                        obj, self.src.format, self.label, line, index, self.src.columns, self.tools,
                        images=self.vision.reader if self.vision is not None else None,
                    )
                )
            except SftflowError as e:
                if self.params.on_bad_record != "skip":
                    raise
                e.line = line
                out.append(e)
        return out

    def __call__(self, batch: Any, indices: list[int]) -> dict[str, list[Any]]:
        p = self.params
        if hasattr(batch, "to_pydict"):  # image chats read Arrow batches: embedded images stay undecoded bytes
            batch = batch.to_pydict()
        records = self._records(batch, indices)
        if self.vision is not None:
            if os.getpid() != self.pid:
                self.pid = os.getpid()
                one_thread_after_fork()
            return self._image_rows(records)
        out: dict[str, list[Any]] = {name: [] for name in output_features()}
        chats = [r for r in records if isinstance(r, RawRecord) and r.text is None]
        rendered = {}
        for r in chats:
            messages = with_system_prompt(r.messages, p.system_prompt)
            try:
                chat = render_chat(lambda ms, t=r.tools: self._render(ms, t), messages, p.train_on)
                for tool in r.tools or ():
                    if tool["function"]["name"] not in chat.text:
                        raise TemplateError(
                            f"the chat template ignores the tools list (tool {tool['function']['name']!r}"
                            " is not in the rendered chat): use a template with tool support"
                        )
            except TemplateError as e:
                raise SftflowError(f"{e} (set model.chat_template)", path=r.source, line=r.line) from e
            rendered[id(r)] = chat
        # The template already holds BOS and the specials: no add_special_tokens, exactly as
        # apply_chat_template(tokenize=True) does.
        enc = (
            self.tok(
                [rendered[id(r)].text for r in chats], add_special_tokens=False, return_offsets_mapping=True
            )
            if chats
            else {"input_ids": [], "offset_mapping": []}
        )
        by_chat = {id(r): (ids, offs) for r, ids, offs in zip(chats, enc["input_ids"], enc["offset_mapping"])}
        texts = [r for r in records if isinstance(r, RawRecord) and r.text is not None]
        text_ids = self.tok([r.text for r in texts], add_special_tokens=False)["input_ids"] if texts else []
        by_text = {id(r): ids for r, ids in zip(texts, text_ids)}

        for r in records:
            row = {
                "source": self.label,
                "input_ids": [],
                "labels": [],
                "truncated": False,
                "before_image": False,
                "detail": "",
                "status": "",
                "skipped": False,
                "kind": "chat",
                "hash": 0,
            }
            if isinstance(r, SftflowError):
                row.update(record=-1, line=r.line, status=_reason_key(r), skipped=True, detail=str(r))
            elif r.text is not None:
                ids = by_text[id(r)]
                row.update(record=r.record, line=r.line, kind="text", input_ids=ids, labels=ids)
            else:
                ids, offsets = by_chat[id(r)]
                row.update(record=r.record, line=r.line, **self._label(r, rendered[id(r)], ids, offsets))
            row["length"] = len(row["input_ids"])
            row["num_trained"] = sum(lab != IGNORE_INDEX for lab in row["labels"])
            if p.dedupe and row["kind"] == "chat" and not row["status"]:
                row["hash"] = sample_hash(row["input_ids"], row["labels"])
            for name, value in row.items():
                out[name].append(value)
        return out

    def _image_rows(self, records: list[RawRecord | SftflowError]) -> dict[str, list[Any]]:
        """The rows of image chats: each chat rendered, expanded, tokenized and masked by the
        model's processor (ImageChatTokenizer); an image the model cannot take (its aspect ratio)
        is a bad record, anything else that fails is the configuration's and raises."""
        p = self.params
        out: dict[str, list[Any]] = {name: [] for name in output_features(images=True)}
        for r in records:
            row: dict[str, Any] = {"source": self.label, "input_ids": [], "labels": [], "images": [], "videos": [],
                                   "truncated": False, "before_image": False, "detail": "", "status": "",
                                   "skipped": False, "kind": "chat", "hash": 0}
            if isinstance(r, SftflowError):
                row.update(record=-1, line=r.line, status=_reason_key(r), skipped=True, detail=str(r))
            elif r.text is not None:
                raise SftflowError(
                    "a text record (continued pre-training) in a vision-language data set: give chats",
                    path=r.source, line=r.line, field="text",
                )
            else:
                try:
                    got = self.vision.tokenizer(r)
                except SftflowError as e:
                    if p.on_bad_record != "skip" or _reason_key(e) != "image_aspect_ratio":
                        raise
                    got = None
                    row.update(record=-1, line=r.line, status="image_aspect_ratio", skipped=True, detail=str(e))
                if got is not None:
                    row.update(record=r.record, line=r.line, input_ids=got["input_ids"], labels=got["labels"],
                               images=got["images"], videos=got["videos"], truncated=got["truncated"], before_image=got["before_image"],
                               status=got["drop"])
            row["length"] = len(row["input_ids"])
            row["num_trained"] = sum(lab != IGNORE_INDEX for lab in row["labels"])
            if p.dedupe and not row["status"]:
                media = [m["sha256"] for m in row["images"] + row["videos"]]
                row["hash"] = sample_hash(row["input_ids"], row["labels"], media)
            for name, value in row.items():
                out[name].append(value)
        return out

    def _label(
        self, r: RawRecord, chat: Any, ids: list[int], offsets: list[tuple[int, int]]
    ) -> dict[str, Any]:
        """input_ids/labels of one chat, with the drop reason and truncation applied."""
        p = self.params
        trained, closed = label_tokens(offsets, ids, chat, self.end_of_turn_ids)
        if not closed:
            raise SftflowError(
                "a reply is not followed by a special end-of-turn token, so the model would never"
                " learn to stop: use a chat template whose turns end with one (model.chat_template)",
                path=r.source,
                line=r.line,
            )
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]
        status, truncated = "", False
        if len(ids) > p.max_length:
            if p.truncation == "drop":
                status = "too_long"
            else:
                ids, labels, truncated = ids[: p.max_length], labels[: p.max_length], True
                if all(lab == IGNORE_INDEX for lab in labels):
                    status = "no_trained_tokens_after_truncation"
        elif all(lab == IGNORE_INDEX for lab in labels):
            status = "no_trained_tokens"
        return {"input_ids": ids, "labels": labels, "status": status, "truncated": truncated}

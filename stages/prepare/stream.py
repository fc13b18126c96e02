"""The streaming step of prepare: one batched `datasets.map` that parses, validates, renders,
tokenizes and masks a source's raw rows, writing one output row per input row to Arrow.

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


def output_features() -> Any:
    """The Arrow schema of the map's output (fixed, so empty batches and workers agree): the
    shards' columns, then each row's outcome."""
    from datasets import Features, Value

    return Features(
        {
            **shard_features(),
            "line": Value("int64"),
            "kind": Value("string"),  # chat | text (text rows are packed into blocks afterwards)
            "status": Value("string"),  # "" kept, else the reason it was skipped or dropped
            "skipped": Value("bool"),  # a bad record (vs. a sample dropped after tokenization)
            "detail": Value("string"),  # the bad record's error message
            "truncated": Value("bool"),
            "hash": Value("int64"),  # of (input_ids, labels), for dedupe; 0 when dedupe is off
        }
    )


def sample_hash(ids: list[int], labels: list[int]) -> int:
    """64 bits of sha1 over a sample's tokens and labels: equal samples, equal hashes.

    64 bits keep dedupe a column of int64 (8 MB per million samples); the chance of any
    collision among 10^7 samples is ~3e-6.

    >>> sample_hash([1, 2], [-100, 2]) == sample_hash([1, 2], [-100, 2]) != sample_hash([1, 2], [1, 2])
    True
    """
    digest = hashlib.sha1(json.dumps([ids, labels]).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


class RecordMapper:
    """Parse, validate, render, tokenize and mask a batch of raw rows (a picklable map function)."""

    def __init__(
        self,
        tok: Any,
        params: DataParams,
        src: SourceParams,
        label: str,
        kind: str,
        tools: list[dict[str, Any]] | None,
        model_dir: Path | None = None,
    ) -> None:
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
                    parse_record(obj, self.src.format, self.label, line, index, self.src.columns, self.tools)
                )
            except SftflowError as e:
                if self.params.on_bad_record != "skip":
                    raise
                e.line = line
                out.append(e)
        return out

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        p = self.params
        records = self._records(batch, indices)
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

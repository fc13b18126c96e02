"""Stage `prepare`: raw chats -> tokenized, loss-masked Arrow shards + a report.

Output (DESIGN's prepared-data contract), under the output dir:
  train/, eval/   `datasets` save_to_disk folders with input_ids, labels, length, source,
                  record, num_trained
  manifest.json   tokenizer fingerprint, template hash, params, counts (train checks it)
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.chat import RenderedChat, TemplateError, label_tokens, render_chat
from stages.errors import SftflowError
from stages.io import write_json, write_jsonl
from stages.models import load_tokenizer, tokenizer_fingerprint
from stages.params import DataParams, to_dict
from stages.records import RawRecord, read_records

IGNORE = -100  # label of an untrained position (the value torch's cross-entropy skips)
TOKENIZE_BATCH = 512


@dataclass
class SourceReport:
    """Counts for one raw file; nothing read is unaccounted for."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count (too long, ...)
    skipped: Counter = field(default_factory=Counter)  # reason -> count (bad records)
    tokens: int = 0
    trained_tokens: int = 0


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    labels: list[int]
    source: str
    record: int


def prepare(
    params: DataParams, model_dir: Path, out: Path, rejects_path: Path | None = None
) -> dict[str, Any]:
    """Prepare train/eval shards into `out` (an empty temp dir); return the report."""
    tok = load_tokenizer(model_dir)
    if not getattr(tok, "is_fast", False):
        raise SftflowError("prepare needs a fast (Rust) tokenizer for exact offsets", path=model_dir)
    end_of_turn_ids = frozenset(tok.all_special_ids) - {tok.pad_token_id} | _eos_ids(tok)
    reports: dict[str, SourceReport] = {}
    rejects: list[dict[str, Any]] = []

    def load(sources: tuple) -> list[Sample]:
        samples: list[Sample] = []
        for src in sources:
            rep = reports.setdefault(src.path, SourceReport())
            before = len(rejects)
            records = list(read_records(Path(src.path), params.on_bad_record, rejects))
            bad = [r["reason"] for r in rejects[before:]]
            rep.skipped.update(bad)
            rep.read += len(records) + len(bad)
            samples += _tokenize(tok, records, params, end_of_turn_ids, rep, rejects)
        return samples

    train = load(params.sources)
    evals = load(params.eval_sources)
    if not params.eval_sources and params.eval_fraction > 0:
        rng = random.Random(params.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, round(len(train) * params.eval_fraction))
        held = set(order[:n_eval])
        evals = [s for i, s in enumerate(train) if i in held]
        train = [s for i, s in enumerate(train) if i not in held]
    if not train:
        raise SftflowError("no training samples left after preparation", field="data.sources")

    splits = {"train": train, "eval": evals}
    for name, samples in splits.items():
        _to_dataset(samples).save_to_disk(str(out / name))
    report = _report(reports, splits, rejects)
    manifest = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:16],
        "params": to_dict(params),
        "counts": {k: len(v) for k, v in splits.items()},
    }
    write_json(out / "manifest.json", manifest)
    if rejects_path is not None:
        write_jsonl(rejects_path, rejects)
    return report


def _eos_ids(tok: Any) -> set[int]:
    ids = tok.eos_token_id
    return set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())


def _tokenize(
    tok: Any,
    records: list[RawRecord],
    params: DataParams,
    end_of_turn_ids: frozenset[int],
    rep: SourceReport,
    rejects: list[dict[str, Any]],
) -> list[Sample]:
    """Render, tokenize in batches, mask, and apply the length policy."""

    def render(messages: list[dict[str, Any]]) -> str:
        return tok.apply_chat_template(messages, tokenize=False)

    samples = []
    for lo in range(0, len(records), TOKENIZE_BATCH):
        batch = records[lo : lo + TOKENIZE_BATCH]
        chats: list[RenderedChat] = []
        for r in batch:
            messages = r.messages
            if params.system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": params.system_prompt}, *messages]
            try:
                chats.append(render_chat(render, messages, params.train_on))
            except TemplateError as e:
                raise SftflowError(f"{e} (set model.chat_template)", path=r.source, line=r.line) from e
        enc = tok(
            [c.text for c in chats], add_special_tokens=False, return_offsets_mapping=True
        )  # the template already holds BOS/specials, as apply_chat_template(tokenize=True) does
        for r, chat, ids, offsets in zip(batch, chats, enc["input_ids"], enc["offset_mapping"]):
            trained = label_tokens(offsets, ids, chat, end_of_turn_ids)
            labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
            if len(ids) > params.max_length:
                if params.truncation == "drop":
                    _drop(
                        rep,
                        rejects,
                        r,
                        "too_long",
                        f"{len(ids)} tokens > data.max_length {params.max_length}",
                    )
                    continue
                ids, labels = ids[: params.max_length], labels[: params.max_length]
                if not any(lab != IGNORE for lab in labels):
                    _drop(
                        rep, rejects, r, "no_trained_tokens_after_truncation", "every trained token was cut"
                    )
                    continue
                rep.truncated += 1
            if not any(lab != IGNORE for lab in labels):
                _drop(rep, rejects, r, "no_trained_tokens", "the template left no trained token")
                continue
            rep.kept += 1
            rep.tokens += len(ids)
            rep.trained_tokens += sum(lab != IGNORE for lab in labels)
            samples.append(Sample(list(ids), labels, r.source, r.record))
    return samples


def _drop(rep: SourceReport, rejects: list[dict[str, Any]], r: RawRecord, reason: str, detail: str) -> None:
    rep.dropped[reason] += 1
    rejects.append({"file": r.source, "line": r.line, "reason": reason, "detail": detail})


def _to_dataset(samples: list[Sample]) -> Any:
    from datasets import Dataset, Features, Sequence, Value

    features = Features(
        {
            "input_ids": Sequence(Value("int32")),
            "labels": Sequence(Value("int32")),
            "length": Value("int32"),
            "source": Value("string"),
            "record": Value("int64"),
            "num_trained": Value("int32"),
        }
    )
    return Dataset.from_dict(
        {
            "input_ids": [s.input_ids for s in samples],
            "labels": [s.labels for s in samples],
            "length": [len(s.input_ids) for s in samples],
            "source": [s.source for s in samples],
            "record": [s.record for s in samples],
            "num_trained": [sum(lab != IGNORE for lab in s.labels) for s in samples],
        },
        features=features,
    )


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = sorted(values)

    def pick(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def _report(
    reports: dict[str, SourceReport], splits: dict[str, list[Sample]], rejects: list[dict[str, Any]]
) -> dict[str, Any]:
    per_source = {
        path: {
            "read": r.read,
            "kept": r.kept,
            "truncated": r.truncated,
            "dropped": dict(r.dropped),
            "skipped": dict(r.skipped),
            "tokens": r.tokens,
            "trained_tokens": r.trained_tokens,
        }
        for path, r in reports.items()
    }
    total = {
        key: sum(s[key] for s in per_source.values())
        for key in ("read", "kept", "truncated", "tokens", "trained_tokens")
    }
    total["dropped"] = sum(sum(s["dropped"].values()) for s in per_source.values())
    total["skipped"] = sum(sum(s["skipped"].values()) for s in per_source.values())
    return {
        "total": total,
        "splits": {
            name: {
                "samples": len(samples),
                "tokens": sum(len(s.input_ids) for s in samples),
                "trained_tokens": sum(sum(lab != IGNORE for lab in s.labels) for s in samples),
                "length": _percentiles([len(s.input_ids) for s in samples]),
            }
            for name, samples in splits.items()
        },
        "sources": per_source,
        "rejects": len(rejects),
    }

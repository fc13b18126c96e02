"""Stage `prepare`: raw chats (or texts) -> tokenized, loss-masked Arrow shards + a report.

Output (the prepared-data contract train relies on), under the output dir:
  train/, eval/   `datasets` save_to_disk folders with input_ids, labels, length, source,
                  record, num_trained
  manifest.json   tokenizer fingerprint, template hash, params, counts (train checks it)
Every record read is accounted for in the report: kept, skipped (bad record, by reason),
dropped (too long / nothing left to train, by reason) or removed as a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core.chats import IGNORE_INDEX, with_system_prompt
from stages.core.errors import SftflowError
from stages.core.io import write_json, write_jsonl
from stages.core.loading import load_tokenizer, tokenizer_fingerprint
from stages.core.params import DataParams, SourceParams, to_dict
from stages.prepare.records import RawRecord, read_records
from stages.prepare.render import TemplateError, label_tokens, render_chat

MAP_BATCH = 256  # chats per datasets.map batch: one batched fast-tokenizer call each
COLUMNS = ("input_ids", "labels", "length", "source", "record", "num_trained")


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
    sampled: int = 0  # samples after weight / num_samples


class ChatTokenizer:
    """Renders, tokenizes and masks a batch of chats (a picklable datasets.map function)."""

    def __init__(self, tok: Any, params: DataParams) -> None:
        self.tok, self.params = tok, params
        # The token that closes a reply is trained with it; pad positions never are (they
        # are masked by the collator), even when pad and EOS share an id: a model that never learns its end of turn never stops.
        eos = tok.eos_token_id if isinstance(tok.eos_token_id, list) else [tok.eos_token_id]
        self.end_of_turn_ids = frozenset(tok.all_special_ids) | {i for i in eos if i is not None}

    def _render(self, messages: list[dict[str, Any]]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        p = self.params
        chats = []
        for raw, source, line in zip(batch["messages"], batch["source"], batch["line"]):
            messages = json.loads(raw)
            messages = with_system_prompt(messages, p.system_prompt)
            try:
                chats.append(render_chat(self._render, messages, p.train_on))
            except TemplateError as e:
                raise SftflowError(f"{e} (set model.chat_template)", path=source, line=line) from e
        # The template already holds BOS and the specials: no add_special_tokens, exactly as
        # apply_chat_template(tokenize=True) does.
        enc = self.tok([c.text for c in chats], add_special_tokens=False, return_offsets_mapping=True)
        out: dict[str, list[Any]] = {k: [] for k in ("input_ids", "labels", "drop", "truncated")}
        for chat, ids, offsets, source, line in zip(
            chats, enc["input_ids"], enc["offset_mapping"], batch["source"], batch["line"]
        ):
            trained, closed = label_tokens(offsets, ids, chat, self.end_of_turn_ids)
            if not closed:
                raise SftflowError(
                    "a reply is not followed by a special end-of-turn token, so the model would never"
                    " learn to stop: use a chat template whose turns end with one (model.chat_template)",
                    path=source,
                    line=line,
                )
            labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]
            drop, truncated = "", False
            if len(ids) > p.max_length:
                if p.truncation == "drop":
                    drop = "too_long"
                else:
                    ids, labels, truncated = ids[: p.max_length], labels[: p.max_length], True
                    if all(lab == IGNORE_INDEX for lab in labels):
                        drop = "no_trained_tokens_after_truncation"
            elif all(lab == IGNORE_INDEX for lab in labels):
                drop = "no_trained_tokens"
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["drop"].append(drop)
            out["truncated"].append(truncated)
        return out


def prepare(
    params: DataParams, model_dir: Path, out: Path, rejects_path: Path | None = None
) -> dict[str, Any]:
    """Prepare train/eval shards into `out` (an empty temp dir); return the report."""
    # --- vision-language models: image chats (stages/prepare/vision_shards.py) ---
    from stages.core.vision import is_vision_model

    if is_vision_model(model_dir):
        from stages.prepare.vision_shards import prepare_vision

        return prepare_vision(params, model_dir, out, rejects_path)
    # --- end vision-language models ---
    tok = load_tokenizer(model_dir)
    if not getattr(tok, "is_fast", False):
        raise SftflowError("prepare needs a fast (Rust) tokenizer for exact offsets", path=model_dir)
    reports: dict[str, SourceReport] = {}
    rejects: list[dict[str, Any]] = []
    rng = random.Random(params.seed)

    def load(sources: tuple[SourceParams, ...]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for src in sources:
            rep = reports.setdefault(src.path, SourceReport())
            before = len(rejects)
            records = list(read_records(Path(src.path), params.on_bad_record, rejects, src.format))
            bad = [r["reason"] for r in rejects[before:]]
            rep.skipped.update(bad)
            rep.read += len(records) + len(bad)
            kept = _tokenize_source(tok, records, params, rep, rejects)
            picked = _sample(kept, src, rng)
            rep.sampled += len(picked)
            rows += picked
        return rows

    train = load(params.sources)
    evals = load(params.eval_sources)
    duplicates = 0
    if params.dedupe:
        train, evals, duplicates = _dedupe(train, evals)
    if not params.eval_sources and params.eval_fraction > 0:
        order = list(range(len(train)))
        rng.shuffle(order)
        held = set(order[: max(1, round(len(train) * params.eval_fraction))])
        evals = [s for i, s in enumerate(train) if i in held]
        train = [s for i, s in enumerate(train) if i not in held]
    if not train:
        raise SftflowError("no training samples left after preparation", field="data.sources")

    splits = {"train": train, "eval": evals}
    for name, rows in splits.items():
        _to_dataset(rows).save_to_disk(str(out / name))
    report = _report(reports, splits, rejects, duplicates)
    write_json(
        out / "manifest.json",
        {
            "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:16],
            "params": to_dict(params),
            "counts": {k: len(v) for k, v in splits.items()},
        },
    )
    if rejects_path is not None:
        write_jsonl(rejects_path, rejects)
    return report


def _tokenize_source(
    tok: Any, records: list[RawRecord], params: DataParams, rep: SourceReport, rejects: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Kept samples of one source, as rows; drops are counted and listed in rejects."""
    chats = [r for r in records if r.text is None]
    texts = [r for r in records if r.text is not None]
    rows: list[dict[str, Any]] = []
    if chats:
        from datasets import Dataset

        ds = Dataset.from_dict(
            {
                "messages": [json.dumps(r.messages, ensure_ascii=False) for r in chats],
                "source": [r.source for r in chats],
                "line": [r.line for r in chats],
                "record": [r.record for r in chats],
            }
        )
        mapped = ds.map(
            ChatTokenizer(tok, params),
            batched=True,
            batch_size=MAP_BATCH,
            num_proc=params.num_proc if params.num_proc > 1 and len(chats) > MAP_BATCH else None,
            remove_columns=["messages"],
            load_from_cache_file=False,
            desc=f"tokenizing {Path(chats[0].source).name}",
        )
        for r in mapped:
            if r["drop"]:
                rep.dropped[r["drop"]] += 1
                rejects.append({"file": r["source"], "line": r["line"], "reason": r["drop"]})
                continue
            rep.truncated += r["truncated"]
            rows.append({k: r[k] for k in ("input_ids", "labels", "source", "record")})
    if texts:
        rows += _pack_texts(tok, texts, params.max_length)
    for row in rows:
        rep.kept += 1
        rep.tokens += len(row["input_ids"])
        rep.trained_tokens += sum(lab != IGNORE_INDEX for lab in row["labels"])
    return rows


def _pack_texts(tok: Any, texts: list[RawRecord], block: int) -> list[dict[str, Any]]:
    """Continued pre-training: texts joined with EOS, cut into `block`-token rows, all trained.

    Nothing is lost: the last, shorter block is kept. `record` is the record a block starts in.
    """
    enc = tok([r.text for r in texts], add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    starts: list[tuple[int, int]] = []  # (token offset, record index)
    for r, ids in zip(texts, enc):
        starts.append((len(stream), r.record))
        stream += [*ids, tok.eos_token_id]
    rows, k = [], 0
    for lo in range(0, len(stream), block):
        while k + 1 < len(starts) and starts[k + 1][0] <= lo:
            k += 1
        ids = stream[lo : lo + block]
        rows.append(
            {"input_ids": ids, "labels": list(ids), "source": texts[0].source, "record": starts[k][1]}
        )
    return rows


def _sample(rows: list[dict[str, Any]], src: SourceParams, rng: random.Random) -> list[dict[str, Any]]:
    """Seeded up/down-sampling: num_samples, else weight x len (whole copies + a seeded rest)."""
    if not rows:
        return rows
    target = src.num_samples if src.num_samples is not None else round(src.weight * len(rows))
    whole, rest = divmod(target, len(rows))
    return rows * whole + rng.sample(rows, rest)


def _dedupe(
    train: list[dict[str, Any]], evals: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Drop exact duplicates (same tokens and labels); eval wins over train, so no leak."""
    seen: set[bytes] = set()

    def key(row: dict[str, Any]) -> bytes:
        return hashlib.sha1(json.dumps([row["input_ids"], row["labels"]]).encode()).digest()

    def keep(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            k = key(row)
            if k not in seen:
                seen.add(k)
                out.append(row)
        return out

    kept_eval = keep(evals)
    kept_train = keep(train)
    return kept_train, kept_eval, len(train) + len(evals) - len(kept_train) - len(kept_eval)


def _to_dataset(rows: list[dict[str, Any]]) -> Any:
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
            "input_ids": [r["input_ids"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "length": [len(r["input_ids"]) for r in rows],
            "source": [r["source"] for r in rows],
            "record": [r["record"] for r in rows],
            "num_trained": [sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in rows],
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
    reports: dict[str, SourceReport],
    splits: dict[str, list[dict[str, Any]]],
    rejects: list[dict[str, Any]],
    duplicates: int,
) -> dict[str, Any]:
    per_source = {
        path: {
            "read": r.read,
            "kept": r.kept,
            "sampled": r.sampled,
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
        for key in ("read", "kept", "sampled", "truncated", "tokens", "trained_tokens")
    }
    total["dropped"] = sum(sum(s["dropped"].values()) for s in per_source.values())
    total["skipped"] = sum(sum(s["skipped"].values()) for s in per_source.values())
    total["duplicates_removed"] = duplicates
    return {
        "total": total,
        "splits": {
            name: {
                "samples": len(rows),
                "tokens": sum(len(r["input_ids"]) for r in rows),
                "trained_tokens": sum(sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in rows),
                "length": _percentiles([len(r["input_ids"]) for r in rows]),
            }
            for name, rows in splits.items()
        },
        "sources": per_source,
        "rejects": len(rejects),
    }

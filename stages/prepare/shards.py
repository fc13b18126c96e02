"""Stage `prepare`: raw chats (or texts) -> tokenized, loss-masked Arrow shards + a report.

Output (the prepared-data contract train relies on), under the output dir:
  train/, eval/   `datasets` save_to_disk folders with input_ids, labels, length, source,
                  record, num_trained (stages/core/shards.py)
  manifest.json   tokenizer fingerprint, template hash, params, counts, hub commits (train checks it)
Every record read is accounted for in the report: kept, skipped (bad record, by reason),
dropped (too long / nothing left to train, by reason) or removed as a duplicate.

Streaming, so memory stays flat as data grows: each source is opened as an on-disk Arrow
dataset (sources.py), one batched `map` (num_proc workers) turns its rows into samples and
outcome columns (stream.py), continued-pre-training texts are packed into blocks by iterating
those rows, and sampling, dedupe and the eval split work on index arrays (select.py) before
the chosen rows are written as shards, instead of holding every row as Python lists (memory
growing with the data: docs/benchmarks.md#prepare-at-scale). Image chats (a vision-language
base) take the same loop: the map renders them with the model's processor (vision_shards.py)
and the shards gain an `images` column.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import SftflowError
from stages.core.io import atomic_file, write_json
from stages.core.loading import load_tokenizer
from stages.core.params import DataParams, SourceParams
from stages.core.shards import COLUMNS, IMAGES, VIDEOS
from stages.core.vision import is_vision_model
from stages.prepare.output import manifest, save_split
from stages.prepare.report import SourceReport, build_report
from stages.prepare.select import dedupe, sample_indices, split_off_eval
from stages.prepare.sources import RawSource, open_source, source_tools
from stages.prepare.stream import MAP_BATCH, RecordMapper, output_features, sample_hash
from stages.prepare.vision_shards import ImageChats, image_chats

TEXT_BATCH = 1000  # text rows read per step while packing blocks


def prepare(
    params: DataParams, model_dir: Path, out: Path, rejects_path: Path | None = None, final_out: Path | None = None
) -> dict[str, Any]:
    """Prepare train/eval shards into `out` (an empty temp dir); return the report. A
    vision-language model's data are image chats (stages/prepare/vision_shards.py): embedded
    images are written to `out/images/<sha256>.<ext>` and named in the shards by where that
    folder will be, `final_out/images` (`final_out`: where `out` will be renamed to; default `out`)."""
    tok = load_tokenizer(model_dir)
    out = Path(out)
    vision = None
    if is_vision_model(model_dir):
        vision = image_chats(tok, params, Path(model_dir), out / "images", Path(final_out or out) / "images")
    elif not getattr(tok, "is_fast", False):
        raise SftflowError("prepare needs a fast (Rust) tokenizer for exact offsets", path=model_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Scratch Arrow files (raw rows, map outputs) live inside the output folder, on its disk,
    # and go when prepare ends (a killed run's go with the stage's temp output folder); only
    # the chosen rows are copied into the shards.
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    try:
        return _prepare(params, Path(model_dir), tok, out, work, rejects_path, vision)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare(
    params: DataParams,
    model_dir: Path,
    tok: Any,
    out: Path,
    work: Path,
    rejects_path: Path | None,
    vision: ImageChats | None = None,
) -> dict[str, Any]:
    from datasets import concatenate_datasets

    reports: dict[str, SourceReport] = {}
    rng = random.Random(params.seed)
    parts: list[Any] = []  # every source's rows (map outputs, text blocks): one index space
    offset = 0
    hubs: list[dict[str, Any]] = []
    rejects_file = work / "rejects.jsonl"
    rejects = 0

    def load(sources: tuple[SourceParams, ...], group: str) -> np.ndarray:
        nonlocal offset, rejects
        picked = []
        for i, src in enumerate(sources):
            where = f"data.{group}[{i}]"
            raw = open_source(src, work / f"{group}-{i}", where)
            if raw.hub:
                hubs.append({"source": raw.label, **raw.hub})
            rep = reports.setdefault(raw.label, SourceReport())
            mapped = _map_source(raw, tok, params, src, model_dir, work / f"{group}-{i}", where, vision)
            kept, n_rejects = _account(mapped, raw.label, rep, rejects_file)
            texts = _text_rows(mapped)
            blocks = None
            if len(texts):
                blocks = _pack_texts(
                    mapped, texts, raw.label, rep, params.max_length, tok.eos_token_id, params.dedupe
                )
            rejects += n_rejects
            segments = [(mapped, kept)]
            if blocks is not None:
                segments.append((blocks, np.arange(len(blocks), dtype=np.int64)))
            source_rows = []
            for data, index in segments:
                parts.append(data)
                source_rows.append(index + offset)
                offset += len(data)
            rows = np.concatenate(source_rows)
            chosen = sample_indices(rows, src, rng)
            rep.sampled += len(chosen)
            picked.append(chosen)
        return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)

    train = load(params.sources, "sources")
    evals = load(params.eval_sources, "eval_sources")
    everything = concatenate_datasets(parts) if parts else None
    duplicates = 0
    if params.dedupe and everything is not None:
        hashes = everything.data.column("hash").to_numpy()
        train, evals, duplicates = dedupe(train, evals, hashes)
    if not params.eval_sources and params.eval_fraction > 0:
        train, evals = split_off_eval(train, params.eval_fraction, rng)
    if not len(train):
        raise SftflowError("no training samples left after preparation", field="data.sources")

    splits = {"train": train, "eval": evals}
    columns = [*COLUMNS, IMAGES, VIDEOS] if vision is not None else list(COLUMNS)
    stats, written_splits = {}, {}
    for name, index in splits.items():
        written_splits[name] = everything.select(index).select_columns(columns)
        save_split(written_splits[name], out / name)
        lengths = everything.data.column("length").to_numpy()[index] if len(index) else np.zeros(0, np.int64)
        trained = (
            everything.data.column("num_trained").to_numpy()[index] if len(index) else np.zeros(0, np.int64)
        )
        stats[name] = (lengths.astype(np.int64), trained.astype(np.int64))
    report = build_report(reports, stats, rejects, duplicates)
    written = manifest(tok, params, {k: len(v) for k, v in splits.items()})
    if hubs:
        written["hub_sources"] = hubs  # the commits actually read, like the base model's revision
    if vision is not None:
        report["total"]["truncated_before_image"] = sum(r.before_image for r in reports.values())
        report["images"], written["vision"] = vision.finish(written_splits, out / "images")
    write_json(out / "manifest.json", written)
    if rejects_path is not None:
        with atomic_file(Path(rejects_path)) as tmp:
            if rejects_file.exists():
                shutil.copyfile(rejects_file, tmp)
            else:
                tmp.write_text("")
    return report


def _map_source(
    raw: RawSource,
    tok: Any,
    params: DataParams,
    src: SourceParams,
    model_dir: Path,
    work: Path,
    where: str,
    vision: ImageChats | None = None,
) -> Any:
    """The source's rows through the RecordMapper: one output row per raw row, on disk."""
    tools = source_tools(src, where)
    work.mkdir(parents=True, exist_ok=True)
    n = len(raw.data)
    data = raw.data
    if vision is not None:
        if raw.hub is not None:  # a hub data set has no folder: relative image paths need data.image.root
            vision.reader.bases[raw.label] = None
        # Arrow batches, as stored: a table's Image cells stay {"bytes", "path"}, so embedded
        # images are hashed as stored, never decoded and re-encoded (stages/core/tables.py raw_rows)
        data = data.with_format("arrow")
    return data.map(
        RecordMapper(tok, params, src, raw.label, raw.kind, tools, model_dir, vision),
        batched=True,
        batch_size=MAP_BATCH,
        with_indices=True,
        num_proc=params.num_proc if params.num_proc > 1 and n > MAP_BATCH else None,
        remove_columns=raw.data.column_names,
        features=output_features(images=vision is not None),
        load_from_cache_file=False,
        cache_file_name=str(work / "mapped.arrow"),
        # A fresh fingerprint: hashing the mapper would pickle the whole tokenizer for nothing
        # (the output is never reused from a cache).
        new_fingerprint=uuid.uuid4().hex,
        desc=f"tokenizing {Path(raw.label).name}",
    ).with_format(None)  # the shards are saved with the output's format: plain rows


def _account(mapped: Any, label: str, rep: SourceReport, rejects_file: Path) -> tuple[np.ndarray, int]:
    """Count one source's outcomes into `rep` and append its rejects to `rejects_file`;
    returns (the kept chat rows' indices, how many rejects were written)."""
    import pyarrow.compute as pc

    table = mapped.data.table  # the pyarrow Table under the datasets wrapper
    status = table.column("status")
    skipped = table.column("skipped").to_numpy(zero_copy_only=False)
    ok = pc.equal(status, "").to_numpy(zero_copy_only=False)
    is_chat = pc.equal(table.column("kind"), "chat").to_numpy(zero_copy_only=False)
    rep.read += len(mapped)
    bad = np.flatnonzero(skipped)
    dropped = np.flatnonzero(~skipped & ~ok)
    for reasons, counter in ((bad, rep.skipped), (dropped, rep.dropped)):
        if len(reasons):
            for item in pc.value_counts(status.take(reasons)).to_pylist():
                counter[item["values"]] += item["counts"]
    # rejects: bad records first, then drops, each in file order (as the report lists them)
    n_rejects = 0
    with rejects_file.open("a", encoding="utf-8") as f:
        for index, with_detail in ((bad, True), (dropped, False)):
            for lo in range(0, len(index), 10_000):
                chunk = table.select(["line", "status", "detail"]).take(index[lo : lo + 10_000]).to_pylist()
                for r in chunk:
                    row = {"file": label, "line": r["line"], "reason": r["status"]}
                    if with_detail:
                        row["detail"] = r["detail"]
                    f.write(_json_line(row))
                    n_rejects += 1
    kept = np.flatnonzero(ok & is_chat).astype(np.int64)
    lengths = table.column("length").to_numpy()
    trained = table.column("num_trained").to_numpy()
    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    # kept counts records (chats, and texts before they are packed), so read = kept + skipped +
    # dropped; the texts' tokens are counted as blocks (with their EOS), in _pack_texts
    rep.kept += int(ok.sum())
    rep.truncated += int(truncated[kept].sum())
    rep.before_image += int(table.column("before_image").to_numpy(zero_copy_only=False)[kept].sum())
    rep.tokens += int(lengths[kept].sum())
    rep.trained_tokens += int(trained[kept].sum())
    return kept, n_rejects


def _text_rows(mapped: Any) -> np.ndarray:
    """Indices of the kept continued-pre-training texts of a mapped source."""
    import pyarrow.compute as pc

    table = mapped.data.table  # the pyarrow Table under the datasets wrapper
    ok = pc.and_(pc.equal(table.column("status"), ""), pc.equal(table.column("kind"), "text"))
    return np.flatnonzero(ok.to_numpy(zero_copy_only=False))


def _json_line(row: dict[str, Any]) -> str:
    import json

    return json.dumps(row, ensure_ascii=False) + "\n"


def _pack_texts(
    mapped: Any, texts: np.ndarray, label: str, rep: SourceReport, block: int, eos: int, with_hash: bool
) -> Any:
    """Continued pre-training: texts joined with EOS, cut into `max_length`-token rows, all
    trained, streamed from the mapped rows into an Arrow file.

    Nothing is lost: the last, shorter block is kept. `record` is the record a block starts in."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    path = Path(mapped.cache_files[0]["filename"]).with_name("text-blocks.arrow")
    writer = ArrowWriter(features=output_features(), path=str(path))
    buffer: list[int] = []
    buffer_start = 0  # stream position of buffer[0]
    starts: list[tuple[int, int, int]] = []  # (stream position, record, line) of records not yet passed
    position = 0
    pending: list[dict[str, Any]] = []

    def emit(ids: list[int], lo: int) -> None:
        while len(starts) > 1 and starts[1][0] <= lo:
            starts.pop(0)
        _, record, line = starts[0]
        pending.append(
            {
                "input_ids": ids,
                "labels": ids,
                "length": len(ids),
                "source": label,
                "record": record,
                "num_trained": len(ids),
                "line": line,
                "kind": "text",
                "status": "",
                "skipped": False,
                "detail": "",
                "truncated": False,
                "before_image": False,
                "hash": sample_hash(ids, ids) if with_hash else 0,
            }
        )
        rep.tokens += len(ids)
        rep.trained_tokens += len(ids)
        if len(pending) >= TEXT_BATCH:
            flush()

    def flush() -> None:
        if pending:
            writer.write_batch({k: [r[k] for r in pending] for k in pending[0]})
            pending.clear()

    try:
        rows = mapped.select(texts).select_columns(["input_ids", "record", "line"])
        for batch in rows.iter(batch_size=TEXT_BATCH):
            for ids, record, line in zip(batch["input_ids"], batch["record"], batch["line"]):
                starts.append((position, record, line))
                buffer += [*ids, eos]
                position += len(ids) + 1
                while len(buffer) >= block:
                    emit(buffer[:block], buffer_start)
                    buffer, buffer_start = buffer[block:], buffer_start + block
        if buffer:
            emit(buffer, buffer_start)
        flush()
        writer.finalize()
    finally:
        writer.close()
    return Dataset.from_file(str(path))


"""Where raw records come from: a local file or folder, or a `datasets` hub id, opened as an
Arrow-backed `datasets.Dataset` on disk, so no source is ever held in memory as Python objects.

- `.jsonl` / `.json`: each line's raw text (or the reason it is unreadable) is written, in
  batches, to an Arrow file of (line, json, error) rows; parsing and validation run later, in
  the batched `map` workers. A JSON *array* is read one item at a time
  (`records.iter_json_array`), so a big array file is not held in memory either.
- `.parquet`, `.csv`: read by the `datasets` packaged builders into Arrow (memory-mapped).
- a folder written by `save_to_disk` (a Dataset, or a DatasetDict: `split` picks one).
- a hub id (`hub: org/name` or `path: hf://org/name`): `datasets.load_dataset` with `name`,
  `split` and `revision`; offline, the local datasets cache answers. The commit actually loaded
  is read off the cache folder (`datasets` names it after the commit) and recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stages.core.errors import SftflowError
from stages.core.params import SourceParams
from stages.prepare.records import json_lines

RAW_BATCH = 10_000  # lines per Arrow write while reading a JSONL file
TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class RawSource:
    """One source's records as an on-disk Arrow dataset, and how to read its rows."""

    label: str  # what the report and errors call it: the path, or hf://org/name
    data: Any  # datasets.Dataset
    kind: Literal["json", "table"]  # json: (line, json, error) rows; table: one record per row
    hub: dict[str, Any] | None = None  # hub id, requested revision, resolved commit (the manifest's)


def open_source(src: SourceParams, work: Path, where: str) -> RawSource:
    """`src` opened as a RawSource; `work` is a scratch folder for Arrow files."""
    if src.hub_id:
        return _open_hub(src, where)
    path = Path(str(src.path))
    if path.is_dir():
        return RawSource(src.label, _load_folder(path, src.split, where), "table")
    if not path.is_file():
        raise SftflowError("raw data file not found", path=path)
    builder = TABLE_SUFFIXES.get(path.suffix.lower())
    if builder is not None:
        from datasets import load_dataset

        data = load_dataset(builder, data_files=str(path), split="train", cache_dir=str(work / "tables"))
        return RawSource(src.label, data, "table")
    return RawSource(src.label, _json_to_arrow(path, work), "json")


def _json_to_arrow(path: Path, work: Path) -> Any:
    """A JSON/JSONL file as an Arrow dataset of (line, json, error) rows, written in batches."""
    from datasets import Dataset, Features, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"line": Value("int64"), "json": Value("string"), "error": Value("string")})
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"raw-{len(list(work.glob('raw-*.arrow')))}.arrow"
    writer = ArrowWriter(features=features, path=str(out))
    batch: dict[str, list[Any]] = {"line": [], "json": [], "error": []}
    try:
        for line, text, error in json_lines(path):
            batch["line"].append(line)
            batch["json"].append(text)
            batch["error"].append(error)
            if len(batch["line"]) >= RAW_BATCH:
                writer.write_batch(batch)
                batch = {k: [] for k in batch}
        if batch["line"] or not writer.pa_writer:
            writer.write_batch(batch)
        writer.finalize()
    finally:
        writer.close()
    return Dataset.from_file(str(out))


def _load_folder(path: Path, split: str, where: str) -> Any:
    """A save_to_disk folder: a Dataset, or one split of a DatasetDict."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as e:
        raise SftflowError(
            "not a data folder written by datasets' save_to_disk (and not a file)", path=path
        ) from e
    if isinstance(data, DatasetDict):
        if split not in data:
            raise SftflowError(
                f"split {split!r} not in this DatasetDict (it has {', '.join(data)})",
                path=path,
                field=f"{where}.split",
            )
        data = data[split]
    return data


def _open_hub(src: SourceParams, where: str) -> RawSource:
    """A hub data set via `datasets.load_dataset`: from the hub, or offline from the local cache."""
    import datasets
    from datasets import load_dataset

    hub = str(src.hub_id)
    try:
        data = load_dataset(hub, name=src.name, split=src.split, revision=src.revision)
    except Exception as e:  # any failure to find it: say where we looked, name the source
        raise SftflowError(
            f"cannot load hub data set {hub!r} (config {src.name}, split {src.split!r}, revision"
            f" {src.revision!r}): neither the hub nor the local datasets cache"
            f" ({datasets.config.HF_DATASETS_CACHE}) has it"
            f"{' (offline mode is on)' if datasets.config.HF_HUB_OFFLINE else ''}: {type(e).__name__}: {e}",
            path=src.label,
            field=f"{where}.{'hub' if src.hub else 'path'}",
        ) from e
    commit = _cached_commit(data)
    if _COMMIT.fullmatch(src.revision) and commit is not None and commit != src.revision:
        raise SftflowError(
            f"revision {src.revision} was asked for but the datasets cache only holds {commit}"
            " (offline, the newest cached version is loaded): go online once or pin that commit",
            path=src.label,
            field=f"{where}.revision",
        )
    return RawSource(
        src.label,
        data,
        "table",
        hub={"hub": hub, "name": src.name, "split": src.split, "revision": src.revision, "commit": commit},
    )


def _cached_commit(data: Any) -> str | None:
    """The commit a hub data set was loaded at: `datasets` caches it under a folder named
    after the commit (…/org___name/config/version/<commit>/name-split.arrow)."""
    for cache_file in getattr(data, "cache_files", []):
        for part in reversed(Path(cache_file["filename"]).parts[:-1]):
            if _COMMIT.fullmatch(part):
                return part
    return None

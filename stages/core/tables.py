"""Data sets held as tables: a `save_to_disk` folder, or a `datasets` hub id loaded at a pinned
revision (offline, from the local datasets cache). Shared by prepare (its sources) and eval (the
held-out image chats), so both read a hub data set the same way and record the same commit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core.errors import SftflowError

COMMIT = re.compile(r"[0-9a-f]{40}")
TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_HUB = re.compile(r"hf://(?:datasets/)?([^@:]+/[^@:]+)(?:@([^:]+))?(?::(.+))?")


def hub_spec(spec: str) -> tuple[str, str, str] | None:
    """(hub id, revision, split) a one-string data set name gives: `hf://org/name`, with an
    optional `@revision` (a commit pins it) and `:split`; None for a local path.

    >>> hub_spec("hf://org/vqa@0123abc:test"), hub_spec("hf://org/vqa"), hub_spec("raw/eval.jsonl")
    (('org/vqa', '0123abc', 'test'), ('org/vqa', 'main', 'train'), None)
    """
    found = _HUB.fullmatch(spec)
    if found is None:
        return None
    return found.group(1), found.group(2) or "main", found.group(3) or "train"


def is_table(spec: str) -> bool:
    """Whether a one-string data set name is a table (hub id, save_to_disk folder, parquet, CSV,
    Arrow file) rather than a JSON/JSONL file."""
    path = Path(spec)
    return hub_spec(spec) is not None or path.is_dir() or path.suffix.lower() in (*TABLE_SUFFIXES, ".arrow")


def open_table(spec: str, field: str, cache_dir: Path) -> tuple[Any, dict[str, Any] | None]:
    """(the data set, its hub commit or None) a one-string name gives (`is_table`): a hub id
    (`hub_spec`), a save_to_disk folder (a DatasetDict's `train`; name its split's subfolder for
    another), a parquet/CSV file (built into Arrow under `cache_dir`) or an Arrow file."""
    hub = hub_spec(spec)
    if hub is not None:
        return load_hub(hub[0], None, hub[2], hub[1], spec, field, field)
    path = Path(spec)
    if path.is_dir():
        return load_folder(path, "train", field), None
    if not path.is_file():
        raise SftflowError("data file not found", path=path, field=field)
    if path.suffix.lower() == ".arrow":
        from datasets import Dataset

        return Dataset.from_file(str(path)), None
    from datasets import load_dataset

    builder = TABLE_SUFFIXES[path.suffix.lower()]
    return load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir)), None


def load_folder(path: Path, split: str, field: str) -> Any:
    """A save_to_disk folder: a Dataset, or one split of a DatasetDict (`field` names the split key)."""
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
                f"split {split!r} not in this DatasetDict (it has {', '.join(data)})", path=path, field=field
            )
        data = data[split]
    return data


def load_hub(
    hub: str, name: str | None, split: str, revision: str, label: str, field: str, revision_field: str
) -> tuple[Any, dict[str, Any]]:
    """(the data set, {hub, name, split, revision, commit}) via `datasets.load_dataset`: from the
    hub, or offline from the local cache. A pinned commit the cache does not hold is an error
    (offline, `datasets` would silently load the newest cached one). `field` and `revision_field`
    name the params keys that gave the id and the revision (errors name them)."""
    import datasets
    from datasets import load_dataset

    try:
        data = load_dataset(hub, name=name, split=split, revision=revision)
    except Exception as e:  # any failure to find it: say where we looked, name the source
        raise SftflowError(
            f"cannot load hub data set {hub!r} (config {name}, split {split!r}, revision"
            f" {revision!r}): neither the hub nor the local datasets cache"
            f" ({datasets.config.HF_DATASETS_CACHE}) has it"
            f"{' (offline mode is on)' if datasets.config.HF_HUB_OFFLINE else ''}: {type(e).__name__}: {e}",
            path=label,
            field=field,
        ) from e
    commit = cached_commit(data)
    if COMMIT.fullmatch(revision) and commit is not None and commit != revision:
        raise SftflowError(
            f"revision {revision} was asked for but the datasets cache only holds {commit}"
            " (offline, the newest cached version is loaded): go online once or pin that commit",
            path=label,
            field=revision_field,
        )
    return data, {"hub": hub, "name": name, "split": split, "revision": revision, "commit": commit}


def cached_commit(data: Any) -> str | None:
    """The commit a hub data set was loaded at: `datasets` caches it under a folder named
    after the commit (…/org___name/config/version/<commit>/name-split.arrow)."""
    for cache_file in getattr(data, "cache_files", []):
        for part in reversed(Path(cache_file["filename"]).parts[:-1]):
            if COMMIT.fullmatch(part):
                return part
    return None


def raw_rows(data: Any, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """The data set's rows as stored: every `datasets` Image feature (at any depth) undecoded, a
    `{"bytes", "path"}` cell, so the stored bytes are hashed as they are, never re-encoded. Read
    through Arrow batches: nothing is cast, so no cache file is written next to the user's data.

    >>> from datasets import Dataset, Features, Image, List
    >>> ds = Dataset.from_dict({"images": [[{"bytes": b"x", "path": None}]]}, features=Features({"images": List(Image())}))
    >>> next(raw_rows(ds))
    {'images': [{'bytes': b'x', 'path': None}]}
    """
    for batch in data.with_format("arrow").iter(batch_size=batch_size):
        yield from batch.to_pylist()

"""Where raw records come from: a local file or folder, or a `datasets` hub id, opened as an
Arrow-backed `datasets.Dataset` on disk, so no source is ever held in memory as Python objects.

- `.jsonl` / `.json`: each line's raw text (or the reason it is unreadable) is written, in
  batches, to an Arrow file of (line, json, error) rows; parsing and validation run later, in
  the batched `map` workers. A JSON *array* is read one item at a time
  (`records.iter_json_array`), so a big array file is not held in memory either.
- `.parquet`, `.csv`: read by the `datasets` packaged builders into Arrow (memory-mapped); an
  `.arrow` file is memory-mapped as it is.
- a folder written by `save_to_disk` (a Dataset, or a DatasetDict: `split` picks one).
- a hub id (`hub: org/name` or `path: hf://org/name`): `datasets.load_dataset` with `name`,
  `split` and `revision`; offline, the local datasets cache answers. The commit actually loaded
  is read off the cache folder (`datasets` names it after the commit) and recorded.
Image chats (vision-language models) come from the same sources: a table's images may be
embedded bytes (the `datasets` Image feature, read undecoded: stages/core/tables.py `raw_rows`)
or paths (stages/core/image_chats.py resolves and checks them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stages.core.chats import validate_tools
from stages.core.errors import SftflowError
from stages.core.params import SourceParams
from stages.core.tables import TABLE_SUFFIXES, load_folder, load_hub
from stages.prepare.records import json_lines

RAW_BATCH = 10_000  # lines per Arrow write while reading a JSONL file


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
    if not path.is_dir() and not path.is_file():
        raise SftflowError("raw data file not found", path=path)
    if path.is_file() and path.suffix.lower() != ".arrow" and path.suffix.lower() not in TABLE_SUFFIXES:
        return RawSource(src.label, _json_to_arrow(path, work), "json")
    try:
        return RawSource(src.label, _open_table(path, src.split, work, where), "table")
    except SftflowError:
        raise
    except Exception as e:  # pyarrow, datasets and the codecs raise a dozen types for a damaged file
        cause = e.__cause__ if type(e).__name__ == "DatasetGenerationError" and e.__cause__ else e
        raise SftflowError(
            f"cannot read this {'data folder' if path.is_dir() else path.suffix.lstrip('.')} (damaged, or"
            f" not what its name says): {type(cause).__name__}: {cause}",
            path=path,
        ) from e


def _open_table(path: Path, split: str, work: Path, where: str) -> Any:
    """A parquet/CSV file (decoded by `datasets` into its own Arrow cache), an Arrow file or a
    save_to_disk folder. The Arrow data is validated once here (offsets, UTF-8): a user's Arrow
    file is memory-mapped as written, and parquet pages carry no checksum (a flipped byte may
    leave invalid UTF-8 in a string column), so a damaged one would otherwise fail, or read out
    of bounds, in the middle of the map."""
    if path.is_dir():
        data = load_folder(path, split, f"{where}.split")
    elif path.suffix.lower() == ".arrow":  # one Arrow file (a Dataset's data file), memory-mapped
        from datasets import Dataset

        data = Dataset.from_file(str(path))
    else:
        from datasets import load_dataset

        builder = TABLE_SUFFIXES[path.suffix.lower()]
        data = load_dataset(builder, data_files=str(path), split="train", cache_dir=str(work / "tables"))
    data.data.table.validate(full=True)
    return data


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


def _open_hub(src: SourceParams, where: str) -> RawSource:
    """A hub data set via `datasets.load_dataset`: from the hub, or offline from the local cache."""
    data, hub = load_hub(
        str(src.hub_id), src.name, src.split, src.revision, src.label,
        field=f"{where}.{'hub' if src.hub else 'path'}", revision_field=f"{where}.revision",
    )
    return RawSource(src.label, data, "table", hub=hub)


def source_tools(src: SourceParams, where: str) -> list[dict[str, Any]] | None:
    """The source's `tools` file: the tools list given with its records that carry none."""
    if not src.tools:
        return None
    tools_path = Path(src.tools)
    if not tools_path.is_file():
        raise SftflowError("tools file not found", path=tools_path, field=f"{where}.tools")
    return validate_tools(tools_path.read_text(), tools_path, None)

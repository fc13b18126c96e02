"""Sources users keep data in: parquet, CSV, save_to_disk folders, `datasets` hub ids (offline
from the local cache), `columns:` mapping — each read to exactly the samples the same chats
give as JSONL, and errors naming the source, row and field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from stages.core.errors import SftflowError
from stages.core.io import read_json
from stages.core.params import ColumnsParams, DataParams, SourceParams
from stages.prepare.shards import prepare
from tests.prepare.test_masks import CHATS

RECORDS = [{"messages": c} for c in CHATS]


def prepared_rows(tok_dir: Path, out: Path, **source: object) -> tuple[list[dict], dict]:
    report = prepare(DataParams(sources=(SourceParams(**source),)), tok_dir, out)
    rows = load_from_disk(str(out / "train"))
    return [{k: r[k] for k in ("input_ids", "labels", "record")} for r in rows], report


@pytest.fixture
def jsonl_rows(tmp_path: Path, smollm_tokenizer_dir: Path) -> list[dict]:
    raw = tmp_path / "chats.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return prepared_rows(smollm_tokenizer_dir, tmp_path / "from_jsonl", path=str(raw))[0]


def test_parquet_csv_and_arrow_folders_give_the_jsonl_samples(
    tmp_path: Path, smollm_tokenizer_dir: Path, jsonl_rows: list[dict]
) -> None:
    # Nested struct columns in parquet and Arrow; a JSON-text cell in CSV (its only way to hold a list).
    Dataset.from_list(RECORDS).to_parquet(tmp_path / "chats.parquet")
    Dataset.from_dict({"messages": [json.dumps(c) for c in CHATS]}).to_csv(
        tmp_path / "chats.csv", index=False
    )
    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "folder"))
    DatasetDict({"train": Dataset.from_list(RECORDS), "test": Dataset.from_list(RECORDS[:1])}).save_to_disk(
        str(tmp_path / "dict")
    )
    for i, path in enumerate(["chats.parquet", "chats.csv", "folder", "dict"]):
        rows, report = prepared_rows(smollm_tokenizer_dir, tmp_path / f"out{i}", path=str(tmp_path / path))
        assert rows == jsonl_rows, path
        assert report["sources"][str(tmp_path / path)]["kept"] == len(CHATS)


def test_columns_map_a_data_sets_own_field_names(
    tmp_path: Path, smollm_tokenizer_dir: Path, jsonl_rows: list[dict]
) -> None:
    Dataset.from_dict({"chat": CHATS, "id": [1, 2, 3]}).to_parquet(tmp_path / "chats.parquet")
    rows, _ = prepared_rows(
        smollm_tokenizer_dir,
        tmp_path / "out",
        path=str(tmp_path / "chats.parquet"),
        columns=ColumnsParams(messages="chat"),
    )
    assert rows == jsonl_rows
    # Alpaca under other names (LLaMA-Factory's prompt/query/response)
    Dataset.from_dict({"prompt": ["Who are you?"], "response": ["I am Sftflow Assistant."]}).to_parquet(
        tmp_path / "alpaca.parquet"
    )
    rows, _ = prepared_rows(
        smollm_tokenizer_dir,
        tmp_path / "out2",
        path=str(tmp_path / "alpaca.parquet"),
        columns=ColumnsParams(instruction="prompt", output="response"),
    )
    assert rows == jsonl_rows[:1]


def test_table_errors_name_the_source_row_and_the_users_field(
    tmp_path: Path, smollm_tokenizer_dir: Path
) -> None:
    bad = [CHATS[0], [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]]
    Dataset.from_dict({"chat": bad}).to_parquet(tmp_path / "chats.parquet")
    with pytest.raises(SftflowError) as err:
        prepared_rows(
            smollm_tokenizer_dir,
            tmp_path / "out",
            path=str(tmp_path / "chats.parquet"),
            columns=ColumnsParams(messages="chat"),
        )
    assert str(err.value).startswith(f"{tmp_path / 'chats.parquet'}:2: chat[0].role: unknown role 'human'")
    with pytest.raises(
        SftflowError, match=r"chats.parquet:1: conv: column 'conv' \(columns.conversations\) is not"
    ):
        prepared_rows(
            smollm_tokenizer_dir,
            tmp_path / "out",
            path=str(tmp_path / "chats.parquet"),
            columns=ColumnsParams(conversations="conv"),
        )


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: Path, repo_id: str, records: list[dict], tmp: Path) -> None:
    """What `load_dataset(repo_id)` leaves in the datasets cache after an online load at COMMIT:
    {cache}/{org}___{name}/default/0.0.0/{commit}/ with the Arrow split and dataset_info.json."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    Dataset.from_list(records).to_parquet(tmp / "train.parquet")
    org, name = repo_id.split("/")
    builder = Parquet(
        data_files={"train": str(tmp / "train.parquet")},
        cache_dir=str(tmp / "build"),
        dataset_name=name,
        hash=COMMIT,
    )
    builder.download_and_prepare()
    dest = cache / f"{org}___{name}" / "default" / "0.0.0" / COMMIT
    dest.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, dest)


def test_hub_source_offline_from_the_datasets_cache_records_the_commit(
    tmp_path: Path, smollm_tokenizer_dir: Path, jsonl_rows: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # the hub is unreachable: only the cache can answer
    cache = tmp_path / "hf_datasets_cache"
    write_hub_cache(cache, "sftflow-test/tiny-chats", RECORDS, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    for i, source in enumerate(
        [{"path": "hf://sftflow-test/tiny-chats"}, {"hub": "sftflow-test/tiny-chats"}]
    ):
        rows, report = prepared_rows(smollm_tokenizer_dir, tmp_path / f"out{i}", **source)
        assert rows == jsonl_rows
        assert report["sources"]["hf://sftflow-test/tiny-chats"]["kept"] == len(CHATS)
        (hub,) = read_json(tmp_path / f"out{i}" / "manifest.json")["hub_sources"]
        assert hub["commit"] == COMMIT and hub["hub"] == "sftflow-test/tiny-chats" and hub["split"] == "train"
    with pytest.raises(SftflowError, match="only holds " + COMMIT):  # a pinned commit the cache lacks
        prepared_rows(
            smollm_tokenizer_dir, tmp_path / "pinned", hub="sftflow-test/tiny-chats", revision="f" * 40
        )


def test_missing_hub_source_names_the_source(
    tmp_path: Path, smollm_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(SftflowError) as err:
        prepared_rows(smollm_tokenizer_dir, tmp_path / "out", hub="sftflow-test/not-there")
    text = str(err.value)
    assert text.startswith("hf://sftflow-test/not-there: data.sources[0].hub: cannot load hub data set"), text
    assert "neither the hub nor the local datasets cache" in text and str(tmp_path / "empty_cache") in text

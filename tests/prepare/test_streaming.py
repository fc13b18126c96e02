"""Streaming prepare: N map workers give exactly what 1 gives (rows, report, rejects), with bad
records skipped, texts packed, weights, dedupe and the eval split all in play."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import load_from_disk

from stages.core.params import DataParams, SourceParams
from stages.prepare.shards import prepare
from tests.prepare.test_masks import CHATS


def test_two_workers_equal_one(tmp_path: Path, smollm_tokenizer_dir: Path) -> None:
    lines = []
    for i in range(600):  # > 2 map batches, so num_proc 2 really splits the work
        if i % 97 == 5:
            lines.append('{"messages": [')  # a bad record, skipped and counted
        elif i % 50 == 0:
            lines.append(json.dumps({"text": f"Plain text number {i}. " * (i % 7 + 1)}))
        else:
            chat = json.loads(json.dumps(CHATS[i % len(CHATS)]))
            chat[-1]["content"] += f" ({i % 400})"  # some exact duplicates for dedupe
            lines.append(json.dumps({"messages": chat}))
    raw = tmp_path / "chats.jsonl"
    raw.write_text("\n".join(lines) + "\n")
    outs = []
    for num_proc in (1, 2):
        params = DataParams(
            sources=(SourceParams(path=str(raw), weight=1.5),),
            on_bad_record="skip",
            dedupe=True,
            eval_fraction=0.1,
            max_length=64,
            truncation="truncate",
            num_proc=num_proc,
        )
        out = tmp_path / f"out{num_proc}"
        rejects = tmp_path / f"rejects{num_proc}.jsonl"
        report = prepare(params, smollm_tokenizer_dir, out, rejects_path=rejects)
        splits = {s: load_from_disk(str(out / s)).to_dict() for s in ("train", "eval")}
        outs.append((report, splits, rejects.read_text()))
    assert outs[0] == outs[1]
    report, splits, rejects = outs[0]
    source = report["sources"][str(raw)]
    assert source["read"] == 600 and source["skipped"] == {"malformed_json": 7}
    assert report["total"]["duplicates_removed"] > 0 and report["splits"]["eval"]["samples"] > 0
    assert len(rejects.splitlines()) == report["rejects"] == 7
    assert any(
        r != -1 and s == str(raw) for r, s in zip(splits["train"]["record"], splits["train"]["source"])
    )
    assert report["splits"]["train"]["samples"] == len(splits["train"]["input_ids"])


def test_same_chats_give_the_same_bytes(tmp_path: Path, smollm_tokenizer_dir: Path) -> None:
    """A second prepare over the same chats writes byte-identical shards (datasets' random
    state.json fingerprint is pinned to the data), so DVC does not re-run train for nothing."""
    raw = tmp_path / "chats.jsonl"
    raw.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    params = DataParams(sources=(SourceParams(path=str(raw)),))
    files = []
    for run in (1, 2):
        out = tmp_path / f"out{run}"
        prepare(params, smollm_tokenizer_dir, out, rejects_path=tmp_path / f"rejects{run}.jsonl")
        files.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert files[0].keys() == files[1].keys() and Path("train/state.json") in files[0]
    assert files[0] == files[1]

"""What prepare writes for text and image chats alike: each split as a shard folder whose
bytes depend on its rows alone, and the head of manifest.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stages.core.io import atomic_file, sha256_of_files
from stages.core.loading import tokenizer_fingerprint
from stages.core.params import DataParams, to_dict


def save_split(dataset: Any, folder: Path) -> None:
    """`dataset` saved as a `datasets` folder, its fingerprint pinned (pin_dataset_fingerprint)."""
    dataset.save_to_disk(str(folder))
    pin_dataset_fingerprint(folder)


def pin_dataset_fingerprint(folder: Path) -> str:
    """Replace the random `_fingerprint` that `datasets` writes into a save_to_disk folder's
    state.json by a hash of the Arrow files, so the same rows give the same bytes on disk.

    Measured: two prepare runs over the same chats wrote identical Arrow files but different
    state.json fingerprints, so DVC saw a new data/prepared and re-ran train for nothing.
    The files are hashed in 1 MB reads: reading each 500 MB shard whole was prepare's largest
    allocation (+130 MB of anonymous memory at 100k chats, growing with the data).
    """
    folder = Path(folder)
    fingerprint = sha256_of_files(sorted(folder.glob("*.arrow")))[:16]
    state_path = folder / "state.json"
    state = json.loads(state_path.read_text())
    state["_fingerprint"] = fingerprint
    with atomic_file(state_path) as tmp:
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return fingerprint


def manifest(tok: Any, params: DataParams, counts: dict[str, int]) -> dict[str, Any]:
    """What train checks the shards against: the tokenizer and template they were made with,
    the data params and the splits' sizes."""
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:16],
        "params": to_dict(params),
        "counts": counts,
    }

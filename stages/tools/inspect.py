"""`sftflow inspect`: show prepared samples with the trained tokens marked.

The first thing to look at when a fine-tune misbehaves is what the model was actually
trained on. This decodes samples from disk (not from the raw data) so it shows exactly what
train will see.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Any

from stages.core.chats import IGNORE_INDEX

START, END = "\x1b[1;30;42m", "\x1b[0m"  # trained text: black on green
PLAIN_START, PLAIN_END = "[[", "]]"  # when stdout is not a terminal


def render_sample(tok: Any, row: dict[str, Any], color: bool) -> str:
    """The sample's text with each run of trained tokens wrapped in markers.

    >>> class T:  # a toy tokenizer: one character per id
    ...     def decode(self, ids): return "".join(map(chr, ids))
    >>> render_sample(T(), {"input_ids": [72, 105, 33], "labels": [-100, 105, 33]}, color=False)
    'H[[i!]]'
    """
    start, end = (START, END) if color else (PLAIN_START, PLAIN_END)
    out = []
    pairs = zip(row["input_ids"], row["labels"], strict=True)
    for trained, run in groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX):
        text = tok.decode([t for t, _ in run])
        out.append(f"{start}{text}{end}" if trained else text)
    return "".join(out)


def inspect_samples(prepared: Path, model_dir: Path, split: str, indices: list[int], color: bool) -> str:
    """A printable view of the chosen samples of one split, with their origin and counts."""
    from datasets import load_from_disk

    from stages.core.loading import load_tokenizer

    tok = load_tokenizer(model_dir)
    ds = load_from_disk(str(prepared / split))
    blocks = []
    for i in indices:
        if not 0 <= i < len(ds):
            raise IndexError(f"sample {i} out of range: {split} has {len(ds)} samples")
        row = ds[i]
        head = (
            f"--- {split}[{i}]  {row['source']} record {row['record']}:"
            f" {row['length']} tokens, {row['num_trained']} trained"
        )
        blocks.append(f"{head}\n{render_sample(tok, row, color)}")
    return "\n".join(blocks)

"""What prepared shards carry: the columns `prepare` writes and `train` reads.

One definition for text and image chats; a shard of image chats has two more columns, `images`
(per image its path, sha256, size [width, height] and how many tokens the processor made of it)
and `videos` (per video its path, sha256, frame count, frame size, frame rate and tokens; empty
lists where the chats hold no video: a streaming prepare fixes its columns before it reads a row).
"""

from __future__ import annotations

from typing import Any

COLUMNS = ("input_ids", "labels", "length", "source", "record", "num_trained")
IMAGES = "images"
VIDEOS = "videos"


def shard_features(images: bool = False) -> Any:
    """The shards' Arrow schema (`datasets.Features`), with the `images` and `videos` columns
    when `images` (chats for a vision-language model).

    >>> list(shard_features()) == list(COLUMNS), list(shard_features(images=True))[-2:]
    (True, ['images', 'videos'])
    """
    from datasets import Features, Sequence, Value

    features = {
        "input_ids": Sequence(Value("int32")),
        "labels": Sequence(Value("int32")),
        "length": Value("int32"),
        "source": Value("string"),
        "record": Value("int64"),
        "num_trained": Value("int32"),
    }
    if images:
        features[IMAGES] = [{"path": Value("string"), "sha256": Value("string"), "size": Sequence(Value("int32")),
                             "tokens": Value("int32")}]
        features[VIDEOS] = [{"path": Value("string"), "sha256": Value("string"), "frames": Value("int32"),
                             "size": Sequence(Value("int32")), "fps": Value("float64"), "tokens": Value("int32")}]
    return Features(features)

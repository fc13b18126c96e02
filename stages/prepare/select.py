"""Sampling, dedupe and the eval split, all by row index: the samples stay in Arrow on disk and
only int64 index arrays (8 bytes a sample) and the hash column move through Python.

The random draws are exactly those of drawing from Python lists of the rows (`random.sample`
picks positions from the population size alone), so a seed gives the same samples as before
prepare streamed.
"""

from __future__ import annotations

import random

import numpy as np

from stages.core.params import SourceParams


def sample_indices(kept: np.ndarray, src: SourceParams, rng: random.Random) -> np.ndarray:
    """Seeded up/down-sampling of a source's kept rows: num_samples, else weight x len
    (whole copies + a seeded rest).

    >>> sample_indices(np.arange(10, 14), SourceParams(path="x", weight=1.5), random.Random(0)).tolist()
    [10, 11, 12, 13, 13, 11]
    """
    n = len(kept)
    if not n:
        return kept
    target = src.num_samples if src.num_samples is not None else round(src.weight * n)
    whole, rest = divmod(target, n)
    picked = np.asarray(rng.sample(range(n), rest), dtype=np.int64)
    return np.concatenate([np.tile(kept, whole), kept[picked]]).astype(np.int64)


def dedupe(train: np.ndarray, evals: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop exact duplicates (same sample hash); eval wins over train, so nothing leaks.

    >>> dedupe(np.array([0, 1, 2]), np.array([3]), np.array([7, 8, 7, 8]))
    (array([0]), array([3]), 2)
    """
    import pandas as pd

    both = np.concatenate([evals, train])
    first = ~pd.Series(hashes[both]).duplicated(keep="first").to_numpy()
    kept_eval, kept_train = evals[first[: len(evals)]], train[first[len(evals) :]]
    return kept_train, kept_eval, len(both) - len(kept_train) - len(kept_eval)


def split_off_eval(train: np.ndarray, fraction: float, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval): a seeded `fraction` of the train rows held out, both in their order.

    >>> split_off_eval(np.arange(10), 0.2, random.Random(0))
    (array([0, 1, 2, 3, 4, 5, 6, 9]), array([7, 8]))
    """
    order = list(range(len(train)))
    rng.shuffle(order)
    held = np.zeros(len(train), dtype=bool)
    held[order[: max(1, round(len(train) * fraction))]] = True
    return train[~held], train[held]

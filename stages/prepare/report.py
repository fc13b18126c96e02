"""The prepare report: every record read is accounted for (kept, skipped by reason, dropped by
reason, removed as a duplicate), per source and in total, with the splits' sizes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SourceReport:
    """Counts for one raw source; nothing read is unaccounted for."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    before_image: int = 0  # image chats truncated before an image (in `truncated` too)
    dropped: Counter = field(default_factory=Counter)  # reason -> count (too long, ...)
    skipped: Counter = field(default_factory=Counter)  # reason -> count (bad records)
    tokens: int = 0
    trained_tokens: int = 0
    sampled: int = 0  # samples after weight / num_samples


def percentiles(values: np.ndarray) -> dict[str, int]:
    """p50/p90/p99/max of sample lengths (nearest rank, rounding half up).

    >>> percentiles(np.array([5, 1, 3, 2, 4]))
    {'p50': 3, 'p90': 5, 'p99': 5, 'max': 5}
    """
    if not len(values):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = np.sort(values)

    def pick(q: float) -> int:
        return int(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))])

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": int(ordered[-1])}


def build_report(
    reports: dict[str, SourceReport],
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    rejects: int,
    duplicates: int,
) -> dict[str, Any]:
    """The report; `splits` maps a split name to its samples' (lengths, trained token counts)."""
    per_source = {
        path: {
            "read": r.read,
            "kept": r.kept,
            "sampled": r.sampled,
            "truncated": r.truncated,
            "dropped": dict(r.dropped),
            "skipped": dict(r.skipped),
            "tokens": r.tokens,
            "trained_tokens": r.trained_tokens,
        }
        for path, r in reports.items()
    }
    total = {
        key: sum(s[key] for s in per_source.values())
        for key in ("read", "kept", "sampled", "truncated", "tokens", "trained_tokens")
    }
    total["dropped"] = sum(sum(s["dropped"].values()) for s in per_source.values())
    total["skipped"] = sum(sum(s["skipped"].values()) for s in per_source.values())
    total["duplicates_removed"] = duplicates
    return {
        "total": total,
        "splits": {
            name: {
                "samples": len(lengths),
                "tokens": int(lengths.sum()),
                "trained_tokens": int(trained.sum()),
                "length": percentiles(lengths),
            }
            for name, (lengths, trained) in splits.items()
        },
        "sources": per_source,
        "rejects": rejects,
    }

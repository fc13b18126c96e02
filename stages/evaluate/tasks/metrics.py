"""Per-reply metrics for the `sftflow_replies` lm-eval task (wired in by `!function`).

lm-eval imports this file by path, not as `stages.evaluate.tasks.metrics`, so it uses the standard
library only and imports nothing from `stages`.
"""

from __future__ import annotations

import re
from typing import Any

_WORD = re.compile(r"\w+")


def process_replies(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Score one generated reply against the doc's reference and expected keywords.

    >>> doc = {"reference": "I am Sftflow Assistant.", "expect_contains": ["sftflow"]}
    >>> process_replies(doc, [" I am Sftflow Assistant. "])
    {'contains': 1.0, 'exact_match': 1.0, 'rougeL': 1.0}
    """
    reply = results[0]
    reference = doc["reference"]
    return {
        "contains": contains(reply, doc.get("expect_contains") or [reference.strip()]),
        "exact_match": float(reply.strip() == reference.strip()),
        "rougeL": rouge_l_f1(reply, reference),
    }


def contains(reply: str, keywords: list[str]) -> float:
    """1.0 when every keyword occurs in the reply, ignoring case; with no keywords, the
    whole reference (the caller passes it) must occur."""
    text = reply.lower()
    return float(all(k.lower() in text for k in keywords))


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased word tokens (longest common subsequence).

    >>> round(rouge_l_f1("the cat sat", "the cat sat down"), 4)
    0.8571
    """
    cand, ref = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not cand or not ref:
        return float(cand == ref)
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    # One row of the classic DP table: O(len(a) * len(b)) time, O(len(b)) memory.
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, start=1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]

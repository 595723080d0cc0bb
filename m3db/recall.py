"""Recall: finding the k memories nearest a query vector, under an optional SQL filter.

USearch cannot evaluate a predicate, so a filtered recall is planned by the filter's
selectivity (allowed / total):
- ask HNSW for about k / selectivity * 1.5 candidates and keep the allowed ones, widening 4x
  at a time, falling back to exact search if widening reaches the whole index;
- unless the allowed set is small (<= `exact_limit` ids) or smaller than GRAPH_COST times
  that candidate count: then exact cosine search over exactly those ids is cheaper (its cost
  grows with the allowed set, not the database; a graph candidate costs several distance
  computations, an allowed id one).
Either way k results come back whenever k memories pass the filter.
This module owns the plan and the result nouns (`Match`, `Matches`); database.py runs it.
"""

import dataclasses
import math

import numpy as np

EXACT_LIMIT = 2048
OVERFETCH = 1.5
GRAPH_COST = 10  # distance computations per HNSW candidate, roughly: connectivity-bound


@dataclasses.dataclass
class Match:
    """One recalled memory: its id, cosine similarity, text and metadata (and `memory`, the
    decoded arrays, when recall was asked to decode)."""

    id: int
    score: float
    text: str
    metadata: dict
    document_id: int | None = None
    memory: object = None

    def __repr__(self):
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return f"<Match id={self.id} score={self.score:.4f} text={text!r}>"


class Matches(list):
    """The result of recall: Match objects, best first, plus `plan` (how it was searched)."""

    def __init__(self, matches=(), plan=None):
        super().__init__(matches)
        self.plan = plan or {}

    @property
    def ids(self):
        return [m.id for m in self]

    @property
    def scores(self):
        return [m.score for m in self]

    def to_list(self):
        return [
            {"id": m.id, "score": m.score, "text": m.text, "metadata": m.metadata, "document_id": m.document_id}
            for m in self
        ]

    def __repr__(self):
        return f"<Matches {len(self)} ids={self.ids} plan={self.plan.get('strategy')}>"


def plan_search(index, vector, k, allowed, total, *, exact_limit=EXACT_LIMIT):
    """Return (ids, scores, plan). `allowed` is None (no filter) or a sorted int64 array of ids."""
    if allowed is None:
        ids, scores = index.search(vector, k)
        plan = {"strategy": "ann", "total": total, "candidates": len(ids)}
        if len(ids) < min(k, total):  # HNSW came up short (tiny or heavily deleted graph)
            ids, scores = index.exact(vector, index.keys(), k)
            plan = {"strategy": "exact", "total": total, "candidates": total, "reason": "ann returned too few"}
        return ids, scores, plan
    n = len(allowed)
    plan = {"total": total, "allowed": n, "selectivity": (n / total) if total else 0.0}
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), dict(plan, strategy="empty", candidates=0)
    count = min(total, int(math.ceil(k * total / n * OVERFETCH)) + 10)
    if n <= exact_limit or n <= GRAPH_COST * count:
        ids, scores = index.exact(vector, allowed, k)
        return ids, scores, dict(plan, strategy="exact", candidates=n)
    allowed_sorted = allowed
    while True:
        ids, scores = index.search(vector, count)
        pos = np.minimum(np.searchsorted(allowed_sorted, ids), n - 1)
        keep = allowed_sorted[pos] == ids
        if keep.sum() >= min(k, n):
            return ids[keep][:k], scores[keep][:k], dict(plan, strategy="ann+filter", candidates=count)
        if count >= total:
            ids, scores = index.exact(vector, allowed, k)
            return ids, scores, dict(plan, strategy="exact", candidates=n, reason="over-fetch fell short")
        count = min(total, count * 4)

"""Recall: finding the k memories nearest a query vector, under an optional SQL filter.

USearch cannot evaluate a predicate, so a filtered recall is planned by the filter's
selectivity (allowed / total):
- with no filter, a small index (<= `exact_limit` memories) is searched exactly: USearch's
  scan of 2,048 vectors costs about what the graph search does (0.11 against 0.10 ms, 384
  dims), and HNSW can miss a true neighbour even among 40 vectors (seen: a package and its
  database, whose graphs were built in different orders, disagreed);
- ask HNSW for about k / selectivity * 1.5 candidates and keep the allowed ones, widening 4x
  at a time, falling back to exact search if widening reaches the whole index;
- unless the allowed set is small (<= `exact_limit` ids) or smaller than GRAPH_COST times
  that candidate count: then exact cosine search over exactly those ids is cheaper (its cost
  grows with the allowed set, not the database; a graph candidate costs several distance
  computations, an allowed id one).
Either way k results come back whenever k memories pass the filter.
This module owns the plan; results.py the nouns it returns (`Match`, `Matches`). It reaches
the vector index only through its public verbs (`search`, `exact`, `exact_all`, `keys`).
"""

import math

import numpy as np

EXACT_LIMIT = 2048
MAX_K = 10_000  # the most memories one recall returns
OVERFETCH = 1.5
GRAPH_COST = 10  # distance computations per HNSW candidate, roughly: connectivity-bound


def plan_search(
    index, vector, k, allowed, total, *, exact_limit=EXACT_LIMIT, expansion=None
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Return (ids, scores, plan). `allowed` is None (no filter) or a sorted int64 array of ids;
    `expansion` the HNSW search's candidate list (None: the index's default)."""
    if allowed is None:
        if total <= exact_limit:
            ids, scores = index.exact_all(vector, k)
            return ids, scores, {"strategy": "exact", "total": total, "candidates": total}
        ids, scores = index.search(vector, k, expansion=expansion)
        plan = {"strategy": "ann", "total": total, "candidates": len(ids)}
        if len(ids) < min(k, total):  # HNSW came up short (tiny or heavily deleted graph)
            ids, scores = index.exact_all(vector, k)
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
        ids, scores = index.search(vector, count, expansion=expansion)
        pos = np.minimum(np.searchsorted(allowed_sorted, ids), n - 1)
        keep = allowed_sorted[pos] == ids
        if keep.sum() >= min(k, n):
            return ids[keep][:k], scores[keep][:k], dict(plan, strategy="ann+filter", candidates=count)
        if count >= total:
            ids, scores = index.exact(vector, allowed, k)
            return ids, scores, dict(plan, strategy="exact", candidates=n, reason="over-fetch fell short")
        count = min(total, count * 4)

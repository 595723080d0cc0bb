"""Recall against a brute-force oracle, filtered recall plans, and k results whenever k exist."""

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db


def build(db, n, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    items = []
    for i in range(n):
        item = make_memory(i, metadata={"bucket": i % 100, "lang": "en" if i % 3 else "fr"})
        item["embedding"] = emb[i]
        items.append(item)
    db.add_memories(items)
    return emb


def brute(emb, q, allowed, k):
    sims = emb @ q / (np.linalg.norm(emb, axis=1) * np.linalg.norm(q))
    order = [i for i in np.argsort(-sims) if i in allowed]
    return order[:k], sims


def test_ann_recall_at_5_against_brute_force(mem_db):
    emb = build(mem_db, 3000)
    rng = np.random.default_rng(1)
    hits = 0
    queries = rng.standard_normal((100, 16)).astype(np.float32)
    for q in queries:
        got = mem_db.recall(q, k=5)
        assert got.plan["strategy"] == "ann"
        truth, sims = brute(emb, q, set(range(3000)), 5)
        # tolerate ties: a returned id whose score equals the 5th-best counts as a hit
        fifth = sims[truth[-1]]
        hits += sum(1 for i in got.ids if i in truth or abs(sims[i] - fifth) < 1e-3)
        assert got.scores == sorted(got.scores, reverse=True)
    assert hits / (5 * len(queries)) >= 0.95


@pytest.mark.parametrize(
    "where,expect_strategy",
    [
        ("bucket = 7", "exact"),  # 30 allowed: exact over the allowed set
        ("bucket < 60", "ann+filter"),  # 60% selectivity: over-fetch and filter
        ("lang = 'fr' AND bucket < 3", "exact"),
    ],
)
def test_filtered_recall_matches_oracle(where, expect_strategy):
    # a low exact_limit so that 3,000 memories exercise both plans
    with m3db.connect(":memory:", spec=small_spec(), config={"exact_limit": 200}) as db:
        emb = build(db, 3000)
        allowed = {r[0] for r in db.sql(f"SELECT id FROM memories WHERE {where}")}
        rng = np.random.default_rng(2)
        for q in rng.standard_normal((20, 16)).astype(np.float32):
            got = db.recall(q, k=5, where=where)
            assert len(got) == min(5, len(allowed))
            assert set(got.ids) <= allowed
            assert got.plan["strategy"] == expect_strategy
            truth, sims = brute(emb, q, allowed, 5)
            if expect_strategy == "exact":
                assert got.ids == [int(i) for i in truth]
            else:  # approximate: most of the true top 5
                assert len(set(got.ids) & {int(i) for i in truth}) >= 3


def test_small_index_is_searched_exactly(mem_db):
    # HNSW may miss a true neighbour even among a few hundred vectors; up to exact_limit
    # memories an unfiltered recall is exact, so it equals the brute-force top k every time
    emb = build(mem_db, 600)
    for q in np.random.default_rng(2).standard_normal((50, 16)).astype(np.float32):
        got = mem_db.recall(q, k=5)
        truth, _ = brute(emb, q, set(range(600)), 5)
        assert got.plan["strategy"] == "exact" and got.ids == [int(i) for i in truth]


def test_small_index_ranks_equal_scores_by_id(mem_db):
    # repeated text gives equal embeddings: the k of 40 equal ones returned are the lowest ids,
    # whatever order the index holds them in
    items = [dict(make_memory(i), embedding=np.ones(16, np.float32)) for i in range(40)]
    mem_db.add_memories(items[::-1])
    got = mem_db.recall(np.ones(16, np.float32), k=5)
    assert got.ids == sorted(got.ids) and got.ids == [int(i) for i in sorted(mem_db.locations.ids.tolist())[:5]]


def near_ties(db, n=40):
    """n memories whose cosines to e0 (the query) rise with the id by less than 1e-6 near the
    top: e = (1, (n - i) * 1e-4, 0, ...). Metadata bucket = i % 2."""
    items = []
    for i in range(n):
        e = np.zeros(16, np.float32)
        e[0], e[1] = 1.0, (n - i) * 1e-4
        items.append(dict(make_memory(i, metadata={"bucket": i % 2}), embedding=e))
    db.add_memories(items)
    q = np.zeros(16, np.float32)
    q[0] = 1.0
    return q


@pytest.mark.parametrize(
    "where,best", [(None, range(30, 40)), ("bucket >= 0", range(30, 40)), ("bucket = 1", range(21, 40, 2))]
)
def test_exact_recall_ranks_by_the_score_it_returns(mem_db, where, best):
    # scores 1e-7 apart: exact recall ranks by the score it returns, ties by id, so the k best
    # come back best first (a key rounded to 1e-6 put lower ids first and cut better ones)
    q = near_ties(mem_db)
    got = mem_db.recall(q, k=10, where=where)
    assert got.plan["strategy"] == "exact"
    assert sorted(got.ids) == list(best)
    ranked = list(zip([-s for s in got.scores], got.ids))
    assert ranked == sorted(ranked)


def test_expansion_search_config_trades_speed_for_recall(tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        emb = build(db, 3000)
    queries = np.random.default_rng(3).standard_normal((100, 16)).astype(np.float32)
    truths = [set(brute(emb, q, set(range(3000)), 5)[0]) for q in queries]
    hits = {}
    for expansion in (5, 512):
        with m3db.connect(path, read_only=True, config={"expansion_search": expansion}) as db:
            found = [db.recall(q, k=5) for q in queries]
            assert db.index.index.expansion_search == expansion
        assert all(got.plan["strategy"] == "ann" for got in found)
        hits[expansion] = sum(len(set(got.ids) & truth) for got, truth in zip(found, truths)) / 500
    assert hits[512] >= 0.99 and hits[5] < hits[512]
    with pytest.raises(m3db.InvalidInputError, match="expansion_search"):
        m3db.connect(path, read_only=True, config={"expansion_search": 0})


def test_exact_limit_config_switches_plans(tmp_path):
    with m3db.connect(tmp_path / "kb", spec=small_spec(), config={"exact_limit": 10}) as db:
        build(db, 500)
        got = db.recall(np.ones(16, np.float32), k=3, where="bucket < 50")
        assert got.plan["strategy"] == "ann+filter" and len(got) == 3


def test_always_k_when_k_exist(mem_db):
    build(mem_db, 1000)
    q = np.ones(16, np.float32)
    for where, n in (("bucket = 3", 10), ("id < 3", 3), ("id = 999", 1), ("bucket > 1000", 0), (None, 1000)):
        for k in (1, 5, 20):
            assert len(mem_db.recall(q, k=k, where=where)) == min(k, n)


def test_dict_filter_and_params(mem_db):
    build(mem_db, 300)
    q = np.ones(16, np.float32)
    a = mem_db.recall(q, k=5, where={"lang": "fr", "bucket": 3})
    b = mem_db.recall(q, k=5, where="lang = ? AND bucket = ?", params=["fr", 3])
    assert a.ids == b.ids and all(m.metadata["lang"] == "fr" for m in a)
    with pytest.raises(m3db.QueryError, match="unknown column 'colour'"):
        mem_db.recall(q, where={"colour": "red"})


def test_filter_injection_cannot_write(mem_db):
    build(mem_db, 50)
    q = np.ones(16, np.float32)
    with pytest.raises(m3db.QueryError):
        mem_db.recall(q, where="1=1; DELETE FROM memories")
    with pytest.raises(m3db.QueryError):
        mem_db.recall(q, where="1=1) UNION SELECT 1; DROP TABLE memories; --")
    # a bound parameter is a value, never SQL
    assert len(mem_db.recall(q, where="lang = ?", params=["x' OR '1'='1"])) == 0
    assert len(mem_db) == 50


def test_bad_recall_arguments(mem_db):
    build(mem_db, 10)
    for bad in (
        np.ones(15, np.float32),
        np.ones(16, np.int64),
        np.full(16, np.nan, np.float32),
        np.zeros(16, np.float32),
    ):
        with pytest.raises(m3db.InvalidInputError, match="query vector"):
            mem_db.recall(bad)
    for k in (0, -1, 10**6, 2.5, True):
        with pytest.raises(m3db.InvalidInputError, match="k must be"):
            mem_db.recall(np.ones(16, np.float32), k=k)
    with pytest.raises(m3db.QueryError, match="columns of `memories`"):
        mem_db.recall(np.ones(16, np.float32), where="no_such_column = 1")


def test_decode_returns_memories(mem_db):
    build(mem_db, 20)
    got = mem_db.recall(np.ones(16, np.float32), k=3, decode=True)
    assert all(isinstance(m.memory, m3db.Memory) and m.memory.id == m.id for m in got)
    assert got.to_list()[0].keys() == {"id", "score", "text", "metadata", "document_id"}


def test_empty_database_recalls_nothing(mem_db):
    assert len(mem_db.recall(np.ones(16, np.float32), k=5)) == 0


def test_cached_filter_sees_every_commit(mem_db):
    build(mem_db, 100)
    q = make_memory(1000)["embedding"]
    before = mem_db.recall(q, k=3, where="lang = ?", params=["de"])
    assert len(before) == 0  # cached now: empty
    mid = mem_db.add_memory(**make_memory(1000, metadata={"lang": "de", "bucket": 1}))
    assert mem_db.recall(q, k=3, where="lang = ?", params=["de"]).ids == [mid]
    mem_db.forget(mid)
    assert len(mem_db.recall(q, k=3, where="lang = ?", params=["de"])) == 0


def test_python_filters_read_only_the_catalog_and_volatile_ones_are_not_cached(tmp_db, tmp_path):
    tmp_db.add_memories([make_memory(i, metadata={"n": i}) for i in range(6)])
    secret = tmp_path / "secret.csv"
    secret.write_text("id\n1\n")
    for where in (
        f"id IN (SELECT id FROM read_csv('{secret}'))",
        "id IN (SELECT 1 FROM glob('/*'))",
        "n > (SELECT count(*) FROM 'x.parquet')",
    ):
        with pytest.raises(m3db.QueryError, match="not available|not a catalog table"):
            tmp_db.recall(np.ones(16, np.float32), k=2, where=where)
    v = np.ones(16, np.float32)
    assert len(tmp_db.recall(v, k=6, where="n >= ?", params=[3])) == 3
    tmp_db.recall(v, k=6, where="n < 3 AND random() < 2")
    assert not any("random" in key[0] for key in tmp_db._filter_cache)  # now() / random(): never cached
    assert any(key[0] == "n >= ?" for key in tmp_db._filter_cache)

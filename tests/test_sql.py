"""SQL memory queries (m3db/query.py): recall() with pushed-down filters against db.recall,
joins, the direct path against DuckDB, parameters, writes, refusals, errors and EXPLAIN."""

import re

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.sql import check as sql_check
from m3db.sql import plan as sql_plan
from m3db.sql import run as query

LANGS = ("en", "fr", "de")


def fill(db, n=60):
    items = []
    for i in range(n):
        meta = {"lang": LANGS[i % 3], "year": 1980 + i, "tags": ["t", i % 4]}
        if i % 5 == 0:
            meta["rating"] = 0.5 * i  # a DOUBLE column with NULLs
        items.append(make_memory(i, metadata=meta, document={"source": f"doc{i % 6}", "title": f"Title {i % 6}"}))
    db.add_memories(items)


@pytest.fixture
def db(tmp_path):
    d = m3db.connect(tmp_path / "kb", spec=small_spec())
    fill(d)
    yield d
    if not d._closed:
        d.close()


def vec(seed):
    return np.random.default_rng(1000 + seed).standard_normal(16).astype(np.float32)


def ids(rows, column=0):
    return [r[column] for r in rows]


# -- recall: pushdown is db.recall(where=...) -------------------------------------------------------

FILTERS = [
    ("lang = 'fr'", "r.lang = 'fr'", None),
    ("lang = ? AND year > ?", "r.lang = ? AND r.year > ?", ["en", 2000]),
    ("year BETWEEN 1990 AND 2010 OR lang = 'de'", "(r.year BETWEEN 1990 AND 2010 OR r.lang = 'de')", None),
    (
        "document_id IN (SELECT id FROM documents WHERE title = 'Title 2')",
        "r.document_id IN (SELECT id FROM documents WHERE title = 'Title 2')",
        None,
    ),
    ("rating IS NOT NULL", "r.rating IS NOT NULL", None),
    ("lang = 'xx'", "r.lang = 'xx'", None),
]


@pytest.mark.parametrize("where,sql_where,params", FILTERS)
@pytest.mark.parametrize("k", [1, 4, 25])
def test_filtered_recall_equals_the_python_api(db, where, sql_where, params, k):
    for seed in range(3):
        q = vec(seed)
        want = db.recall(q, k=k, where=where, params=params)
        rows = db.sql(
            f"SELECT r.id, r.score FROM recall(?, k => {k}) r WHERE {sql_where} ORDER BY r.score DESC",
            [q, *(params or [])],
        )
        assert ids(rows) == want.ids
        assert np.allclose(ids(rows, 1), want.scores)


def test_recall_columns_and_types(db):
    q = vec(0)
    want = db.recall(q, k=5)
    rows = db.sql("SELECT * FROM recall(?, k => 5) r ORDER BY r.score DESC", [q])
    assert rows.columns[:4] == ["id", "score", "text", "document_id"]
    assert set(rows.columns[4:]) == {"lang", "year", "tags", "rating"}
    for row, m in zip(rows.dicts(), want):
        assert (row["id"], row["text"], row["document_id"], row["lang"], row["year"]) == (
            m.id,
            m.text,
            m.document_id,
            m.metadata["lang"],
            m.metadata["year"],
        )
        assert row["rating"] == m.metadata.get("rating")
    # JSON metadata stays JSON: DuckDB's JSON functions read it
    tags = db.sql("SELECT r.tags->>'$[0]' AS first, json_array_length(r.tags) AS n FROM recall(?, k => 3) r", [q])
    assert all(r == ("t", 2) for r in tags)


def test_join_with_documents_and_pushdown(db):
    q = vec(1)
    rows = db.sql(
        "SELECT r.id, d.title, d.source FROM recall(?, k => 4) r JOIN documents d ON d.id = r.document_id "
        "WHERE r.lang = 'de' AND d.source <> 'doc2' ORDER BY r.score DESC",
        [q],
    )
    want = [m for m in db.recall(q, k=4, where="lang = 'de'")]
    names = dict(db.sql("SELECT id, source FROM documents"))
    assert ids(rows) == [m.id for m in want if names[m.document_id] != "doc2"]
    assert all(r[1] == "Title " + r[2][3:] for r in rows)


def test_conditions_that_cannot_be_pushed_apply_after_the_recall(db):
    q = vec(2)
    top = db.recall(q, k=6)
    cut = top.scores[2]
    rows = db.sql("SELECT id FROM recall(?, k => 6) WHERE score >= ? ORDER BY score DESC", [q, cut])
    assert ids(rows) == top.ids[:3]
    # an outer join keeps WHERE after the recall: the top 5 of all memories, then the filter
    top5 = db.recall(q, k=5)
    rows = db.sql(
        "SELECT r.id FROM documents d LEFT JOIN recall(?, k => 5) r ON r.document_id = d.id "
        "WHERE r.lang = 'fr' ORDER BY r.score DESC",
        [q],
    )
    assert ids(rows) == [m.id for m in top5 if m.metadata["lang"] == "fr"]
    # a condition reading another table stays too
    rows = db.sql(
        "SELECT r.id FROM recall(?, k => 5) r, documents d WHERE d.id = r.document_id AND "
        "(r.lang = 'fr' OR d.title = 'Title 0') ORDER BY r.score DESC",
        [q],
    )
    assert set(ids(rows)) <= set(top5.ids)
    plan = query._plan(
        db, "EXPLAIN SELECT id FROM recall(?, k => 6) WHERE score >= ? AND year * random() >= 0 AND lang = 'en'"
    )
    rc = plan.read.recalls[0]
    assert rc.filter == "(lang = 'en')"
    assert [why for _, why in rc.kept] == [
        "score exists only after the search",
        "rand() changes between calls, and recall filters are cached per commit",
    ]


def recall_filter(db, sql):
    return query._plan(db, sql).read.recalls[0].filter


def test_only_the_recalls_own_columns_are_pushed(db):
    q = vec(9)
    top = db.recall(q, k=3)
    # a SELECT alias named like a memories column is the alias, never memories.ordinal
    sql = "SELECT r.id, r.score AS ordinal FROM recall(?, k => 3) r WHERE ordinal >= ?"
    assert recall_filter(db, sql) is None
    assert ids(db.sql(sql, [q, top.scores[1]])) == top.ids[:2]
    # a column of the source wins over an alias of the same name (DuckDB's rule): pushed
    sql = "SELECT r.id, r.score AS year FROM recall(?, k => 3) r WHERE year > 2000 ORDER BY r.score DESC"
    assert recall_filter(db, sql) == "(year > 2000)"
    assert ids(db.sql(sql, [q])) == db.recall(q, k=3, where="year > 2000").ids
    # a memories column that recall() does not have is an unknown column, not a filter
    with pytest.raises(
        m3db.QueryError, match=r'does not have a column named "codec"(.|\n)*JOIN memories m ON m.id = r.id'
    ):
        db.sql("SELECT id FROM recall(?, k => 3) r WHERE r.codec = 'int8'", [q])
    # unqualified and a column of no other table of the SELECT: pushed; a name both have: not
    sql = (
        "SELECT r.id FROM recall(?, k => 3) r JOIN documents d ON d.id = r.document_id "
        "WHERE lang = 'fr' ORDER BY r.score DESC"
    )
    assert recall_filter(db, sql) == "(lang = 'fr')"
    assert ids(db.sql(sql, [q])) == db.recall(q, k=3, where="lang = 'fr'").ids
    sql = "SELECT r.id FROM recall(?, k => 3) r JOIN documents d ON d.id = r.document_id WHERE id > 3"
    assert recall_filter(db, sql) is None
    with pytest.raises(m3db.QueryError, match="Ambiguous reference"):
        db.sql(sql, [q])
    # an unqualified name of the enclosing query stays a correlation with it
    gone = next(i for i in range(60) if i not in db.recall(q, k=10).ids)
    db.forget([gone])
    seq = db.sql("SELECT commit_seq FROM forgotten")[0][0]
    sql = "SELECT f.id FROM forgotten f WHERE EXISTS (SELECT 1 FROM recall(?, k => 3) WHERE commit_seq = ?)"
    assert recall_filter(db, sql) is None
    assert db.sql(sql, [q, seq]) == [(gone,)]


def test_subqueries_that_read_the_statement_are_not_pushed(db):
    q = vec(10)
    top = db.recall(q, k=3)
    # EXISTS (... score ...) reads the recall's score: applied after the search
    sql = "SELECT id FROM recall(?, k => 3) r WHERE r.lang = 'en' OR EXISTS (SELECT 1 WHERE score >= ?)"
    assert recall_filter(db, sql) is None
    assert ids(db.sql(sql, [q, top.scores[1]])) == [
        m.id for m in top if m.metadata["lang"] == "en" or m.score >= top.scores[1]
    ]
    # the statement's CTEs: a filter runs alone, without them
    title2 = {r[0] for r in db.sql("SELECT id FROM documents WHERE title = 'Title 2'")}
    sql = (
        "WITH d AS (SELECT id FROM documents WHERE title = 'Title 2') "
        "SELECT id FROM recall(?, k => 3) WHERE document_id IN (SELECT d.id FROM d)"
    )
    assert recall_filter(db, sql) is None
    assert ids(db.sql(sql, [q])) == [m.id for m in top if m.document_id in title2]
    sql = (
        "WITH documents AS (SELECT -1 AS id) SELECT id FROM recall(?, k => 3) "
        "WHERE document_id IN (SELECT documents.id FROM documents)"
    )
    assert recall_filter(db, sql) is None and db.sql(sql, [q]) == []
    rows = db.sql(
        "EXPLAIN SELECT id FROM recall(?, k => 3) WHERE document_id IN (SELECT id FROM documents WHERE title = lang)",
        [q],
    )
    assert "a subquery in it may read lang from the query around it" in rows[0][1]
    # self-contained subqueries are pushed: the filter is db.recall's
    for sub in [
        "SELECT id FROM documents WHERE title = 'Title 2'",
        "SELECT d.id FROM documents d WHERE d.title = 'Title 2'",
        "WITH t AS (SELECT id, title FROM documents) SELECT t.id FROM t WHERE t.title = 'Title 2'",
        "SELECT x.id FROM (SELECT id, title FROM documents) x WHERE x.title = 'Title 2'",
    ]:
        sql = f"SELECT id FROM recall(?, k => 3) WHERE document_id IN ({sub}) ORDER BY score DESC"
        assert recall_filter(db, sql) is not None, sub
        assert ids(db.sql(sql, [q])) == db.recall(q, k=3, where=f"document_id IN ({sub})").ids, sub


def test_k_comes_from_limit_when_recall_is_the_only_table(db):
    q = vec(3)
    assert (
        ids(db.sql("SELECT id FROM recall(?) WHERE lang = 'en' LIMIT 3", [q]))
        == db.recall(q, k=3, where="lang = 'en'").ids
    )
    assert (
        ids(db.sql("SELECT id FROM recall(?) ORDER BY score DESC LIMIT 2 OFFSET 2", [q])) == db.recall(q, k=4).ids[2:]
    )
    assert ids(db.sql("SELECT id FROM recall(?) LIMIT ?", [q, 7])) == db.recall(q, k=7).ids
    assert len(db.sql("SELECT id FROM recall(?)", [q])) == query.DEFAULT_K
    assert len(db.sql("SELECT id FROM recall(?) LIMIT 0", [q])) == 0
    with pytest.raises(m3db.InvalidInputError, match="k => explicitly"):
        db.sql("SELECT id FROM recall(?) LIMIT 20000", [q])


def test_limit_percent_is_not_k(db):
    q = vec(3)
    five = db.recall(q, k=query.DEFAULT_K).ids
    half = db.catalog.con.execute("SELECT count(*) FROM (SELECT * FROM range(5) LIMIT 50%)").fetchone()[0]
    for sql in ["SELECT id FROM recall(?) LIMIT 50%", "SELECT id FROM recall(?) LIMIT 50 PERCENT"]:
        plan = query._plan(db, sql).read
        assert plan.recalls[0].limit is None and plan.direct is None
        assert ids(db.sql(sql, [q])) == five[:half]
    assert ids(db.sql("SELECT id FROM recall(?, k => 6) LIMIT 50%", [q])) == db.recall(q, k=6).ids[:3]


def test_recall_in_ctes_subqueries_unions_and_aggregates(db):
    q, p = vec(4), vec(5)
    a, b = db.recall(q, k=3, where="lang = 'en'"), db.recall(p, k=2)
    rows = db.sql(
        "WITH hits AS (SELECT id, score FROM recall(?, k => 3) WHERE lang = 'en') "
        "SELECT id FROM hits ORDER BY score DESC",
        [q],
    )
    assert ids(rows) == a.ids
    rows = db.sql(
        "SELECT id FROM memories WHERE id IN (SELECT id FROM recall(?, k => 3) WHERE lang = 'en') ORDER BY id", [q]
    )
    assert ids(rows) == sorted(a.ids)
    rows = db.sql(
        "SELECT id FROM recall(?, k => 3) WHERE lang = 'en' UNION ALL SELECT id FROM recall(?, k => 2)", [q, p]
    )
    assert sorted(ids(rows)) == sorted(a.ids + b.ids)
    rows = db.sql(
        "SELECT lang, count(*) AS n, max(score) AS best FROM recall(?, k => 9) GROUP BY lang ORDER BY lang", [q]
    )
    nine = db.recall(q, k=9)
    assert [(r[0], r[1]) for r in rows] == sorted(
        {(lang, sum(m.metadata["lang"] == lang for m in nine)) for lang in {m.metadata["lang"] for m in nine}}
    )


def test_named_and_numbered_parameters(db):
    q = vec(6)
    want = db.recall(q, k=3, where="lang = 'fr' AND year < 2030").ids
    assert (
        ids(
            db.sql(
                "SELECT id FROM recall($q, k => $k) WHERE lang = $lang AND year < $y ORDER BY score DESC",
                {"q": q, "k": 3, "lang": "fr", "y": 2030},
            )
        )
        == want
    )
    assert (
        ids(
            db.sql(
                "SELECT id FROM recall($1, k => $3) WHERE lang = $2 AND year < 2030 ORDER BY score DESC", [q, "fr", 3]
            )
        )
        == want
    )
    # the query may be a list of numbers or a constant expression
    assert ids(db.sql("SELECT id FROM recall(?, k => 1 + 2) WHERE lang = 'fr' AND year < 2030", [q.tolist()])) == want
    # `?::TYPE` is a parameter and a cast (sqlglot reads `?::` as another dialect's operator)
    assert (
        ids(db.sql("SELECT id FROM recall(?, k => ?::BIGINT) WHERE lang = 'fr' AND year < ?::INT", [q, 3, 2030]))
        == want
    )
    assert db.recall(q, k=3, where="lang = ?::VARCHAR AND year < ?::INT", params=["fr", 2030]).ids == want


def test_injection_through_parameters_stays_data(db):
    before = len(db)
    for evil in ["x' OR '1'='1", "en'; DELETE FROM memories; --", "') UNION SELECT * FROM meta --", "$1", "?"]:
        assert db.sql("SELECT count(*) FROM memories WHERE lang = ?", [evil])[0][0] == 0
        assert db.sql("SELECT id FROM recall(?, k => 5) WHERE lang = ?", [vec(0), evil]) == []
        assert db.sql("SELECT id FROM recall($q, k => 5) WHERE lang = $l", {"q": vec(0), "l": evil}) == []
        with pytest.raises(m3db.InvalidInputError):  # a text is a text, never a vector or SQL
            db.sql("SELECT id FROM recall(?, k => ?)", [vec(0), evil])
    assert len(db) == before and db.check().ok


def test_parameter_mistakes_are_clear(db):
    with pytest.raises(m3db.QueryError, match="has 2 positional parameters, got 1 value"):
        db.sql("SELECT ? + ?", [1])
    with pytest.raises(m3db.QueryError, match="no parameters, but 1 were given"):
        db.sql("SELECT 1", [1])
    with pytest.raises(m3db.QueryError, match="pass params as a dict"):
        db.sql("SELECT $a", [1])
    with pytest.raises(m3db.QueryError, match="pass params as a list"):
        db.sql("SELECT ?", {"a": 1})
    with pytest.raises(m3db.QueryError, match=r"missing \['b'\], unexpected \['c'\]"):
        db.sql("SELECT $a, $b", {"a": 1, "c": 2})
    with pytest.raises(m3db.QueryError, match="Mixing named and positional parameters"):
        db.sql("SELECT ?, $a", [1])
    with pytest.raises(m3db.InvalidInputError, match="params must be a list"):
        db.sql("SELECT ?", "x")


# -- the direct path returns what DuckDB would ------------------------------------------------------

DIRECT = [  # (statement, whether it takes the direct path)
    ("SELECT id, score, text FROM recall(?, k => 6) WHERE lang = 'en' ORDER BY score DESC", True),
    (
        "SELECT r.id AS memory, r.year, r.document_id FROM recall(?, k => 6) r ORDER BY r.score DESC LIMIT 4 OFFSET 1",
        True,
    ),
    ("SELECT TEXT, ID FROM recall(?, k => 5) ORDER BY score DESC", True),
    ("SELECT id FROM recall(?, k => 5) LIMIT 2 OFFSET 10", True),
    ("SELECT id, rating FROM recall(?, k => 5) WHERE rating IS NULL", True),
    ("SELECT * FROM recall(?) WHERE year > 1990 LIMIT 3", False),  # * includes tags, a JSON column
    ("SELECT r.* FROM recall(?, k => 4) AS r WHERE r.rating IS NULL", False),
    ("SELECT lang AS score, score AS s FROM recall(?, k => 5) ORDER BY s DESC", False),
    ("SELECT lang AS score, id FROM recall(?, k => 5) ORDER BY score DESC", False),  # the alias, not the similarity
]


@pytest.mark.parametrize("sql,direct", DIRECT)
def test_direct_path_equals_duckdb(db, sql, direct, monkeypatch):
    q = vec(7)
    assert (query._plan(db, sql).read.direct is not None) == direct
    got = db.sql(sql, [q])
    monkeypatch.setattr(sql_plan, "_direct", lambda *a: None)
    query._CACHE.clear()
    assert query._plan(db, sql).read.direct is None
    want = db.sql(sql, [q])
    query._CACHE.clear()
    assert got.columns == want.columns
    assert [tuple(r) for r in got] == [tuple(r) for r in want]


LIMITS = [
    "",
    " LIMIT 3",
    " LIMIT 2 OFFSET 1",
    " OFFSET 2",
    " LIMIT 0",
    " LIMIT ?",
    " LIMIT 1 OFFSET ?",
    " LIMIT 50%",
    " LIMIT 40 PERCENT",
    " LIMIT 3 OFFSET 9",
]


@pytest.mark.parametrize("sql", [sql for sql, _ in DIRECT])
def test_direct_path_equals_duckdb_with_every_limit(db, sql, monkeypatch):
    base = re.sub(r"\s+(LIMIT|OFFSET)\b.*$", "", sql)
    for limit in LIMITS:
        statement = base + limit
        params = [vec(8)] + [1] * limit.count("?")
        if "%" in limit or "PERCENT" in limit:
            assert query._plan(db, statement).read.direct is None, statement
        got = db.sql(statement, params)
        with monkeypatch.context() as m:
            m.setattr(sql_plan, "_direct", lambda *a: None)
            query._CACHE.clear()
            want = db.sql(statement, params)
        query._CACHE.clear()
        assert got.columns == want.columns, statement
        assert [tuple(r) for r in got] == [tuple(r) for r in want], statement


def test_order_by_score_keeps_recall_order_on_near_ties(tmp_path):
    # bench_sql.py's check: scores 1e-7 apart, ranked by db.recall, re-sorted by DuckDB's
    # ORDER BY score DESC; both paths give db.recall's order only if it is the scores' order
    with m3db.connect(tmp_path / "ties", spec=small_spec()) as d:
        items = []
        for i in range(40):
            e = np.zeros(16, np.float32)
            e[0], e[1] = 1.0, (40 - i) * 1e-4  # a higher id is nearer e0, near the top by < 1e-6
            items.append(make_memory(i, metadata={"bucket": i % 2}, embedding=e))
        d.add_memories(items)
        q = np.zeros(16, np.float32)
        q[0] = 1.0
        for where, params in [("bucket = ?", [1]), ("bucket >= ?", [0])]:
            want = d.recall(q, k=10, where=where, params=params)
            assert want.plan["strategy"] == "exact"
            for select in ("id, score, text", "id, score, upper(text) AS t"):  # direct, through DuckDB
                rows = d.sql(f"SELECT {select} FROM recall(?, k => 10) WHERE {where} ORDER BY score DESC", [q, *params])
                assert ids(rows) == want.ids, (select, where)


def test_direct_path_is_only_taken_for_plain_shapes(db):
    for sql in [
        "SELECT id FROM recall(?) ORDER BY score ASC",
        "SELECT id, upper(text) FROM recall(?)",
        "SELECT DISTINCT lang FROM recall(?)",
        "SELECT id FROM recall(?) WHERE score > 0",
        "SELECT id FROM recall(?) ORDER BY text DESC",
        "SELECT * FROM recall(?)",
        "SELECT r.id FROM recall(?) r, documents d WHERE d.id = r.document_id",
    ]:
        assert query._plan(db, sql).read.direct is None, sql
    assert query._plan(db, "SELECT id, score FROM recall(?) r ORDER BY r.score DESC LIMIT ?").read.direct is not None


# -- writes --------------------------------------------------------------------------------------------


def test_delete_forgets_in_one_transaction(db):
    seq = db.commit_seq
    rows = db.sql("DELETE FROM memories WHERE lang = ?", ["de"])
    assert rows.columns == ["memories_forgotten"] and rows[0][0] == 20
    assert db.commit_seq == seq + 1 and len(db) == 40
    assert all(m.metadata["lang"] != "de" for m in db.recall(vec(0), k=40))
    assert db.sql("SELECT count(*) FROM forgotten")[0][0] == 20
    rows = db.sql("DELETE FROM memories m USING documents d WHERE d.id = m.document_id AND d.source = 'doc1'")
    assert (
        rows[0][0] == 10
        and db.sql("SELECT count(*) FROM memories m JOIN documents d ON d.id = m.document_id WHERE d.source = 'doc1'")[
            0
        ][0]
        == 0
    )
    near = db.recall(vec(1), k=2).ids
    assert db.sql("DELETE FROM memories WHERE id IN (SELECT id FROM recall(?, k => 2))", [vec(1)])[0][0] == 2
    assert not set(near) & set(db.recall(vec(1), k=40).ids)
    assert db.sql("DELETE FROM memories WHERE lang = 'none'")[0][0] == 0
    assert db.check().ok


@pytest.mark.parametrize(
    "sql",
    [
        "WITH d AS (DELETE FROM memories RETURNING id) SELECT * FROM d",
        "WITH d AS (DELETE FROM documents RETURNING id) SELECT count(*) FROM d",
        "WITH u AS (UPDATE memories SET text = 'x' RETURNING id) SELECT * FROM u",
        "WITH i AS (INSERT INTO meta VALUES ('k', 'v') RETURNING key) SELECT * FROM i",
        "SELECT * FROM (WITH d AS (DELETE FROM memories RETURNING id) SELECT * FROM d)",
    ],
)
def test_a_write_hidden_in_a_with_clause_is_refused(db, sql):
    before = (len(db), db.sql("SELECT count(*) FROM documents")[0][0], db.commit_seq)
    with pytest.raises(m3db.QueryError, match="inside a WITH clause or a subquery is not allowed"):
        db.sql(sql)
    assert (len(db), db.sql("SELECT count(*) FROM documents")[0][0], db.commit_seq) == before and db.check().ok


def test_read_only_refuses_writes_with_a_clear_error(db, tmp_path):
    db.close()
    with m3db.connect(tmp_path / "kb", read_only=True) as ro:
        with pytest.raises(m3db.ReadOnlyError, match="open read-only.*--write"):
            ro.sql("DELETE FROM memories WHERE lang = 'fr'")
        with pytest.raises(m3db.ReadOnlyError, match="INSERT INTO documents writes"):
            ro.sql("INSERT INTO documents (text) VALUES ('x')")
        plan = ro.sql("EXPLAIN DELETE FROM memories WHERE lang = 'fr'")  # EXPLAIN writes nothing
        assert plan[0] == ("delete", plan[0][1]) and "20 memories" in plan[0][1]
        assert len(ro) == 60
        assert ids(ro.sql("SELECT id FROM recall(?, k => 3)", [vec(0)])) == ro.recall(vec(0), k=3).ids


REFUSED = [
    ("UPDATE memories SET text = 'x'", "UPDATE is not available"),
    ("DROP TABLE memories", "DROP is not available"),
    ("CREATE TABLE t (a INT)", "CREATE is not available"),
    ("ALTER TABLE memories ADD COLUMN x INT", "ALTER is not available"),
    ("INSERT INTO memories (id) VALUES (1)", "precomputed memories go through db.add_memory"),
    ("INSERT INTO meta VALUES ('a', 'b')", "inserts only into documents"),
    ("DELETE FROM documents WHERE id = 1", "DELETE FROM memories WHERE document_id IN"),
    ("DELETE FROM meta", "deletes only from memories"),
    ("INSERT INTO documents VALUES ('x')", "name the columns"),
    ("INSERT INTO documents (text) VALUES ('x') RETURNING id", "does not take RETURNING"),
    ("INSERT INTO documents (source) VALUES ('x')", "needs a text column"),
    ("INSERT INTO documents (text, id) VALUES ('x', 1)", "id is assigned by m3db"),
    ("INSERT INTO documents (text, source) VALUES ('x')", "names 2 columns .* has 1 values"),
    ("DELETE FROM memories WHERE id = 1 RETURNING id", "does not take RETURNING"),
    ("COPY memories TO 'out.csv'", "COPY statements are not available"),
    ("ATTACH 'other.db'", "ATTACH statements are not available"),
    ("PRAGMA version", "PRAGMA statements are not available"),
    ("SET threads = 1", "SET statements are not available"),
    ("CALL pragma_version()", "CALL statements are not available"),
    ("INSTALL httpfs", "INSTALL statements are not available"),
    ("LOAD httpfs", "LOAD statements are not available"),
    ("SELECT * INTO t FROM memories", 'syntax error at or near "INTO"'),
    ("SELECT * FROM read_csv('x.csv')", "read_csv.* not available"),
    ("SELECT * FROM read_parquet('x.parquet')", "read_parquet.* not available"),
    ("SELECT * FROM read_text('/etc/hostname')", "read_text.* not available"),
    ("SELECT * FROM glob('*')", "glob.* not available"),
    ("SELECT * FROM query('SELECT 1')", "query.* not available"),
    ("SELECT * FROM query_table('memories')", "query_table.* not available"),
    ("SELECT * FROM memories m, LATERAL read_csv(m.text)", "read_csv.* not available"),
    ("SELECT * FROM 'data.csv'", "never files"),
    ('SELECT * FROM "https://example.org/x.parquet"', "never files"),
    ("SELECT * FROM other.main.memories", "name catalog tables alone"),
    ("SELECT * FROM sqlite.t", "never files, URLs or other databases"),
    ("SELECT write_log('x')", "write_log.* acts outside the query"),
    ("SELECT setseed(0.5)", r"setseed\(\) acts outside the query"),
    ("SELECT current_setting('temp_directory')", r"current_setting\(\) .*reads the connection's settings"),
    ("SELECT count(*) FROM memories WHERE lang = current_setting('home_directory')", "current_setting"),
    ("SUMMARIZE 'data/secret.csv'", "SUMMARIZE takes a catalog table or a query"),
    ('SUMMARIZE "data/secret.csv"', "never files"),
    ("DESCRIBE 'data/secret.csv'", "never files"),
    ("SELECT * FROM information_schema.csv", "information_schema.csv is not a view of information_schema"),
    ('SELECT * FROM information_schema."x/../secret.csv"', "not a view of information_schema; its views: .*tables"),
    ('SELECT * FROM (WITH "data/x.csv" AS (SELECT 1) SELECT 1), "data/x.csv"', "never files"),
    ('SELECT * FROM "x.csv" UNION ALL (WITH "x.csv" AS (SELECT 1) SELECT * FROM "x.csv")', "never files"),
    ('WITH a AS (SELECT * FROM "b.csv"), "b.csv" AS (SELECT 1) SELECT * FROM a', "never files"),
    ('WITH "s.csv" AS (SELECT * FROM "s.csv") SELECT 1', "never files"),
    (
        'SELECT count(*) FROM memories WHERE id IN (SELECT 1 FROM (WITH "x.csv" AS (SELECT 1) SELECT 1), "x.csv")',
        "never files",
    ),
    ("SELECT count(*) FROM memories WHERE text IN (SELECT * FROM read_json('x'))", "read_json.* not available"),
    ("SUMMARIZE SELECT * FROM read_csv('x')", "read_csv.* not available"),
    ("SELECT 1; SELECT 2", "one statement at a time, got 2"),
    ("", "the statement is empty"),
    ("-- nothing", "the statement is empty"),
]


@pytest.mark.parametrize("sql,message", REFUSED)
def test_refused_statements(db, sql, message):
    before = db.sql("SELECT count(*) FROM memories")[0][0], db.commit_seq
    with pytest.raises(m3db.QueryError, match=message):
        db.sql(sql)
    assert (db.sql("SELECT count(*) FROM memories")[0][0], db.commit_seq) == before


def test_cte_names_are_resolved_by_scope(db):
    hidden = 'id IN (SELECT 1 FROM (WITH "data/x.csv" AS (SELECT 1) SELECT 1), "data/x.csv")'
    with pytest.raises(m3db.QueryError, match="never files"):
        db.recall(vec(0), k=2, where=hidden)
    with pytest.raises(m3db.QueryError, match="never files"):
        db.sql(f"SELECT * FROM generate('x', filter => '{hidden.replace(chr(39), chr(39) * 2)}')")
    # a CTE is visible in its WITH's query, to the CTEs after it, to itself under RECURSIVE
    for sql, want in [
        ("WITH a AS (SELECT 1 AS x) SELECT * FROM (WITH b AS (SELECT x + 1 AS x FROM a) SELECT x FROM b)", [(2,)]),
        ("WITH a AS (SELECT 1 AS x), b AS (SELECT x + 1 AS x FROM a) SELECT x FROM b", [(2,)]),
        (
            "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) SELECT n FROM t ORDER BY n",
            [(1,), (2,), (3,)],
        ),
        ("WITH a AS (SELECT 1 AS x) SELECT 2 UNION ALL SELECT x FROM a ORDER BY 1", [(1,), (2,)]),
        ("WITH a AS (SELECT 3 AS x) SELECT count(*) FROM memories WHERE id IN (SELECT x FROM a)", [(1,)]),
        ("WITH memories AS (SELECT 1 AS id) SELECT count(*) FROM memories", [(1,)]),
    ]:
        assert db.sql(sql) == want, sql
    assert db.recall(vec(0), k=60, where="id IN (WITH a AS (SELECT 3 AS x) SELECT x FROM a)").ids == [3]
    assert db.sql(
        "WITH old AS (SELECT id FROM memories WHERE year < 1985) DELETE FROM memories WHERE id IN (SELECT id FROM old)"
    ) == [(5,)]


def test_information_schema_has_its_views_only(db):
    views = [
        r[0]
        for r in db.catalog.con.execute(
            "SELECT view_name FROM duckdb_views() WHERE schema_name = 'information_schema' ORDER BY 1"
        ).fetchall()
    ]
    assert tuple(views) == sql_check.INFORMATION_SCHEMA_VIEWS  # a DuckDB upgrade that changes them shows here
    for view in views:
        db.sql(f"SELECT count(*) FROM information_schema.{view}")
    assert ("memories",) in db.sql("SELECT table_name FROM information_schema.tables")


def test_fixed_table_columns_are_the_catalogs(db):
    for table, columns in sql_plan.FIXED_TABLE_COLUMNS.items():
        rows = db.sql(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position", [table]
        )
        assert tuple(ids(rows)) == columns, table


def test_filters_cannot_call_memory_functions(db):
    with pytest.raises(m3db.QueryError, match=r"calls recall\(\): a filter is SQL over the columns of memories"):
        db.recall(vec(0), k=2, where="id IN (SELECT id FROM recall('x'))")
    with pytest.raises(m3db.QueryError, match=r"generate\(\)'s filter => .* calls generate\(\)"):
        db.sql("SELECT * FROM generate('x', filter => 'text IN (SELECT text FROM generate(''y''))')")
    with pytest.raises(m3db.QueryError, match=r"generate\(\)'s filter => cannot hold parameters"):
        db.sql("SELECT * FROM generate('x', filter => 'lang = ?')")


def test_a_filter_sqlglot_itself_fails_on_is_a_query_error(db):
    # found by fuzzing (tests/fuzz/corpus/sql): sqlglot's parser raised a raw IndexError on a
    # lambda with no parameter; a statement already turned it into a QueryError, a filter did not
    with pytest.raises(m3db.QueryError, match=r"cannot be read \(m3db's SQL parser, sqlglot, failed"):
        db.recall(vec(0), k=2, where="list_filter([1], () => 1) IS NOT NULL")
    with pytest.raises(m3db.QueryError):
        db.sql("SELECT id FROM memories WHERE list_filter([1], () => 1) IS NOT NULL")


def test_text_that_is_not_sql_is_refused_at_once_however_deeply_it_nests(db):
    # found by fuzzing (tests/fuzz/corpus/sql): sqlglot's parser backtracks at every level of
    # parentheses of text that is not SQL, twice the time per level: these ran for hours
    import threading

    results = []

    def run():
        for call in (
            lambda: db.sql("DELETE FROM r," + "(FROM r," * 40),
            lambda: db.recall(vec(0), k=2, where="id IN (FROM r," + "(FROM r," * 40),
        ):
            try:
                call()
            except m3db.QueryError as e:
                results.append(str(e))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the parser is still running"
    assert len(results) == 2 and all("syntax error" in r for r in results), results
    # valid text nests as deep as it likes, sqlglot's messages stay for shallow text
    deep = "(" * 20 + "lang = 'en'" + ")" * 20
    assert db.recall(vec(0), k=2, where=deep).ids == db.recall(vec(0), k=2, where="lang = 'en'").ids
    with pytest.raises(m3db.QueryError, match=r"syntax error at line 1, column \d+"):
        db.sql("SELECT ((1)")


# -- errors name the place and the alternatives ------------------------------------------------------


def test_syntax_errors_point_at_the_position(db):
    with pytest.raises(m3db.QueryError, match=r"syntax error at line 1, column 9: Expecting \)") as e:
        db.sql("SELECT (1")
    assert "  SELECT (1\n          ^" in str(e.value)
    with pytest.raises(m3db.QueryError, match=r"line 2, column \d+") as e:
        db.sql("SELECT id\nFROM memories WHERE AND")
    with pytest.raises(m3db.QueryError, match="ends inside a string"):
        db.sql("SELECT 'abc")
    with pytest.raises(m3db.QueryError, match="the end of the statement"):
        db.sql("SELECT * FROM")
    with pytest.raises(m3db.QueryError, match="syntax error"):
        db.sql("SELECT FROM WHERE")


def test_unknown_names_list_the_alternatives(db):
    with pytest.raises(
        m3db.QueryError, match=r"unknown table 'memorie' \(did you mean memories\?\). Tables: documents, memories"
    ):
        db.sql("SELECT * FROM memorie")
    with pytest.raises(m3db.QueryError, match=r"recal\(\) is not available .*did you mean recall\?"):
        db.sql("SELECT * FROM recal(?)", [vec(0)])
    with pytest.raises(m3db.QueryError, match=r'Candidate bindings: .*"lang"'):
        db.sql("SELECT lng FROM memories")
    with pytest.raises(m3db.QueryError, match=r'Did you mean "length"'):
        db.sql("SELECT lenght(text) FROM memories")
    with pytest.raises(m3db.QueryError, match=r"the memory functions are table functions used in FROM"):
        db.sql("SELECT recal('x')")
    with pytest.raises(m3db.QueryError, match=r"recall\(\) is a table function: use it in FROM"):
        db.sql("SELECT recall('x')")
    with pytest.raises(m3db.QueryError, match=r"has no argument 'kk' \(did you mean k\?\); its arguments: query, k"):
        db.sql("SELECT * FROM recall(?, kk => 3)", [vec(0)])
    with pytest.raises(
        m3db.QueryError, match=r"recall\(\) r has the columns id, score, text, document_id, lang, .*tags"
    ):
        db.sql("SELECT r.titel FROM recall(?) r", [vec(0)])
    with pytest.raises(m3db.QueryError, match=r"must be a constant or a parameter, not 'd.title'"):
        db.sql("SELECT * FROM documents d, recall(d.title) r")
    with pytest.raises(m3db.QueryError, match="needs its query"):
        db.sql("SELECT * FROM recall(k => 3)")
    with pytest.raises(m3db.InvalidInputError, match="k must be an integer"):
        db.sql("SELECT * FROM recall(?, k => 0)", [vec(0)])
    with pytest.raises(m3db.InvalidInputError, match="query vector must be"):
        db.sql("SELECT * FROM recall(?)", [[1.0, 2.0]])


# -- EXPLAIN ------------------------------------------------------------------------------------------


def test_explain_shows_the_vector_plan_next_to_duckdbs(db):
    rows = db.sql(
        "EXPLAIN SELECT r.id, d.title FROM recall(?, k => 3) r JOIN documents d ON d.id = r.document_id "
        "WHERE r.lang = 'fr' AND r.score > 0.1",
        [vec(0)],
    )
    assert rows.explain and rows.columns == ["step", "plan"]
    steps = dict(rows)
    assert list(steps) == ["recall r", "sql", "duckdb"]
    text = steps["recall r"]
    assert "filter (pushed down from WHERE): (lang = 'fr')" in text
    assert "allows 20 of 60 memories (selectivity 33.33%)" in text
    assert "search: exact" in text and "candidates fetched: 20; returned: 3" in text
    assert "r.score > 0.1 - score exists only after the search" in text
    assert "HASH_JOIN" in steps["duckdb"].upper().replace(" ", "_")
    rows = db.sql("EXPLAIN ANALYZE SELECT count(*) FROM memories WHERE lang = 'en'")
    assert [s for s, _ in rows] == ["sql", "duckdb"] and "Total Time" in rows[1][1]
    rows = db.sql("EXPLAIN SELECT * FROM recall(?, k => 2)", [vec(0)])
    assert "filter: none (all 60 memories)" in rows[0][1] and "search: " in rows[0][1]


def test_explain_never_runs_the_decoder_nor_searches_twice(db, tmp_path, monkeypatch):
    searches = []
    recall = type(db).recall
    monkeypatch.setattr(type(db), "recall", lambda self, *a, **k: searches.append(1) or recall(self, *a, **k))
    monkeypatch.setattr(type(db), "generate", lambda *a, **k: pytest.fail("EXPLAIN ran the decoder"))
    rows = db.sql("EXPLAIN DELETE FROM memories WHERE id IN (SELECT id FROM recall(?, k => 4))", [vec(0)])
    assert "forget the 4 memories the WHERE matches" in rows[0][1] and len(searches) == 1
    for sql, mode in [
        ("SELECT text FROM generate('x')", "memory"),
        ("SELECT text FROM generate('x', memory => 'rag')", "rag"),
        ("SELECT text FROM generate('x', memory => false)", "none"),
    ]:
        assert f"mode: {mode}, max_tokens: 128" in dict(db.sql("EXPLAIN " + sql))["generate generate"]
    delete = "EXPLAIN DELETE FROM memories WHERE text IN (SELECT text FROM generate('x'))"
    assert "not counted" in db.sql(delete)[0][1]
    db.close()
    with m3db.connect(tmp_path / "kb", read_only=True) as ro:
        assert "not counted" in ro.sql(delete)[0][1] and len(ro) == 60


# -- results -----------------------------------------------------------------------------------------


def test_rows_convert_to_numpy_and_say_which_package_the_others_need(db):
    rows = db.sql("SELECT id, year, lang, rating FROM memories ORDER BY id LIMIT 6")
    arrays = rows.numpy()
    assert arrays["id"].dtype == np.int64 and arrays["id"].tolist() == list(range(6))
    assert arrays["lang"].dtype == object and arrays["rating"][1] is None
    with pytest.raises(m3db.InvalidInputError, match="repeat: rename them"):
        db.sql("SELECT 1 AS a, 2 AS a").numpy()
    for method, package in (("arrow", "pyarrow"), ("df", "pandas")):
        try:
            __import__(package)
        except ImportError:
            with pytest.raises(m3db.errors.DependencyError, match=f"pip install {package}"):
                getattr(rows, method)()
            continue
        table = getattr(rows, method)()
        assert len(table) == 6 and list(table.columns if method == "df" else table.column_names) == rows.columns


def test_plain_sql_matches_duckdb(db):
    for sql in [
        "SELECT lang, count(*) AS n, min(year) FROM memories GROUP BY ALL ORDER BY lang",
        "FROM memories SELECT id, text WHERE year % 7 = 0 ORDER BY id",
        "SELECT * EXCLUDE (embedding, created_at) FROM memories ORDER BY id LIMIT 3",
        "SELECT list_transform([1, 2, 3], lambda x: x * 2) AS l, [x + 1 FOR x IN [1, 2]] AS c",
        "SELECT d.title, count(*) FROM documents d JOIN memories m ON m.document_id = d.id GROUP BY 1 ORDER BY 1",
        "SELECT * FROM range(3) t(i) CROSS JOIN (VALUES ('a'), ('b')) v(s) ORDER BY ALL",
        "WITH y AS (SELECT year FROM memories) SELECT max(year) FROM y",
        "SELECT tags->>'$[1]' AS j, tags::VARCHAR FROM memories ORDER BY id LIMIT 2",
        "DESCRIBE documents",
        "SHOW TABLES",
    ]:
        got = db.sql(sql)
        want = db.catalog.con.execute(sql).fetchall()
        assert [tuple(r) for r in got] == want, sql


def test_new_metadata_columns_reach_recall(db):
    q = vec(0)
    assert "topic" not in db.sql("SELECT * FROM recall(?, k => 1)", [q]).columns
    new = db.add_memory(**make_memory(500, metadata={"topic": "new"}))
    rows = db.sql("SELECT r.id, r.topic FROM recall(?, k => 1) r WHERE r.topic = 'new'", [q])
    assert rows == [(new, "new")]


def test_duckdb_itself_refuses_files_urls_and_extension_downloads(tmp_path):
    """Defence below the SQL checks: the catalog connection cannot reach outside the catalog
    even with SQL that slipped past them (run here on the raw connection)."""
    import duckdb

    secret = tmp_path / "secret.csv"
    secret.write_text("a\nsecret\n")
    with m3db.connect(tmp_path / "kb", spec=small_spec()) as db:
        db.add_memory(**make_memory(0))
        con = db.catalog.con
        for stmt in (
            f"SELECT * FROM '{secret}'",
            f"SELECT * FROM read_csv('{secret}')",
            "INSTALL httpfs",
            "SELECT excel_text(1, '0')",
            "SET enable_external_access = true",
            f"ATTACH '{tmp_path / 'x.db'}'",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(stmt)
        assert con.execute("SELECT count(*) FROM memories").fetchone() == (1,)


def test_max_rows_refuses_past_the_cap_reading_one_row_more(tmp_path):
    with m3db.connect(tmp_path / "kb", spec=small_spec()) as db:
        assert len(db.sql("SELECT * FROM range(5)", max_rows=5)) == 5
        # an endless result is refused after cap + 1 rows, not read to its end
        with pytest.raises(m3db.TooManyRowsError, match="more than 5 rows"):
            db.sql("SELECT * FROM range(100000000000000)", max_rows=5)
        with pytest.raises(m3db.InvalidInputError, match="max_rows must be None or an integer"):
            db.sql("SELECT 1", max_rows=-1)


def test_refusals_name_the_statement_as_written(db):
    for statement, word in (
        ("CHECKPOINT", "CHECKPOINT"),
        ("TRUNCATE memories", "TRUNCATE"),
        ("-- x\nVACUUM", "VACUUM"),
    ):
        with pytest.raises(m3db.QueryError, match=f"^\\[query\\] {word} (statements are|is) not available"):
            db.sql(statement)
    with pytest.raises(m3db.QueryError, match="Simplify the statement") as raised:
        db.sql("SELECT " + "+".join(["1"] * 20000))
    assert "SET" not in str(raised.value)  # DuckDB's advice to SET a limit, which m3db SQL refuses
    n = len(db)
    with pytest.raises(m3db.QueryError, match="generate\\(\\) has the columns text, .* not id: in this DELETE"):
        db.sql("EXPLAIN DELETE FROM memories WHERE id IN (SELECT id FROM generate('x', max_tokens => 2))")
    assert len(db) == n


# text that DuckDB quotes in an error and cuts inside a UTF-8 character: the duckdb package
# then raised Python's UnicodeDecodeError in place of its own error (a 500 from the server's
# search, found by Schemathesis); 2-, 3- and 4-byte characters, long enough to be cut
CUT_TEXT = ("éü€中😀" * 60)[:130]


def test_an_error_message_duckdb_cuts_mid_character_is_a_query_error(tmp_path):
    with m3db.connect(tmp_path / "kb", spec=small_spec()) as db:
        db.add_memory(**make_memory(1, metadata={"tags": {"note": CUT_TEXT}}))
        q = make_memory(1)["embedding"]
        for where in ("tags", "tags > 0", "tags = 1"):  # a JSON column compared as a number or a boolean
            with pytest.raises(m3db.QueryError, match="its message could not be read .* Cast explicitly"):
                db.recall(q, where=where)
        with pytest.raises(m3db.QueryError, match="its message could not be read"):
            db.sql("SELECT ?::JSON", [CUT_TEXT])
        assert db.recall(q, where="json_extract_string(tags, '$.note') = ?", params=[CUT_TEXT]).ids == [0]

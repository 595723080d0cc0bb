"""SQL over a knowledge base (the tiny random decoder of the real architecture and a
feature-hashing embedder): INSERT INTO documents, recall by text, generate(), EXPLAIN."""

import numpy as np
import pytest

pytest.importorskip("torch")
import m3db  # noqa: E402

INSERT = (
    "INSERT INTO documents (text, source, title, lang) VALUES "
    "('Tokyo is the capital of Japan.', 'wiki/Tokyo', 'Tokyo', 'en'), "
    "(?, 'wiki/Paris', 'Paris', 'en'), "
    "('Berlin ist die Hauptstadt Deutschlands.', 'wiki/Berlin', NULL, 'de')"
)


def test_insert_documents_chunks_embeds_and_encodes(kb):
    rows = kb.sql(INSERT, ["Paris is the capital of France. " * 12])
    assert rows.columns == ["documents_added", "documents_skipped", "documents_empty", "memories_added"]
    added, skipped, empty, memories = rows[0]
    assert (added, skipped, empty) == (3, 0, 0) and memories == len(kb) > 3  # Paris is several chunks
    docs = kb.sql("SELECT source, title FROM documents ORDER BY source")
    assert docs == [("wiki/Berlin", None), ("wiki/Paris", "Paris"), ("wiki/Tokyo", "Tokyo")]
    assert kb.sql("SELECT lang, count(DISTINCT document_id) FROM memories GROUP BY lang ORDER BY lang") == [
        ("de", 1),
        ("en", 2),
    ]
    paris = "Paris is the capital of France. " * 12
    assert kb.sql(INSERT, [paris])[0][:2] == (0, 3)  # committed with the same text: skipped (a rerun resumes)
    with pytest.raises(m3db.InvalidInputError, match="source 'wiki/Paris' is already in the database with other text"):
        kb.sql(INSERT, ["again"])  # the same source with other text: refused, nothing written
    assert kb.sql("SELECT count(*) FROM memories")[0][0] == memories
    assert kb.check().ok


def test_insert_from_select_by_name_and_metadata_json(kb):
    kb.sql(
        "INSERT INTO documents (text, source, metadata) "
        "VALUES ('Rome is in Italy.', 'r', '{\"lang\": \"it\", \"year\": 2024}')"
    )
    kb.sql("INSERT INTO documents BY NAME SELECT 'Madrid is in Spain.' AS text, 's' AS source, 1.5 AS weight")
    rows = kb.sql(
        "SELECT d.source, m.lang, m.year, m.weight FROM memories m JOIN documents d ON d.id = m.document_id ORDER BY 1"
    )
    assert rows == [("r", "it", 2024, None), ("s", None, None, 1.5)]
    # a SELECT source may read the catalog, recall included
    kb.sql("INSERT INTO documents (text, source) SELECT 'copy: ' || r.text, 'copy' FROM recall('Rome Italy', k => 1) r")
    assert kb.sql("SELECT count(*) FROM documents WHERE source = 'copy'")[0][0] == 1


def test_insert_is_atomic_and_checks_every_row(kb):
    with pytest.raises(m3db.InvalidInputError, match="row 2: text is NULL"):
        kb.sql("INSERT INTO documents (text, source) VALUES ('ok', 'a'), (NULL, 'b')")
    with pytest.raises(m3db.InvalidInputError, match="row 1: title must be text"):
        kb.sql("INSERT INTO documents (text, title) VALUES ('ok', 42)")
    with pytest.raises(m3db.InvalidInputError, match="metadata must be a JSON object"):
        kb.sql("INSERT INTO documents (text, metadata) VALUES ('ok', '[1, 2]')")
    assert len(kb) == 0 and kb.sql("SELECT count(*) FROM documents")[0][0] == 0
    assert kb.sql("INSERT INTO documents (text) SELECT text FROM memories WHERE false")[0] == (0, 0, 0, 0)


def test_recall_by_text_equals_the_python_api(kb):
    kb.sql(INSERT, ["Paris is the capital of France."])
    for text in ("capital of Japan", "Hauptstadt"):
        want = kb.recall(text, k=2, where="lang = 'en'")
        rows = kb.sql(
            "SELECT r.id, r.score, d.title FROM recall(?, k => 2) r JOIN documents d ON d.id = r.document_id "
            "WHERE r.lang = 'en' ORDER BY r.score DESC",
            [text],
        )
        assert [r[0] for r in rows] == want.ids and np.allclose([r[1] for r in rows], want.scores)
    assert kb.sql(
        "SELECT title FROM recall('capital of Japan', k => 1) r JOIN documents d ON d.id = r.document_id"
    ) == [("Tokyo",)]


def test_generate_returns_the_answer_and_its_sources(kb):
    kb.sql(INSERT, ["Paris is the capital of France."])
    prompt = "What is the capital of Japan?"
    want = kb.generate(prompt, max_tokens=6, memory="rag", k=2, where="lang = 'en'")
    rows = kb.sql(
        "SELECT g.text, g.finish_reason, g.mode, g.sources FROM generate(?, max_tokens => 6, memory => 'rag', "
        "k => 2, filter => 'lang = ''en''') g",
        [prompt],
    )
    text, finish, mode, sources = rows[0]
    assert (text, finish, mode) == (want.text, want.finish_reason, "rag")
    assert [s["id"] for s in sources] == [s.id for s in want.sources]
    assert sources[0].keys() == {"id", "text", "document", "title"}
    flat = kb.sql(
        "SELECT s.id, s.document FROM (SELECT unnest(sources) AS s FROM generate(?, max_tokens => 6, "
        "memory => 'rag', k => 2, filter => 'lang = ''en''')) ORDER BY 1",
        [prompt],
    )
    assert sorted(r[0] for r in flat) == sorted(s.id for s in want.sources)
    none = kb.sql("SELECT mode, len(sources) FROM generate('Hello', max_tokens => 2, memory => false)")
    assert none == [("none", 0)]


def test_generate_arguments_are_checked(kb):
    for sql, error, message in [
        (
            "SELECT * FROM generate('x', max_tokens => 0)",
            m3db.InvalidInputError,
            r"max_tokens must be an integer in \[1, 4096\]",
        ),
        (
            "SELECT * FROM generate('x', memory => 'maybe')",
            m3db.InvalidInputError,
            "memory must be 'memory', 'rag', 'none'",
        ),
        ("SELECT * FROM generate('x', top_p => 0)", m3db.InvalidInputError, r"top_p must be a number in \(0, 1\]"),
        ("SELECT * FROM generate('x', filter => ?)", m3db.QueryError, "a parameter is a value, never SQL"),
        ("SELECT * FROM generate('x', filter => 'lang = ''en'') OR (1')", m3db.QueryError, "is not a SQL condition"),
        ("SELECT * FROM generate('x', filter => 'id IN (SELECT 1 FROM read_csv(''f''))')", m3db.QueryError, "read_csv"),
        ("SELECT * FROM generate('x', temprature => 1)", m3db.QueryError, "did you mean temperature"),
        ("SELECT * FROM generate(42)", m3db.InvalidInputError, "prompt must be a text"),
    ]:
        with pytest.raises(error, match=message):
            kb.sql(sql, ["lang = 'en'"] if "?" in sql else None)


def test_explain_generate_does_not_run_the_decoder(kb, monkeypatch):
    kb.sql(INSERT, ["Paris is the capital of France."])
    monkeypatch.setattr(type(kb), "generate", lambda *a, **k: pytest.fail("EXPLAIN ran the decoder"))
    rows = kb.sql("EXPLAIN SELECT text FROM generate('Where is Tokyo?', max_tokens => 8, filter => 'lang = ''de''') g")
    steps = dict(rows)
    assert "filter: (lang = 'de')" in steps["generate g"] or "filter: lang = 'de'" in steps["generate g"]
    assert "allows 1 of" in steps["generate g"] and "EXPLAIN does not run the decoder" in steps["generate g"]
    assert "mode: memory, max_tokens: 8" in steps["generate g"]
    rows = kb.sql(
        "EXPLAIN DELETE FROM memories WHERE text IN (SELECT text FROM generate('Where is Tokyo?', memory => 'rag'))"
    )
    assert rows[0][0] == "delete" and "not counted" in rows[0][1] and len(kb) > 0
    rows = kb.sql("EXPLAIN INSERT INTO documents (text) VALUES ('x')")
    assert rows[0][0] == "insert" and "Nothing is written by EXPLAIN" in rows[0][1]
    assert kb.sql("SELECT count(*) FROM documents")[0][0] == 3

"""Fuzz the SQL checker: m3db/sql/check.py parse_statement and check_tree (what db.sql() runs
first on a statement) and checked_filter (a recall filter: `db.recall(where=...)`, generate()'s
`filter =>`). Nothing runs: DuckDB only parses (on an empty in-memory connection).

The first byte: bit 0 set, the rest is a statement; clear, a filter. The text is the rest read
as UTF-8 with the bytes that are not UTF-8 kept as lone surrogates (as a command-line argument
carries them). Allowed: QueryError.
"""

import types

import duckdb
from harness import Target, instrumented, main

# sqlglot's tokenizer and parser (of DuckDB's dialect) do the work: instrumented with the checker
SQLGLOT = ("sqlglot.tokens", "sqlglot.tokenizer_core", "sqlglot.parser", "sqlglot.parsers", "sqlglot.dialects.duckdb")
with instrumented("m3db.sql.check", *SQLGLOT):
    from m3db.errors import QueryError
    from m3db.sql import check

DB = types.SimpleNamespace(catalog=types.SimpleNamespace(con=duckdb.connect()))
STATEMENTS = (
    "SELECT lang, count(*) FROM memories GROUP BY lang",
    "SELECT d.title, count(*) AS memories FROM documents d JOIN memories m ON m.document_id = d.id GROUP BY ALL",
    "SELECT id, score, text FROM recall(?, k => 3) WHERE lang = 'en' AND year > ? ORDER BY score DESC",
    "WITH t AS (SELECT id FROM memories WHERE year < 2000) SELECT * FROM t JOIN documents d ON d.id = t.id",
    "SELECT text, sources FROM generate('Who?', max_tokens => 64, filter => 'lang = ''en''')",
    "INSERT INTO documents (text, source, title) VALUES ('Paris is in France.', 'p.md', 'Paris')",
    "DELETE FROM memories WHERE id IN (SELECT id FROM recall('outdated', k => 20) WHERE year < 2020)",
    "EXPLAIN ANALYZE SELECT * FROM information_schema.tables",
    "DESCRIBE memories",
    "SELECT * FROM read_csv('f.csv')",
)
FILTERS = ("lang = 'en' AND year > ?", "document_id IN (SELECT id FROM documents WHERE title LIKE 'P%')", "now() > $t")


def one_input(data: bytes) -> None:
    if not data:
        return
    text = data[1:].decode("utf-8", "surrogateescape")
    if data[0] & 1:
        tree, _ = check.parse_statement(DB, text)
        check.check_tree(tree)
    else:
        sql, volatile = check.checked_filter(text)
        assert isinstance(sql, str) and isinstance(volatile, bool)


def seeds():
    for s in STATEMENTS:
        yield b"\x01" + s.encode()
    for s in FILTERS:
        yield b"\x00" + s.encode()
    yield b"\x01SELECT '\xff'"


TARGET = Target("sql", one_input, (QueryError,), seeds)

if __name__ == "__main__":
    main(TARGET)

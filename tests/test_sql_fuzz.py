"""Fuzzing db.sql(): random statements from a small grammar of the language, and mutations of
them (tokens dropped, repeated, swapped, replaced, text cut), with random parameters.

The contract: a statement either returns Rows or raises a documented query error
(QueryError, ReadOnlyError, InvalidInputError); nothing else, never a crash, and nothing but
INSERT INTO documents and DELETE FROM memories changes the catalog or writes a file.
11,000 statements in the default run, seeded, on a small knowledge base of the tiny decoder.
"""

import os
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
import m3db  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.sql import run as query  # noqa: E402
from m3db.testing import hashed_embedding  # noqa: E402

DOCUMENTED = (m3db.QueryError, m3db.ReadOnlyError, m3db.InvalidInputError)
READ_ONLY_STATEMENTS = 10_000
WRITABLE_STATEMENTS = 1_000

TABLE_COLUMNS = {
    "memories": [
        "id",
        "text",
        "lang",
        "year",
        "document_id",
        "ordinal",
        "token_count",
        "created_at",
        "count(*)",
        "upper(text)",
        "length(text) + year",
        "lang || 'x'",
        "*",
    ],
    "documents": ["id", "source", "title", "uri", "metadata->>'$.lang'", "count(*)", "*"],
    "meta": ["key", "value"],
    "forgotten": ["id", "commit_seq"],
    "codecs": ["name", "version"],
    "memorie": ["id"],
    "'f.csv'": ["*"],
    "read_csv('f.csv')": ["*"],
    "range(3) t(i)": ["i", "i * 2"],
}
CONDITIONS = [
    "lang = 'en'",
    "lang = ?",
    "year > ?",
    "year BETWEEN 1990 AND 2010",
    "text LIKE '%capital%'",
    "document_id IN (SELECT id FROM documents WHERE title = 'Tokyo')",
    "NOT (lang = 'de')",
    "lang IS NULL OR year < 0",
    "id IN (SELECT id FROM recall('capital', k => 2))",
    "year * random() > 0",
    "text = 'x'' OR ''1''=''1'",
    "nope = 1",
    "id = ?",
]
RECALL_COLUMNS = [
    "r.id",
    "r.score",
    "r.text",
    "r.document_id",
    "r.lang",
    "r.year",
    "r.*",
    "d.title",
    "r.nope",
    "round(r.score, 2)",
    "count(*)",
    "r.id AS memory",
]
QUERIES = (
    ["'capital of Japan'"] * 3
    + ["?"] * 6
    + ["'Hauptstadt'", "'a' || ' capital'", "''", "[0.1, 0.2]", "NULL", "42", "d.title"]
)
PROMPTS = ["'What is the capital of Japan?'", "?", "?", "''", "42"]
REFUSED = [
    "UPDATE memories SET text = 'x'",
    "DROP TABLE memories",
    "CREATE TABLE t(a INT)",
    "COPY memories TO 'out.csv'",
    "ATTACH 'x.db' AS x",
    "PRAGMA version",
    "SET threads = 1",
    "CALL pragma_version()",
    "INSTALL httpfs",
    "LOAD httpfs",
    "EXPORT DATABASE 'dir'",
    "SELECT * FROM read_text('out.csv')",
    "CHECKPOINT",
    "INSERT INTO meta VALUES ('a', 'b')",
    "DELETE FROM documents",
    "ALTER TABLE memories ADD COLUMN z INT",
    "SELECT * FROM glob('*')",
    "VACUUM",
    "SELECT write_log('x')",
    "SELECT * FROM query('SELECT 1')",
    "SUMMARIZE 'out.csv'",
    'SELECT * FROM (WITH "f.csv" AS (SELECT 1) SELECT 1), "f.csv"',
    "SELECT * FROM information_schema.csv",
    "SELECT current_setting('temp_directory')",
    "SELECT setseed(0.5)",
]
VOCABULARY = [
    "SELECT",
    "FROM",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "JOIN",
    "LEFT",
    "ON",
    "USING",
    "GROUP",
    "BY",
    "ORDER",
    "LIMIT",
    "OFFSET",
    "UNION",
    "ALL",
    "WITH",
    "AS",
    "EXPLAIN",
    "ANALYZE",
    "INSERT",
    "INTO",
    "VALUES",
    "DELETE",
    "UPDATE",
    "SET",
    "DROP",
    "TABLE",
    "COPY",
    "TO",
    "ATTACH",
    "PRAGMA",
    "recall",
    "generate",
    "read_csv",
    "'x.csv'",
    "k",
    "=>",
    ":=",
    "?",
    "$1",
    "$q",
    "'",
    '"',
    "(",
    ")",
    ",",
    ";",
    "*",
    "=",
    "<",
    ">",
    "-",
    "/*",
    "*/",
    "--",
    "0",
    "1",
    "-1",
    "1e309",
    "99999999999999999999",
    "NULL",
    "TRUE",
    "'en'",
    "r",
    "d",
    "memories",
    "documents",
    "meta",
    "lang",
    "year",
    "score",
    "text",
    "id",
    "max_tokens",
    "memory",
    "'rag'",
    "filter",
    "[0.5, 0.5]",
    "::",
    "INTEGER",
    "CASE",
    "WHEN",
    "THEN",
    "END",
    "IN",
    "LATERAL",
    "$$x$$",
]
TOKEN = re.compile(r"'(?:[^']|'')*'|\$\$.*?\$\$|\w+|=>|:=|::|<>|>=|<=|\$\w+|\S")


class HashEmbedder:
    dim, fingerprint = 256, "feature-hashing-256"

    def embed(self, texts):
        return np.stack([hashed_embedding(t) for t in texts])


DOCS = [
    ("Tokyo is the capital of Japan and its largest city.", "Tokyo", "en", 2001),
    ("Paris is the capital of France, on the Seine.", "Paris", "en", 1999),
    ("Berlin ist die Hauptstadt Deutschlands.", "Berlin", "de", 2010),
    ("Canberra is the capital of Australia.", "Canberra", "en", 1985),
    ("Nairobi is the capital of Kenya.", "Nairobi", None, 2020),
    ("Ottawa is the capital of Canada.", "Ottawa", "en", None),
]


class Generator:
    """Statements from a small grammar of the language; each `?` it writes is recorded with
    the kind of value that fits it, so that most statements run and reach the planner."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.slots = []

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def maybe(self, p):
        return self.rng.random() < p

    def fill(self, text, kind):
        self.slots += [kind] * text.count("?")
        return text

    def where(self, qualify=""):
        parts = [self.pick(CONDITIONS) for _ in range(int(self.rng.integers(1, 3)))]
        if qualify:
            parts = [
                re.sub(r"\b(lang|year|text|document_id|id|nope)\b", qualify + r"\1", p) if "SELECT" not in p else p
                for p in parts
            ]
        kinds = {"lang": "text", "year": "int", "id": "int"}
        for p in parts:
            self.slots += [kinds[column] for column in re.findall(r"(\w+) [=>] \?", p)]
        return " WHERE " + f" {self.pick(['AND', 'AND', 'OR'])} ".join(parts)

    def statement(self):
        self.slots = []
        # generate() runs the decoder: rare, so the run stays short
        kind = self.pick(["select"] * 6 + ["recall"] * 12 + ["generate"] + ["insert", "delete", "refused"] * 2)
        if kind == "select":
            table = self.pick(list(TABLE_COLUMNS))
            columns = ", ".join(self.pick(TABLE_COLUMNS[table]) for _ in range(int(self.rng.integers(1, 3))))
            s = f"SELECT {columns} FROM {table}" + (self.where() if table == "memories" and self.maybe(0.6) else "")
            s += f" ORDER BY {self.pick(['1', 'ALL', '1 DESC'])}" if self.maybe(0.3) else ""
        elif kind == "recall":
            query = self.fill(self.pick(QUERIES), "query")
            k = self.fill(self.pick(["1", "3", "3", "5", "?", "?", "0", "10001", "2.5", "NULL"]), "int")
            columns = ", ".join(self.pick(RECALL_COLUMNS) for _ in range(int(self.rng.integers(1, 4))))
            s = (
                f"SELECT {columns} FROM recall({query}, k => {k}) r"
                if self.maybe(0.7)
                else f"SELECT {columns} FROM recall({query}) r"
            )
            if "k =>" not in s:
                self.slots = self.slots[:1] if query == "?" else []
            if self.maybe(0.3):
                s += f" {self.pick(['JOIN', 'LEFT JOIN'])} documents d ON d.id = r.document_id"
            s += self.where("r.") if self.maybe(0.7) else ""
            s += " ORDER BY r.score DESC" if self.maybe(0.5) else ""
            s += (
                f" LIMIT {self.fill(self.pick(['2', '?', '0', '5 OFFSET 1', '50%']), 'int')}" if self.maybe(0.4) else ""
            )
            if self.maybe(0.1):
                s = f"WITH hits AS ({s}) SELECT count(*) FROM hits"
            if s.count("?") == 1 and self.slots == ["query"] and self.maybe(0.3):
                s = s.replace("?", "$v")  # a named parameter instead
        elif kind == "generate":
            memory = self.pick(["'rag'", "'none'", "'memory'", "false", "'maybe'"])
            where = ", filter => 'lang = ''en'''" if self.maybe(0.3) else ""
            prompt = self.fill(self.pick(PROMPTS), "prompt")
            s = (
                f"SELECT {self.pick(['text', 'mode', 'sources', '*', 'len(sources)'])} FROM generate("
                f"{prompt}, max_tokens => {self.pick(['1', '2', '0'])}, memory => {memory}{where}) g"
            )
        elif kind == "insert":
            s = self.fill(
                "INSERT INTO documents (text, source, lang) VALUES ('Lima is the capital of Peru.', "
                f"'fz{self.rng.integers(5)}', ?)",
                "text",
            )
        elif kind == "delete":
            s = "DELETE FROM memories" + self.where()
        else:
            s = self.pick(REFUSED)
        if self.maybe(0.1):
            s = self.pick(["EXPLAIN ", "EXPLAIN ANALYZE "]) + s
        return s

    def mutate(self, statement):
        tokens = TOKEN.findall(statement)
        for _ in range(int(self.rng.integers(1, 4))):
            if not tokens:
                break
            i = int(self.rng.integers(len(tokens)))
            op = self.pick(["drop", "repeat", "swap", "replace", "insert", "cut", "char"])
            if op == "drop":
                del tokens[i]
            elif op == "repeat":
                tokens.insert(i, tokens[i])
            elif op == "swap" and i + 1 < len(tokens):
                tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
            elif op == "replace":
                tokens[i] = self.pick(VOCABULARY)
            elif op == "insert":
                tokens.insert(i, self.pick(VOCABULARY))
            elif op == "cut":
                tokens = tokens[:i]
            else:
                tokens[i] = tokens[i][: max(0, len(tokens[i]) - 1)] + self.pick(list("'\"();$?\\\x00é"))
        return " ".join(tokens)

    def value(self, kind):
        fits = {
            "query": [hashed_embedding("capital of Japan"), "capital of France", "Hauptstadt"],
            "int": [2, 3, 2000],
            "text": ["en", "de", "x' OR 1=1 --"],
            "prompt": ["Where is Tokyo?"],
        }
        anything = [
            hashed_embedding("Tokyo"),
            "capital",
            "en",
            2000,
            3,
            None,
            1.5,
            [0.1, 0.2],
            "x' OR 1=1 --",
            {"a": 1},
            b"\xff",
            -1,
            "",
            float("nan"),
            object(),
            np.zeros(256, np.float32),
        ]
        return self.pick(fits[kind]) if kind in fits and self.maybe(0.9) else self.pick(anything)

    def params(self, statement):
        if "$v" in statement:
            return {"v": self.value("query")} if self.maybe(0.9) else [self.value("query")]
        count = statement.count("?")
        kinds = self.slots if count == len(self.slots) else ["any"] * count  # a mutation moved placeholders
        if self.maybe(0.05):
            kinds = kinds + ["any"] if self.maybe(0.5) else kinds[:-1]
        return [self.value(k) for k in kinds] if kinds else (None if self.maybe(0.95) else [self.value("any")])


def snapshot(db):
    con = db.catalog.con
    tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
    return tables, {t: con.execute(f'SELECT * FROM "{t}" ORDER BY ALL').fetchall() for t in tables}


def run(db, gen, count, on_success=None):
    outcomes = {"rows": 0, "errors": 0}
    for i in range(count):
        statement = gen.statement()
        if gen.maybe(0.6):
            statement = gen.mutate(statement)
        params = gen.params(statement)
        try:
            db.sql(statement, params)
        except DOCUMENTED:
            outcomes["errors"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point: report any other error with its statement
            pytest.fail(f"statement #{i} raised {type(e).__name__}: {e}\nstatement: {statement!r}\nparams: {params!r}")
        outcomes["rows"] += 1
        if on_success:
            on_success(statement)
    return outcomes


@pytest.fixture(scope="module")
def kb_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "kb"
    with m3db.connect(path, model=MemoryModel.tiny(), embedder=HashEmbedder()) as db:
        db.add_documents(
            [
                {"text": text, "source": f"wiki/{title}", "title": title, "metadata": {"lang": lang, "year": year}}
                for text, title, lang, year in DOCS
            ],
            progress=False,
        )
    return path


def test_fuzz_read_only(kb_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a file written by a statement would land here
    query._CACHE.clear()
    with m3db.connect(kb_path, read_only=True, model=MemoryModel.tiny(), embedder=HashEmbedder()) as db:
        before = snapshot(db)
        outcomes = run(db, Generator(seed=1), READ_ONLY_STATEMENTS)
        assert snapshot(db) == before
        assert db.check().ok
    assert os.listdir(tmp_path) == []
    # the fuzz must reach past the parser: many statements run, many are refused
    assert outcomes["rows"] > READ_ONLY_STATEMENTS // 10 and outcomes["errors"] > READ_ONLY_STATEMENTS // 10, outcomes


def test_fuzz_writable(kb_path, tmp_path, monkeypatch):
    path = tmp_path / "kb"
    shutil.copytree(kb_path, path)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    with m3db.connect(path, model=MemoryModel.tiny(), embedder=HashEmbedder()) as db:
        tables, _ = snapshot(db)
        meta_keys = sorted(r[0] for r in db.sql("SELECT key FROM meta"))
        seq = [db.commit_seq]

        def only_writes_commit(statement):
            # a read leaves the commit where it was; an INSERT or DELETE commits at most once
            grew = db.commit_seq - seq[0]
            plan = query._plan(db, statement)
            assert grew == 0 or (grew == 1 and plan.kind in ("insert", "delete") and not plan.explain), statement
            seq[0] = db.commit_seq

        outcomes = run(db, Generator(seed=2), WRITABLE_STATEMENTS, only_writes_commit)
        assert snapshot(db)[0] == tables
        assert sorted(r[0] for r in db.sql("SELECT key FROM meta")) == meta_keys
        assert db.check().ok
    assert os.listdir(work) == []
    assert outcomes["rows"] > WRITABLE_STATEMENTS // 10, outcomes

"""The Python API: round trips, transactions, reopen, and every bad input a clear error with
nothing written."""

import os

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db


def state(db):
    """Everything a user can observe, for before/after comparisons."""
    rows = db.sql("SELECT id, text, document_id, ordinal FROM memories ORDER BY id")
    return len(db), list(rows), db.segments.mark()


def test_add_get_round_trip(tmp_db):
    item = make_memory(
        1,
        metadata={"lang": "en", "year": 2024, "score": 0.5, "ok": True, "tags": ["a"]},
        document="wiki/Paris",
        ordinal=2,
        token_count=17,
    )
    mid = tmp_db.add_memory(**item)
    m = tmp_db.get(mid)
    assert isinstance(m, m3db.Memory)
    # the default test spec uses int8: within its bound, not bit-exact
    assert np.allclose(m.keys, item["keys"], atol=np.abs(item["keys"]).max() / 127)
    assert np.array_equal(m.positions, item["positions"])
    assert m.text == item["text"] and m.ordinal == 2
    assert m.metadata == {"lang": "en", "year": 2024, "score": 0.5, "ok": True, "tags": ["a"]}
    row = tmp_db.sql("SELECT lang, year, score, ok, token_count FROM memories WHERE id = ?", [mid])
    assert list(row) == [("en", 2024, 0.5, True, 17)]
    doc = tmp_db.sql("SELECT d.source FROM documents d JOIN memories m ON m.document_id = d.id")
    assert list(doc) == [("wiki/Paris",)]


def test_f32_spec_is_bit_exact(tmp_path):
    with m3db.connect(tmp_path / "f32", spec=small_spec(codec="f32")) as db:
        item = make_memory(3)
        m = db.get(db.add_memory(**item))
        assert np.array_equal(m.keys, item["keys"]) and np.array_equal(m.values, item["values"])


def test_batched_add_returns_ids_in_order(mem_db):
    ids = mem_db.add_memories([make_memory(i) for i in range(10)])
    assert ids == list(range(10)) and len(mem_db) == 10
    assert [mem_db.get(i).text for i in ids] == [f"reference text number {i}" for i in range(10)]


def test_reopen_equals_before(tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memories([make_memory(i, metadata={"k": i}) for i in range(30)])
        db.forget([3, 4])
        before = state(db)[:2]
        q = make_memory(99)["embedding"]
        recalled = db.recall(q, k=5).ids
    with m3db.connect(path) as db:
        assert state(db)[:2] == before
        assert db.recall(q, k=5).ids == recalled
        assert db.add_memory(**make_memory(100)) == 30  # ids are never reused
        assert db.check().ok


def test_memory_database_is_private_and_removed(mem_db):
    directory = mem_db.directory
    mem_db.add_memory(**make_memory(0))
    assert os.path.isdir(directory)
    mem_db.close()
    assert not os.path.exists(directory)


def test_transaction_commits_all_or_nothing(tmp_db):
    tmp_db.add_memory(**make_memory(0))
    before = state(tmp_db)
    with pytest.raises(RuntimeError):
        with tmp_db.transaction():
            tmp_db.add_memory(**make_memory(1))
            tmp_db.add_memory(**make_memory(2))
            raise RuntimeError("boom")
    assert state(tmp_db) == before
    with tmp_db.transaction():
        a = tmp_db.add_memory(**make_memory(3))
        tmp_db.forget(0)
    assert len(tmp_db) == 1 and tmp_db.get(a).text.endswith("3")


def test_forget_removes_from_recall_at_once(mem_db):
    ids = mem_db.add_memories([make_memory(i) for i in range(50)])
    q = make_memory(7)["embedding"]
    top = mem_db.recall(q, k=1).ids[0]
    assert top == 7  # its own embedding
    mem_db.forget(top)
    for k in (1, 5, 49):
        assert top not in mem_db.recall(q, k=k).ids
    with pytest.raises(m3db.NotFoundError):
        mem_db.get(top)
    with pytest.raises(m3db.NotFoundError, match="no memory with id 7"):
        mem_db.forget(top)
    assert len(mem_db) == len(ids) - 1


def test_compact_reclaims_space_and_keeps_memories(tmp_path):
    with m3db.connect(tmp_path / "kb", spec=small_spec(), config={"segment_size": 8192}) as db:
        db.add_memories([make_memory(i) for i in range(60)])
        assert len(db.segments.numbers()) > 1  # sealed at the size limit
        db.forget(list(range(0, 60, 2)))
        out = db.compact()
        assert out["bytes_after"] < out["bytes_before"] * 0.6
        assert [db.get(i).text for i in range(1, 60, 2)] == [f"reference text number {i}" for i in range(1, 60, 2)]
        assert db.check().ok
    with m3db.connect(tmp_path / "kb") as db:
        assert len(db) == 30 and db.check().ok


def test_sql_is_read_only(tmp_db):
    tmp_db.add_memory(**make_memory(0))
    for stmt in (
        "UPDATE memories SET text = 'x'",
        "DROP TABLE memories",
        "INSERT INTO meta VALUES ('a', 'b')",
        "SELECT 1; DELETE FROM memories",
        "ATTACH 'x.db'",
        "COPY memories TO 'x.csv'",
    ):
        with pytest.raises(m3db.QueryError):
            tmp_db.sql(stmt)
    assert len(tmp_db) == 1
    rows = tmp_db.sql("SELECT count(*) AS n FROM memories")
    assert rows.columns == ["n"] and rows[0][0] == 1 and rows.dicts() == [{"n": 1}]
    with pytest.raises(m3db.QueryError, match='column "nope" not found'):
        tmp_db.sql("SELECT nope FROM memories")


# -- bad input: a clear error and nothing written -----------------------------------------------

BAD = [
    ("keys wrong shape", dict(keys=np.zeros((2, 2, 4, 7), np.float32)), m3db.InvalidInputError, "shape"),
    ("too many tokens", dict(keys=np.zeros((2, 2, 5, 8), np.float32)), m3db.InvalidInputError, "shape|tokens"),
    ("float64 keys", dict(keys=np.zeros((2, 2, 4, 8))), m3db.InvalidInputError, "astype"),
    ("int values", dict(values=np.zeros((2, 2, 4, 8), np.int32)), m3db.InvalidInputError, "dtype"),
    ("NaN keys", "nan", m3db.InvalidInputError, "NaN"),
    ("inf values", "inf", m3db.InvalidInputError, "NaN or infinite"),
    (
        "position too large",
        dict(positions=np.full((2, 2, 4), 200, np.int64)),
        m3db.InvalidInputError,
        "reference_length",
    ),
    ("negative position", dict(positions=-np.ones((2, 2, 4), np.int64)), m3db.InvalidInputError, "reference_length"),
    ("float positions", dict(positions=np.zeros((2, 2, 4), np.float32)), m3db.InvalidInputError, "integer"),
    ("repeated positions", dict(positions=np.zeros((2, 2, 4), np.uint8)), m3db.InvalidInputError, "repeat"),
    ("embedding wrong dim", dict(embedding=np.ones(15, np.float32)), m3db.InvalidInputError, r"\(16,\)"),
    ("zero embedding", dict(embedding=np.zeros(16, np.float32)), m3db.InvalidInputError, "zeros"),
    ("empty text", dict(text="  "), m3db.InvalidInputError, "non-empty"),
    ("bytes text", dict(text=b"abc"), m3db.InvalidInputError, "non-empty string"),
    ("metadata object", dict(metadata={"when": object()}), m3db.InvalidInputError, "metadata 'when'"),
    ("metadata NaN", dict(metadata={"x": float("nan")}), m3db.InvalidInputError, "finite"),
    ("metadata bad key", dict(metadata={"bad key": 1}), m3db.InvalidInputError, "identifier"),
    ("metadata builtin key", dict(metadata={"text": "x"}), m3db.InvalidInputError, "collides"),
    ("negative id", dict(id=-1), m3db.InvalidInputError, "non-negative"),
    ("string id", dict(id="7"), m3db.InvalidInputError, "non-negative"),
    ("unknown field", dict(colour="red"), m3db.InvalidInputError, "unknown fields"),
    ("missing document id", dict(document=999), m3db.NotFoundError, "no document"),
]


@pytest.mark.parametrize("name,change,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_nothing_written(tmp_db, name, change, error, match):
    tmp_db.add_memory(**make_memory(0, metadata={"x": 1.5}))
    before = state(tmp_db)
    item = make_memory(1)
    if change == "nan":
        item["keys"][0, 0, 0, 0] = np.nan
    elif change == "inf":
        item["values"][1, 1, 1, 1] = np.inf
    else:
        item.update(change)
    with pytest.raises(
        TypeError if name == "unknown field" else error, match=None if name == "unknown field" else match
    ):
        tmp_db.add_memory(**item)  # an unknown keyword is Python's own TypeError
    # a bad item in a batch stops the whole batch
    with pytest.raises(error, match=match):
        tmp_db.add_memories([make_memory(5), item])
    assert state(tmp_db) == before
    assert tmp_db.check().ok


def test_colliding_and_repeated_ids(tmp_db):
    tmp_db.add_memory(**make_memory(0), id=10)
    before = state(tmp_db)
    with pytest.raises(m3db.DuplicateIdError, match="already"):
        tmp_db.add_memory(**make_memory(1), id=10)
    with pytest.raises(m3db.DuplicateIdError, match="repeat"):
        tmp_db.add_memories([make_memory(1, id=20), make_memory(2, id=20)])
    assert state(tmp_db) == before
    assert tmp_db.add_memory(**make_memory(3)) == 11  # auto ids continue past explicit ones


def test_metadata_type_conflict(tmp_db):
    tmp_db.add_memory(**make_memory(0, metadata={"year": 2020}))
    with pytest.raises(m3db.InvalidInputError, match="one type per metadata key"):
        tmp_db.add_memory(**make_memory(1, metadata={"year": "2020"}))
    tmp_db.add_memory(**make_memory(2, metadata={"year": None}))  # NULL is fine
    assert len(tmp_db) == 2


def test_spec_mismatch_names_both_sides(tmp_path):
    path = tmp_path / "kb"
    m3db.connect(path, spec=small_spec()).close()
    with pytest.raises(
        m3db.SpecMismatchError, match="model_fingerprint: the database has 'test-model', the given spec has 'other'"
    ):
        m3db.connect(path, spec=small_spec(model_fingerprint="other"))
    with m3db.connect(path, spec=small_spec()) as db:  # the same spec opens
        assert db.spec == small_spec()


def test_failed_creation_writes_nothing(tmp_path):
    with pytest.raises(m3db.NotFoundError):
        m3db.connect(tmp_path / "new", read_only=True)
    assert not os.path.exists(tmp_path / "new")
    with pytest.raises(m3db.InvalidInputError, match="unknown memory spec fields"):
        m3db.connect(tmp_path / "new2", spec={**small_spec().to_dict(), "colour": 1})
    assert not os.path.exists(tmp_path / "new2")


def test_invalid_specs():
    with pytest.raises(m3db.InvalidInputError, match="tokens_per_head"):
        small_spec(tokens_per_head=0)
    with pytest.raises(m3db.InvalidInputError, match="uint8"):
        small_spec(reference_length=300)
    with pytest.raises(m3db.InvalidInputError, match="known codecs"):
        small_spec(codec="zip")
    with pytest.raises(m3db.InvalidInputError, match="unknown memory spec fields"):
        m3db.MemorySpec.from_dict({**small_spec().to_dict(), "colour": 1})


def test_config_rejects_unknown_keys(tmp_path):
    with pytest.raises(m3db.InvalidInputError, match="known keys"):
        m3db.connect(tmp_path / "kb", spec=small_spec(), config={"segment_sz": 1})


def test_closed_database(tmp_path):
    db = m3db.connect(tmp_path / "kb", spec=small_spec())
    db.close()
    for call in (
        lambda: db.add_memory(**make_memory(0)),
        lambda: db.get(0),
        lambda: len(db),
        lambda: db.recall(np.ones(16, np.float32)),
        lambda: db.sql("SELECT 1"),
    ):
        with pytest.raises(m3db.ClosedError, match="closed"):
            call()


def test_read_only_refuses_writes(tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memory(**make_memory(0))
    with m3db.connect(path, read_only=True) as db:
        assert len(db) == 1 and db.get(0).text
        with pytest.raises(m3db.ReadOnlyError, match="read_only"):
            db.add_memory(**make_memory(1))
        with pytest.raises(m3db.ReadOnlyError):
            db.forget(0)
        with pytest.raises(m3db.ReadOnlyError):
            db.compact()


def test_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("hello")
    with pytest.raises(m3db.InvalidInputError, match="is a file"):
        m3db.connect(f, spec=small_spec())


def test_errors_subclass_builtins_and_have_codes():
    assert issubclass(m3db.NotFoundError, KeyError) and issubclass(m3db.InvalidInputError, ValueError)
    assert issubclass(m3db.LockedError, OSError) and issubclass(m3db.ReadOnlyError, PermissionError)
    assert str(m3db.NotFoundError("no memory with id 3")) == "[not_found] no memory with id 3"


def test_import_does_not_import_torch():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import sys, m3db; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_document_dict_creates_document_with_fields(mem_db):
    doc = {"source": "wiki/Paris", "title": "Paris", "uri": "https://example.org/Paris", "metadata": {"lang": "en"}}
    a = mem_db.add_memory(**make_memory(0, document=doc, ordinal=0, token_count=12))
    b = mem_db.add_memory(**make_memory(1, document=doc, ordinal=1))
    rows = mem_db.sql(
        "SELECT d.source, d.title, d.uri, d.metadata->>'lang', count(*) FROM documents d "
        "JOIN memories m ON m.document_id = d.id GROUP BY ALL"
    )
    assert list(rows) == [("wiki/Paris", "Paris", "https://example.org/Paris", "en", 2)]
    assert mem_db.get(a).token_count == 12 and mem_db.get(b).ordinal == 1
    with pytest.raises(m3db.InvalidInputError, match="source"):
        mem_db.add_memory(**make_memory(2, document={"title": "no source"}))
    with pytest.raises(m3db.InvalidInputError, match="unknown document fields"):
        mem_db.add_memory(**make_memory(2, document={"source": "x", "author": "me"}))


def test_get_many_keeps_order_and_refuses_unknown_ids(mem_db):
    ids = mem_db.add_memories([make_memory(i) for i in range(5)])
    assert [m.id for m in mem_db.get_many(ids[::-1])] == ids[::-1]
    with pytest.raises(m3db.NotFoundError):
        mem_db.get_many([ids[0], 999])


def test_a_bad_memory_mode_is_refused_before_anything_is_made(tmp_path):
    with pytest.raises(m3db.InvalidInputError, match="memory_mode='medium': expected one of 'dense', 'sparse'"):
        m3db.connect(tmp_path / "a", memory_mode="medium")
    with pytest.raises(m3db.InvalidInputError, match="not both"):
        m3db.connect(tmp_path / "b", memory_mode="sparse", spec=small_spec())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_document_forgotten_and_added_again_in_one_transaction_is_kept(kb):
    # the add saw the committed catalog, found the same text stored and skipped it; the commit
    # then forgot the memories, and the document was gone
    kb.add_documents([{"text": "Vell is the capital of Zorblax.", "source": "z"}], progress=False)
    old = [r[0] for r in kb.sql("SELECT id FROM memories")]
    with kb.transaction():
        kb.forget(old)
        kb.add_documents([{"text": "Vell is the capital of Zorblax.", "source": "z"}], replace=True, progress=False)
    rows = kb.sql("SELECT m.text FROM memories m JOIN documents d ON m.document_id = d.id WHERE d.source = 'z'")
    assert [r[0] for r in rows] == ["Vell is the capital of Zorblax."]
    assert not set(old) & {r[0] for r in kb.sql("SELECT id FROM memories")}

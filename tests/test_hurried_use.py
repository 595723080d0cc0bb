"""Issue 13's findings, each pinned: damage that must not destroy data, writes that must not lie,
and what a hurried user types (a typo in a path, an empty path, the same source twice)."""

import errno
import functools
import os
import pathlib

import hypothesis.strategies as st
import numpy as np
import pytest
from conftest import make_memory, small_spec
from hypothesis import HealthCheck, given, settings

import m3db
from m3db.storage.catalog import BUILTIN_COLUMNS


def _filled(path, n=5):
    with m3db.connect(path, spec=small_spec()) as db:
        ids = db.add_memories([make_memory(i, metadata={"n": i}) for i in range(n)])
    return ids


def _files(path):
    return sorted(str(p.relative_to(path)) for p in pathlib.Path(path).rglob("*") if p.is_file())


# -- damage and loss ---------------------------------------------------------------------------


def test_a_deleted_catalog_is_refused_and_every_segment_kept(tmp_path):
    path = tmp_path / "kb.m3db"
    _filled(path)
    os.remove(path / "catalog.duckdb")
    segments = sorted((path / "segments").iterdir())
    sizes = [p.stat().st_size for p in segments]
    assert segments
    for read_only in (False, True):
        with pytest.raises(m3db.FormatError, match="catalog.duckdb is missing"):
            m3db.connect(path, spec=small_spec(), read_only=read_only)
    assert sorted((path / "segments").iterdir()) == segments
    assert [p.stat().st_size for p in segments] == sizes


def test_pack_refuses_a_target_inside_the_database(tmp_path):
    path = tmp_path / "kb.m3db"
    _filled(path)
    with m3db.connect(path) as db:
        before = _files(path)
        for target in (path / "catalog.duckdb", path / "kb.m3kb", path / "segments" / "x.m3kb", path):
            with pytest.raises(m3db.InvalidInputError, match="inside the database"):
                db.pack(target, overwrite=True)
        assert _files(path) == before
    with m3db.connect(path) as db:
        assert len(db) == 5 and db.check().ok


def test_pack_removes_temporary_files_of_dead_processes(tmp_path):
    path = tmp_path / "kb.m3db"
    _filled(path)
    target = tmp_path / "kb.m3kb"
    dead = tmp_path / "kb.m3kb.tmp-999999999"  # no such process: a killed pack's leftover
    dead.write_bytes(b"half a package")
    with m3db.connect(path) as db:
        db.pack(target)
    assert not dead.exists() and m3db.verify(target).ok


# -- writes that lie -----------------------------------------------------------------------------


def test_returned_memories_do_not_share_state_with_the_cache(tmp_db):
    mid = tmp_db.add_memory(**make_memory(1, metadata={"lang": "en", "tags": ["a"]}))
    m = tmp_db.get(mid)
    m.metadata["lang"] = "xx"
    m.metadata["tags"].append("b")
    with pytest.raises(ValueError):
        m.keys.setflags(write=True)
    again = tmp_db.get(mid)
    assert again.metadata == {"lang": "en", "tags": ["a"]}
    assert tmp_db.recall(make_memory(1)["embedding"], k=1)[0].metadata == {"lang": "en", "tags": ["a"]}


def test_an_embedding_beyond_float16_is_normalized_not_lost(tmp_db):
    big = np.full(16, 1e5, np.float32)
    mid = tmp_db.add_memory(**make_memory(1, embedding=big))
    tmp_db.add_memories([make_memory(i) for i in range(2, 6)])
    for where in (None, "id >= 0"):
        matches = tmp_db.recall(big, k=1, where=where)
        assert matches.ids == [mid] and np.isfinite(matches.scores).all() and matches.scores[0] > 0.99


# -- the first things a user types -------------------------------------------------------------


def test_a_package_path_with_a_typo_is_not_found_and_creates_nothing(tmp_path):
    with pytest.raises(m3db.NotFoundError, match="no package file"):
        m3db.connect(tmp_path / "typo.m3kb")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, error", [("", "empty"), ("kb\x00.m3db", "NUL")])
def test_unusable_paths_are_refused(tmp_path, bad, error):
    with pytest.raises(m3db.InvalidInputError, match=error):
        m3db.connect(bad, spec=small_spec())


def test_a_path_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(m3db.InvalidInputError, match="is a file"):
        m3db.connect(tmp_path / "notes.txt" / "kb.m3db", spec=small_spec())


# -- a write accepts exactly what a read returns -------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(lambda k: k not in BUILTIN_COLUMNS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metadata=st.dictionaries(names, json_values, max_size=4), text=st.text(min_size=1).filter(str.strip))
def test_what_add_accepts_get_returns_equal(mem_db, metadata, text):
    try:
        mid = mem_db.add_memory(**make_memory(1, text=text, metadata=metadata))
    except m3db.InvalidInputError:
        # refused with a reason: one key holding two types across examples, or a surrogate
        return
    m = mem_db.get(mid)
    assert m.text == text
    assert m.metadata == metadata


@pytest.mark.parametrize(
    "metadata, error",
    [
        ({"tags": {1: "x"}}, "keys must be strings"),
        ({"tags": ("a", "b")}, "holds a tuple"),
        ({"note": "bad \udcff byte"}, "not valid Unicode"),
        ({"deep": functools.reduce(lambda v, _: [v], range(5000), 0)}, "nest deeper"),
    ],
)
def test_metadata_that_would_not_read_back_is_refused(tmp_db, metadata, error):
    with pytest.raises(m3db.InvalidInputError, match=error):
        tmp_db.add_memory(**make_memory(1, metadata=metadata))
    assert len(tmp_db) == 0 and tmp_db.check().ok


def test_text_that_would_not_read_back_is_refused(tmp_db):
    with pytest.raises(m3db.InvalidInputError, match="not valid Unicode"):
        tmp_db.add_memory(**make_memory(1, text="lone \ud800 surrogate"))
    with pytest.raises(m3db.InvalidInputError, match="memory #0: document: the text holds"):
        tmp_db.add_memory(**make_memory(1, document="lone \udfff source"))
    with pytest.raises(m3db.InvalidInputError, match="over the .* a reader accepts"):
        tmp_db.add_memory(**make_memory(2, text="x" * (64 << 20)))
    assert len(tmp_db) == 0 and tmp_db.check().ok


def test_a_filter_nested_too_deeply_is_a_query_error(tmp_db):
    tmp_db.add_memories([make_memory(i) for i in range(3)])
    where = "(" * 3000 + "id > 0" + ")" * 3000
    with pytest.raises(m3db.QueryError, match="nests too deeply"):
        tmp_db.recall(make_memory(0)["embedding"], k=2, where=where)


# -- failures after and before the commit point ---------------------------------------------------


def test_a_failed_index_save_after_the_commit_does_not_fail_the_add(tmp_path, monkeypatch):
    path = tmp_path / "kb.m3db"
    db = m3db.connect(path, spec=small_spec(), config={"index_save_every": 1})

    def full_disk(seq):
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "index.usearch.tmp"))

    monkeypatch.setattr(db.index, "save", full_disk)
    ids = db.add_memories([make_memory(i) for i in range(3)])  # committed: it must not raise
    assert len(db) == 3
    monkeypatch.undo()
    db.close()
    with m3db.connect(path) as again:
        assert sorted(again.locations.ids.tolist()) == ids and again.check().ok


def test_a_full_disk_leaves_the_handle_usable_and_the_last_commit_intact(tmp_db, monkeypatch):
    first = tmp_db.add_memories([make_memory(i) for i in range(3)])

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "segments/000001.seg")

    monkeypatch.setattr(tmp_db.segments, "sync", full_disk)
    with pytest.raises(m3db.StorageError, match="No space left") as caught:
        tmp_db.add_memories([make_memory(i) for i in range(3, 6)])
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    monkeypatch.undo()
    assert sorted(tmp_db.locations.ids.tolist()) == first
    more = tmp_db.add_memories([make_memory(i) for i in range(3, 6)])  # space freed: it works again
    tmp_db.compact()
    assert len(tmp_db) == 6 and tmp_db.check().ok and not set(first) & set(more)


def test_a_deleted_lock_file_is_a_clear_error_for_a_reader(tmp_path):
    path = tmp_path / "kb.m3db"
    _filled(path)
    os.remove(path / "lock")
    with pytest.raises(m3db.FormatError, match="lock' is missing"):
        m3db.connect(path, read_only=True)
    with m3db.connect(path) as db:  # a writer makes it again
        assert len(db) == 5
    with m3db.connect(path, read_only=True) as db:
        assert len(db) == 5

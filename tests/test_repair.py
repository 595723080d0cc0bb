"""Repair: a lost or damaged catalog is rebuilt from the segments' self-describing records, the
forgotten log and spec.json; the old catalog is moved aside, never deleted."""

import json
import os
import subprocess
import sys

import pytest
from conftest import make_memory, small_spec
from test_io_faults import state

import m3db


def build(path):
    """Documents with title, uri and metadata; memories with metadata; forgets before and after
    a compact; an id forgotten and then added again; a transaction."""
    with m3db.connect(path, spec=small_spec()) as db:
        doc = {"source": "wiki/Paris", "title": "Paris", "uri": "https://example.org/paris", "metadata": {"year": 2024}}
        db.add_memories([make_memory(i, metadata={"n": i, "tags": ["a", str(i)]}, document=doc) for i in range(6)])
        db.add_memories([make_memory(10 + i, metadata={"score": i / 4}, document="notes") for i in range(6)])
        db.forget([1, 2])
        db.compact()
        db.forget([3, 11])
        db.add_memory(id=3, **make_memory(99, text="the same id, added again"))
        with db.transaction():
            db.add_memories([make_memory(20 + i) for i in range(3)])
            db.forget([4])
        return state(db), documents(db)


def documents(db):
    return [tuple(r) for r in db.sql("SELECT id, source, title, uri, metadata FROM documents ORDER BY id")]


def test_a_deleted_catalog_is_rebuilt_exactly(tmp_path):
    path = tmp_path / "kb.m3db"
    before, docs = build(path)
    os.remove(path / "catalog.duckdb")
    with pytest.raises(m3db.FormatError, match="catalog.duckdb is missing"):
        m3db.connect(path)
    report = m3db.repair(path)
    # 1 and 2 left the segments with compact(); 11 and 4 are still there, forgotten; 3 came back
    assert report["memories"] == len(before[0]) and report["forgotten"] == 2 and report["damaged"] == 0
    assert report["documents"] == 2 and report["moved_aside"] == ""
    with m3db.connect(path) as db:
        assert state(db) == before and documents(db) == docs and db.check().ok
        assert db.get(3).text == "the same id, added again"
        assert db.sql("SELECT n, tags FROM memories WHERE id = 0")[0] == (0, '["a", "0"]')  # a JSON column
        assert db.add_memory(**make_memory(500)) == max(before[0]) + 1  # ids go on after the rebuilt ones


def test_a_damaged_catalog_is_moved_aside_and_rebuilt_by_the_cli(tmp_path):
    path = tmp_path / "kb.m3db"
    before, docs = build(path)
    catalog = path / "catalog.duckdb"
    data = bytearray(catalog.read_bytes())
    for i in range(4096, len(data), 4096):  # every block header: DuckDB cannot read it
        data[i + 8 : i + 16] = b"\xff" * 8
    catalog.write_bytes(bytes(data))
    cli = [sys.executable, "-m", "m3db.cli", "check", str(path)]
    plain = subprocess.run(cli, capture_output=True, text=True)
    assert plain.returncode != 0 and "m3db check --repair" in plain.stderr  # the error names the way out
    fixed = subprocess.run(cli + ["--repair", "--json"], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr
    out = json.loads(fixed.stdout)
    assert out["ok"] and out["repaired"]["memories"] == len(before[0])
    assert (path / "catalog.duckdb.damaged-1").read_bytes() == bytes(data)  # kept for a person to look at
    with m3db.connect(path) as db:
        assert state(db) == before and documents(db) == docs


def test_a_damaged_record_is_skipped_and_the_rest_kept(tmp_path):
    path = tmp_path / "kb.m3db"
    before, _ = build(path)
    segment = sorted((path / "segments").iterdir())[-1]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    os.remove(path / "catalog.duckdb")
    report = m3db.repair(path)
    assert report["damaged"] >= 1 and report["memories"] == len(before[0]) - 1
    with m3db.connect(path) as db:
        assert db.check().ok and set(db.locations.ids.tolist()) < set(before[0])


def test_repair_refuses_without_its_spec_file_or_while_open(tmp_path):
    path = tmp_path / "kb.m3db"
    build(path)
    with m3db.connect(path):
        with pytest.raises(m3db.LockedError):
            m3db.repair(path)
    os.remove(path / "spec.json")
    with pytest.raises(m3db.FormatError, match="spec.json' is missing"):
        m3db.repair(path)
    assert (path / "catalog.duckdb").exists()  # nothing changed
    with m3db.connect(path) as db:  # a writable open writes the spec file again
        assert db.check().ok
    assert (path / "spec.json").exists()


def test_a_damaged_spec_file_is_reported_and_written_again(tmp_path):
    path = tmp_path / "kb.m3db"
    build(path)
    good = (path / "spec.json").read_text()
    (path / "spec.json").write_text(good.replace("test-model", "other-model"))
    with m3db.connect(path, read_only=True) as db:
        assert any("spec.json differs" in p for p in db.check().problems)
    with m3db.connect(path) as db:
        assert db.check().ok
    assert (path / "spec.json").read_text() == good


def test_a_repair_after_compact_never_hands_out_a_forgotten_id(tmp_path):
    """compact() empties the forgotten log; it keeps the commit and the next id so far, so that a
    rebuilt catalog does not give a new memory the id of a forgotten one (it gave id 8 here)."""
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memories([make_memory(i) for i in range(10)])
        db.forget(9)
        db.forget(8)
        db.compact()
        seq = db.commit_seq
    os.remove(path / "catalog.duckdb")
    m3db.repair(path)
    with m3db.connect(path) as db:
        assert sorted(db.locations.ids.tolist()) == list(range(8))
        assert db.add_memory(**make_memory(100)) == 10 and db.commit_seq == seq + 1

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


# -- forgotten memories, when forgotten.log cannot say which ---------------------------------------


def forgetful(path):
    """20 memories, then two forget commits (1 and 2; then 5), closed: the index is saved at the
    last commit. Returns the ids that remain."""
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memories([make_memory(i) for i in range(20)])
        db.forget([1, 2])
        db.forget([5])
        return sorted(db.locations.ids.tolist())


def damage_log(path, how) -> bytes | None:
    """Flip a byte of forgotten.log's first frame, cut it in half, or delete it; return what is left."""
    log = path / "forgotten.log"
    data = bytearray(log.read_bytes())
    if how == "delete":
        os.remove(log)
        return None
    if how == "flip":
        data[10] ^= 0x01  # in the first frame's payload: its checksum fails
    else:
        data = data[: len(data) // 2]
    log.write_bytes(bytes(data))
    return bytes(data)


def check_repair(path, *flags):
    cli = [sys.executable, "-m", "m3db.cli", "check", str(path), "--repair", "--json", *flags]
    return subprocess.run(cli, capture_output=True, text=True)


@pytest.mark.parametrize("how", ["flip", "cut", "delete"])
def test_a_damaged_forgotten_log_never_brings_a_forgotten_memory_back(tmp_path, how):
    """Catalog lost and forgotten.log damaged: repair said ok and brought back 1, 2 and 5. The
    index, saved at the last commit, shows they were forgotten: they stay out, and the damage is
    a problem (exit 1), not an ok. The log is written anew, so a second repair needs no index."""
    path = tmp_path / "kb"
    kept = forgetful(path)
    os.remove(path / "catalog.duckdb")
    damaged = damage_log(path, how)
    r = check_repair(path)
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert not out["ok"] and any("forgotten.log" in p for p in out["problems"])
    assert out["repaired"]["forgotten"] == 3 and out["repaired"]["resurrected"] == []
    with m3db.connect(path) as db:
        assert sorted(db.locations.ids.tolist()) == kept and db.check().ok
        assert db.add_memory(**make_memory(100)) == 20  # no forgotten id is handed out again
    if damaged is not None:  # the damaged log is kept for a person to look at
        assert (path / "forgotten.log.damaged-1").read_bytes() == damaged
    os.remove(path / "catalog.duckdb")
    for name in ("index.usearch", "index.state"):
        os.remove(path / name)
    report = m3db.repair(path)  # the log written anew vouches alone
    assert report["problems"] == [] and report["forgotten_log"] == "whole" and report["forgotten"] == 3


@pytest.mark.parametrize("how", ["flip", "cut", "delete"])
def test_without_an_index_repair_refuses_to_vouch_and_names_the_memories(tmp_path, how):
    """Nothing left says which memories were forgotten: repair changes nothing and names them;
    --accept-resurrection keeps them, listed, and is still no ok."""
    path = tmp_path / "kb"
    forgetful(path)
    os.remove(path / "catalog.duckdb")
    for name in ("index.usearch", "index.state"):
        os.remove(path / name)
    damage_log(path, how)
    files = sorted(os.listdir(path))
    with pytest.raises(m3db.FormatError, match=r"cannot vouch that 20 memories .* --accept-resurrection") as e:
        m3db.repair(path)
    assert "The memories: 0, 1, 2, 3, 4, 5," in str(e.value) and "forgotten.log" in str(e.value)
    assert sorted(os.listdir(path)) == files  # nothing changed
    r = check_repair(path)
    assert r.returncode == 1 and "cannot vouch" in r.stderr and not (path / "catalog.duckdb").exists()
    r = check_repair(path, "--accept-resurrection")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert not out["ok"] and out["repaired"]["resurrected"] == list(range(20))
    assert any("accept_resurrection" in p for p in out["problems"])


def test_an_index_older_than_a_forget_does_not_vouch_for_it(tmp_path):
    """The index saved before the forget of 3 (its files from that time): it cannot say whether a
    later commit forgot a memory it holds, so those are named and nothing is changed."""
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memories([make_memory(i) for i in range(10)])
    saved = {name: (path / name).read_bytes() for name in ("index.usearch", "index.state")}
    with m3db.connect(path) as db:
        db.add_memories([make_memory(i) for i in range(10, 15)])
        db.forget([3])
    for name, data in saved.items():
        (path / name).write_bytes(data)
    os.remove(path / "catalog.duckdb")
    damage_log(path, "flip")
    with pytest.raises(m3db.FormatError, match=r"cannot vouch that 10 memories .* commit 1") as e:
        m3db.repair(path)
    assert "The memories: 0, 1, 2, 3, 4," in str(e.value)


def test_a_missing_log_of_a_database_that_never_forgot_is_no_problem(tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memories([make_memory(i) for i in range(10)])
    os.remove(path / "catalog.duckdb")
    assert not (path / "forgotten.log").exists()
    r = check_repair(path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["repaired"]["forgotten_log"] == "missing" and out["repaired"]["memories"] == 10


def test_check_reports_a_damaged_forgotten_log_and_compact_writes_it_anew(tmp_path):
    path = tmp_path / "kb"
    forgetful(path)
    damage_log(path, "cut")
    with m3db.connect(path) as db:
        report = db.check()
        assert not report.ok and "forgotten.log is damaged from byte 0" in report.problems[0]
        db.compact()
        assert db.check().ok


# -- what a damaged stretch of a segment cost ------------------------------------------------------


def test_a_damaged_stretch_names_the_memories_it_cost(tmp_path):
    """Zeros over three records: the report said `damaged: 1` and named none. Now the stretch
    gives its bounds (the whole records around it) and the ids the index held that no record
    gives back, and the CLI is no ok."""
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memories([make_memory(i) for i in range(20)])
        (seg, start, _, _), (_, last, length, _) = db.locations.find(6), db.locations.find(8)
    segment = path / "segments" / f"{seg:06d}.seg"
    data = bytearray(segment.read_bytes())
    end = last + length // 2
    data[start:end] = bytes(end - start)
    segment.write_bytes(bytes(data))
    os.remove(path / "catalog.duckdb")
    r = check_repair(path)
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    repaired = out["repaired"]
    assert repaired["lost"] == [6, 7, 8] and repaired["damaged"] == 1 and repaired["memories"] == 17
    (stretch,) = repaired["stretches"]
    assert (stretch["after"], stretch["before"], stretch["lost"], stretch["offset"]) == (5, 9, [6, 7, 8], start)
    assert not out["ok"] and "lost with them: memories 6, 7, 8" in out["problems"][0]
    assert "after memory 5, before memory 9" in out["problems"][0]

"""Faults with real processes and files: SIGKILL mid-write, flipped bytes, truncated files,
a deleted or damaged index. Every case ends in intact data or a clear FormatError."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db

WRITER = os.path.join(os.path.dirname(__file__), "fault_writer.py")
TRIALS = 20


def run_writer_and_kill(path, start, delay):
    proc = subprocess.Popen([sys.executable, WRITER, str(path), str(start)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    committed = set()
    for line in out.splitlines():
        if line.startswith("committed"):
            _, a, b = line.split()
            committed.update(range(int(a), int(b) + 1))
    return committed


def test_sigkill_during_adds_loses_nothing_committed(tmp_path):
    path = tmp_path / "kb"
    spec = small_spec(codec="f32")
    rng = np.random.default_rng(1234)
    must_have = set()
    for trial in range(TRIALS):
        start = trial * 100_000
        must_have |= run_writer_and_kill(path, start, float(rng.uniform(0.0, 0.4)))
        with m3db.connect(path, spec=spec) as db:
            present = {r[0] for r in db.sql("SELECT id FROM memories")}
            assert must_have <= present, f"trial {trial}: committed memories lost: {sorted(must_have - present)[:5]}"
            # batches commit whole: every visible batch is complete
            batches = {}
            for i in present:
                batches.setdefault(i // 5, set()).add(i)
            assert all(len(b) == 5 for b in batches.values()), f"trial {trial}: a half-written batch is visible"
            for i in sorted(present)[-10:]:
                m, want = db.get(i), make_memory(i, spec)
                assert np.array_equal(m.keys, want["keys"]) and np.array_equal(m.values, want["values"])
            report = db.check()
            assert report.ok, report.problems
            assert len(db.recall(np.ones(16, np.float32), k=5)) == min(5, len(present))
            must_have = present


def fill(path, n=20, **spec_overrides):
    with m3db.connect(path, spec=small_spec(**spec_overrides)) as db:
        db.add_memories([make_memory(i) for i in range(n)])


def test_flipped_bytes_in_segments_are_format_errors(tmp_path):
    path = tmp_path / "kb"
    fill(path)
    seg = os.path.join(path, "segments", "000001.seg")
    data = bytearray(open(seg, "rb").read())
    rng = np.random.default_rng(5)
    positions = rng.choice(np.arange(16, len(data)), size=40, replace=False)
    for pos in positions:
        data[pos] ^= 0xFF
    open(seg, "wb").write(bytes(data))
    with m3db.connect(path) as db:
        report = db.check()
        assert not report.ok and all("checksum" in p or "corrupt" in p or "magic" in p for p in report.problems)
        damaged = 0
        for i in range(20):
            try:
                m = db.get(i)
            except m3db.FormatError as e:
                assert "memory" in str(e) and "000001.seg" in str(e)
                damaged += 1
            else:  # an undamaged record decodes to exactly what was written (within int8)
                assert np.allclose(m.keys, make_memory(i)["keys"], atol=0.05)
        assert damaged > 0


def test_truncated_segment_is_a_format_error(tmp_path):
    path = tmp_path / "kb"
    fill(path)
    seg = os.path.join(path, "segments", "000001.seg")
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:
        f.truncate(size // 2)
    with m3db.connect(path, read_only=True) as db:
        with pytest.raises(m3db.FormatError, match="outside the file|truncated"):
            db.get(19)
        assert db.get(0).text  # the front half is intact
        assert not db.check().ok


def test_segment_header_damage(tmp_path):
    path = tmp_path / "kb"
    fill(path)
    seg = os.path.join(path, "segments", "000001.seg")
    with open(seg, "r+b") as f:
        f.write(b"XXXX")
    with m3db.connect(path, read_only=True) as db:
        with pytest.raises(m3db.FormatError, match="not an m3db segment"):
            db.get(0)


def test_deleted_index_is_rebuilt(tmp_path):
    path = tmp_path / "kb"
    fill(path)
    with m3db.connect(path) as db:
        before = db.recall(make_memory(3)["embedding"], k=3).ids
    os.remove(os.path.join(path, "index.usearch"))
    with m3db.connect(path) as db:
        assert db.recall(make_memory(3)["embedding"], k=3).ids == before
        assert db.check().ok
    assert os.path.exists(os.path.join(path, "index.usearch"))


@pytest.mark.parametrize("damage", ["garbage", "truncate", "state"])
def test_damaged_index_is_rebuilt(tmp_path, damage):
    path = tmp_path / "kb"
    fill(path)
    index = os.path.join(path, "index.usearch")
    if damage == "garbage":
        open(index, "wb").write(os.urandom(5000))
    elif damage == "truncate":
        with open(index, "r+b") as f:
            f.truncate(100)
    else:
        open(os.path.join(path, "index.state"), "w").write("{not json")
    for read_only in (True, False):
        with m3db.connect(path, read_only=read_only) as db:
            assert db.recall(make_memory(3)["embedding"], k=1).ids == [3]  # rebuilt in RAM from the catalog
            report = db.check()
            if read_only:  # a reader cannot mend the file: check says so
                assert [p for p in report.problems if "index.usearch does not match" in p]
            else:  # a writable open saved the rebuilt index
                assert report.ok
    with m3db.connect(path, read_only=True) as db:
        assert db.check().ok


def test_stale_index_catches_up(tmp_path):
    """An index saved before later commits (a crash before the next save) is caught up."""
    path = tmp_path / "kb"
    fill(path, 10)
    saved = {n: open(os.path.join(path, n), "rb").read() for n in ("index.usearch", "index.state")}
    with m3db.connect(path) as db:
        db.add_memories([make_memory(i) for i in range(10, 20)])
        db.forget([0, 1])
    for n, b in saved.items():  # put the old index back, as if the later saves never happened
        open(os.path.join(path, n), "wb").write(b)
    with m3db.connect(path) as db:
        assert db.recall(make_memory(15)["embedding"], k=1).ids == [15]
        assert 0 not in db.recall(make_memory(0)["embedding"], k=18).ids
        assert db.check().ok


def test_uncommitted_tail_is_cut_on_open(tmp_path):
    path = tmp_path / "kb"
    fill(path)
    seg = os.path.join(path, "segments", "000001.seg")
    size = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(os.urandom(777))  # a half-written record from a killed process
    open(os.path.join(path, "segments", "000002.seg"), "wb").write(b"partial")
    with m3db.connect(path) as db:
        assert os.path.getsize(seg) == size
        assert not os.path.exists(os.path.join(path, "segments", "000002.seg"))
        assert db.check().ok and len(db) == 20


def test_catalog_that_is_not_duckdb(tmp_path):
    path = tmp_path / "kb"
    fill(path)
    open(os.path.join(path, "catalog.duckdb"), "wb").write(b"not a database" * 100)
    with pytest.raises(m3db.FormatError, match="catalog"):
        m3db.connect(path)


def test_codec_params_in_the_catalog_are_checked(tmp_path):
    import duckdb
    import msgpack

    path = tmp_path / "kb"
    fill(path)
    con = duckdb.connect(str(path / "catalog.duckdb"))
    con.execute("INSERT INTO codecs VALUES ('int8', 1, ?)", [msgpack.packb({"codebook": [1, 2]})])
    con.close()
    with pytest.raises(m3db.FormatError, match="takes no parameters"):
        m3db.connect(path)
    con = duckdb.connect(str(path / "catalog.duckdb"))
    con.execute("UPDATE codecs SET params = ?", [b"\xc1\xc1"])
    con.close()
    with pytest.raises(m3db.FormatError, match="damaged"):
        m3db.connect(path)

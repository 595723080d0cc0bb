"""The worst day, for storage: three ways a probe lost data, each pinned with real processes and
real failed writes.

- a repair SIGKILLed partway must leave no catalog that says the segments are empty (a new
  catalog's recovery would delete every segment): the open refuses, and repair runs again;
- a catalog behind its segments (its catalog.duckdb.wal deleted or cut short, an older copy
  restored) must be refused, cutting nothing, and repair then rebuilds every commit;
- a write that a full disk fails (RLIMIT_FSIZE: the kernel refuses it) must be cut again at
  once, leave the handle reading and writing, and never reach the segment later.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_memory, small_spec
from test_io_faults import state
from test_repair import build, documents

import m3db

HERE = os.path.dirname(os.path.abspath(__file__))
F32 = small_spec(codec="f32")


def segment_bytes(path) -> dict[str, str]:
    """{segment file: sha256} of a database: what no open or repair may change."""
    folder = os.path.join(path, "segments")
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def python(code, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=HERE, text=True, **kwargs)


# -- 1. a repair killed partway ---------------------------------------------------------------------

REPAIR = """
import os, sys
import kill_points
from m3db.storage import repair
from m3db.storage.catalog import Catalog

kill_points.arm(int(sys.argv[2]), sys.argv[3])
for owner, name in ((Catalog, "create"), (Catalog, "begin"), (repair, "insert_rows"), (Catalog, "commit"),
                    (Catalog, "checkpoint"), (os, "replace")):
    kill_points.trap(owner, name)
repair.repair(sys.argv[1])
"""


@pytest.fixture(scope="module")
def lost_catalog(tmp_path_factory):
    """A database (documents, forgets before and after a compact, a transaction) whose catalog
    was deleted, and what it held."""
    path = tmp_path_factory.mktemp("worst") / "kb.m3db"
    before = build(path)
    os.remove(path / "catalog.duckdb")
    return path, before


# the trapped calls, in order: create 1, begin 2, insert_rows 3, commit 4, checkpoint 5, the rename 6
KILLS = [(1, "after"), (3, "after"), (5, "after"), (6, "before"), (6, "after")]


def test_a_repair_killed_partway_is_refused_then_done_again(tmp_path, lost_catalog):
    original, (before, docs) = lost_catalog
    for kill_at, when in KILLS:
        path = tmp_path / f"kb-{kill_at}-{when}.m3db"
        shutil.copytree(original, path)
        segments = segment_bytes(path)
        proc = python(REPAIR, path, kill_at, when, stdout=subprocess.PIPE)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"the repair ran past {kill_at} {when}: a kill point is gone"
        if (path / "catalog.duckdb").exists():  # only a whole one: its rename is repair's last step
            with m3db.connect(path) as db:
                assert state(db) == before and documents(db) == docs, f"killed at {kill_at} {when}"
        else:  # the open a user tries next names the way out
            with pytest.raises(m3db.FormatError, match="m3db check --repair"):
                m3db.connect(path)
        assert segment_bytes(path) == segments, f"killed at {kill_at} {when}: an open cut segment bytes"
        m3db.repair(path)  # a leftover catalog.duckdb.repairing does not stop it
        assert not any(n.endswith((".repairing", ".repairing.wal")) for n in os.listdir(path))
        with m3db.connect(path) as db:
            assert state(db) == before and documents(db) == docs and db.check().ok


# -- 2. a catalog behind its segments ---------------------------------------------------------------

WRITER = """
import sys, time
from conftest import make_memory, small_spec
import m3db

spec = small_spec(codec="f32")
db = m3db.connect(sys.argv[1], spec=spec, config={"segment_size": 16384})
start = int(sys.argv[2])
for b in range(6):
    ids = db.add_memories([make_memory(i, spec, id=i) for i in range(start + 5 * b, start + 5 * b + 5)])
    print("committed", ids[0], ids[-1], flush=True)
print("waiting", flush=True)
time.sleep(600)
"""


def write_and_kill(path, start) -> set[int]:
    """Six commits by another process, SIGKILLed while it waits: its catalog.duckdb.wal stays."""
    proc = python(WRITER, path, start, stdout=subprocess.PIPE)
    committed = set()
    for line in proc.stdout:
        if line.startswith("committed"):
            _, a, b = line.split()
            committed.update(range(int(a), int(b) + 1))
        elif line.startswith("waiting"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert len(committed) == 30 and os.path.exists(path / "catalog.duckdb.wal")
    return committed


def fill(path, ids) -> set[int]:
    with m3db.connect(path, spec=F32, config={"segment_size": 16384}) as db:
        db.add_memories([make_memory(i, F32, id=i) for i in ids])
    return set(ids)


def lose_the_wal(path):
    committed = fill(path, range(15)) | write_and_kill(path, 100)
    os.remove(path / "catalog.duckdb.wal")
    return committed


def cut_the_wal(path):
    committed = fill(path, range(15)) | write_and_kill(path, 100)
    wal = path / "catalog.duckdb.wal"
    os.truncate(wal, wal.stat().st_size // 2)  # DuckDB replays the whole entries before the cut
    return committed


def lose_the_wal_of_a_new_database(path):
    committed = write_and_kill(path, 100)  # the catalog's tables themselves are in the WAL
    os.remove(path / "catalog.duckdb.wal")
    return committed


def restore_an_older_catalog(path):
    committed = fill(path, range(15))
    shutil.copy(path / "catalog.duckdb", path / "backup.duckdb")
    with m3db.connect(path, config={"segment_size": 16384}) as db:
        for b in range(4):
            db.add_memories([make_memory(i, F32, id=i) for i in range(100 + 5 * b, 105 + 5 * b)])
            committed |= set(range(100 + 5 * b, 105 + 5 * b))
        db.compact()  # the backup points at segments that are gone now; the copies are elsewhere
    os.replace(path / "backup.duckdb", path / "catalog.duckdb")
    return committed


@pytest.mark.parametrize(
    "damage", [lose_the_wal, cut_the_wal, lose_the_wal_of_a_new_database, restore_an_older_catalog]
)
def test_a_catalog_behind_its_segments_is_refused_and_nothing_is_cut(tmp_path, damage):
    path = tmp_path / "kb.m3db"
    committed = damage(path)
    segments = segment_bytes(path)
    for read_only in (True, False):
        with pytest.raises(m3db.FormatError, match=r"m3db check --repair"):
            m3db.connect(path, spec=F32, read_only=read_only)
    assert segment_bytes(path) == segments
    cli = subprocess.run(
        [sys.executable, "-m", "m3db.cli", "check", str(path), "--repair", "--json"], capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["repaired"]["memories"] == len(committed)
    with m3db.connect(path) as db:
        assert set(db.locations.ids.tolist()) == committed and db.check().ok
        for i in sorted(committed)[::7]:
            assert np.array_equal(db.get(i).keys, make_memory(i, F32)["keys"])


def test_the_commit_a_crash_cut_short_is_still_cut(tmp_path):
    """What the refusal must not catch: the records of the one commit a crash cut short, after a
    record that a committed transaction dropped (added and forgotten in it)."""
    path = tmp_path / "kb.m3db"
    fill(path, range(5))
    with m3db.connect(path) as db, db.transaction():
        db.add_memories([make_memory(i, F32, id=i) for i in (5, 6)])
        db.forget([6])
    seg = path / "segments" / "000001.seg"
    with m3db.connect(path, read_only=True) as db:
        end = max(db.locations.find(i)[1] + db.locations.find(i)[2] for i in range(6))
    code = """
import os, signal, sys
from conftest import make_memory, small_spec
import m3db
from m3db.storage.catalog import Catalog

Catalog.begin = lambda self: os.kill(os.getpid(), signal.SIGKILL)  # after the fsync, before the rows
spec = small_spec(codec="f32")
with m3db.connect(sys.argv[1]) as db:
    db.add_memories([make_memory(i, spec, id=i) for i in range(7, 12)])
"""
    proc = python(code, path)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and seg.stat().st_size > end
    with m3db.connect(path) as db:
        assert sorted(db.locations.ids.tolist()) == list(range(6)) and db.check().ok
    assert seg.stat().st_size == end


# -- 3. a full disk ---------------------------------------------------------------------------------

FULL_DISK = """
import json, os, resource, signal, sys
from conftest import make_memory, small_spec
import m3db

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG
spec = small_spec(codec="f32")  # 1.4 KB records: a batch is smaller than a write buffer (8 KiB)
path = sys.argv[1]
seg = os.path.join(path, "segments", "000001.seg")
db = m3db.connect(path, spec=spec)
batch = [make_memory(i, spec, text=f"kept {i}") for i in range(3)]
committed = db.add_memories(batch)
texts = [m["text"] for m in batch]  # of the committed memories, in order
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(seg) + 30_000, hard))
out = {"failed": None}
n = 3
while out["failed"] is None:
    size = os.path.getsize(seg)
    batch = [make_memory(i, spec, text=f"batch {n} item {i}") for i in range(n, n + 2)]
    try:
        committed += db.add_memories(batch)
        texts += [m["text"] for m in batch]
    except m3db.StorageError as e:
        out.update(failed=[m["text"] for m in batch], error=str(e), size_before=size, size_after=os.path.getsize(seg))
    n += 2
# the handle: every committed memory reads, recall and check work, with the disk still full
out["texts"] = texts
try:
    out["read"] = [db.get(i).text for i in committed]
    out["recall"] = db.recall(make_memory(0, spec)["embedding"], k=3).ids
    out["check"] = db.check().ok
except m3db.M3DBError as e:
    out["read"] = str(e)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space frees up
# ids of their own: were the failed batch's bytes written now, repair would bring its ids back
committed += db.add_memories([make_memory(i, spec, text=f"after {i}", id=i) for i in range(100, 102)])
db.close()
out["committed"] = committed
print(json.dumps(out))
"""


def test_a_full_disk_cuts_the_failed_write_and_the_handle_goes_on(tmp_path):
    path = tmp_path / "kb.m3db"
    proc = python(FULL_DISK, path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert "File too large" in report["error"]
    assert report["size_after"] == report["size_before"]  # the failed add's bytes were cut at once
    assert report["read"] == report["texts"] and len(report["recall"]) == 3 and report["check"]
    committed = sorted(report["committed"])
    with m3db.connect(path) as db:
        assert sorted(db.locations.ids.tolist()) == committed and db.check().ok
    m3db.repair(path)  # the records alone: the failed batch must not be among them
    with m3db.connect(path) as db:
        assert sorted(db.locations.ids.tolist()) == committed and db.check().ok
        texts = {db.get(i).text for i in committed}
    assert not texts & set(report["failed"])

"""Faults as the libraries really raise them: each C++ call on a write path (USearch's save,
load and view; DuckDB's connect, commit, the writes of a statement and its checkpoint; zstd's
compress) fails for real on real files or a real memory limit, and m3db answers with its own
errors (the table in docs/errors.md).

How each is provoked (each test skips, saying why, where this machine cannot):
- a directory that takes no new file: `chattr +i` (as a read-only remount or a full disk
  would); needs root and a filesystem with the flag (ext4, xfs, btrfs, tmpfs);
- a file that cannot be written: `chattr +i` on the file;
- permission bits: a subprocess without CAP_DAC_OVERRIDE (`setpriv`), which root bypasses;
- a file-size limit: RLIMIT_FSIZE in a subprocess with SIGXFSZ ignored (write returns EFBIG);
- a full disk and a read-only mount: a small tmpfs in a private mount namespace (`unshare -m`);
- memory running out: RLIMIT_AS just above a subprocess's size.

The ghost commit: an index save that fails after the catalog commit (USearch raises
RuntimeError, not OSError) was raised raw by add_memory although the memory was committed.
"""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.storage.catalog import Catalog
from m3db.storage.store import IndexSaveWarning

HERE = os.path.dirname(os.path.abspath(__file__))
EVERY_SAVE = {"index_save_every": 1}


# -- provoking ------------------------------------------------------------------------------------


def require_chattr(where) -> None:
    """Skip unless `chattr +i` works here (root, and a filesystem that keeps the flag)."""
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.skip("chattr +i needs root and the chattr tool")
    probe = os.path.join(where, "chattr-probe")
    os.makedirs(probe, exist_ok=True)
    try:
        if subprocess.run(["chattr", "+i", probe], capture_output=True).returncode != 0:
            pytest.skip("this filesystem does not take chattr +i")
        try:
            open(os.path.join(probe, "x"), "w").close()
        except PermissionError:
            return
        pytest.skip("chattr +i did not stop a new file (root bypassing it?)")
    finally:
        subprocess.run(["chattr", "-i", probe], capture_output=True)
        shutil.rmtree(probe, ignore_errors=True)


@contextlib.contextmanager
def immutable(path):
    """`path` (a directory: it takes no new file and loses none; a file: it cannot be written)."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def run_script(code, *args, prefix=(), check=True) -> dict:
    """Run `code` in a fresh Python (cwd tests/); it prints one JSON object last."""
    done = subprocess.run(
        [*prefix, sys.executable, "-c", code, *map(str, args)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def require_unshare() -> list[str]:
    """The prefix that runs a command in a private mount namespace, or a skip."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("a private mount namespace needs root, unshare and mount")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {probe.stderr.decode()[:200]}")
    return ["unshare", "-m"]


def require_setpriv() -> list[str]:
    """The prefix that runs a command as root without CAP_DAC_OVERRIDE (permission bits count)."""
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return []  # not root: permission bits count already
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("setpriv cannot drop CAP_DAC_OVERRIDE here")
    return prefix


def database(path, n=2, **config) -> None:
    with m3db.connect(path, spec=small_spec(), config=config or None) as db:
        db.add_memories([make_memory(i) for i in range(n)])


# -- USearch: the index save after a commit (the ghost commit) -------------------------------------


def test_an_index_save_that_fails_after_the_commit_does_not_fail_the_commit(tmp_path):
    """chattr +i on the database directory: USearch's save raises RuntimeError('Operation not
    permitted'). The commit stands: add_memory returns the id and warns; close() warns and does
    not fail; a reopen holds the memory and check() is clean."""
    require_chattr(tmp_path)
    path = tmp_path / "kb"
    db = m3db.connect(path, spec=small_spec(), config=EVERY_SAVE)
    try:
        first = db.add_memory(**make_memory(0))
        assert os.path.exists(path / "catalog.duckdb.wal")  # the next commit appends to it: no new file
        with immutable(path):
            with pytest.warns(IndexSaveWarning, match="Operation not permitted") as caught:
                second = db.add_memory(**make_memory(1))
            text = str(caught[0].message)
            assert "commit 2 stands" in text and "catches" in text
            assert db.store.index_save_error is not None and db.store.index_save_error.errno == errno.EPERM
            assert db.get(second).text == make_memory(1)["text"]
            assert db.recall(make_memory(1)["embedding"], k=1).ids[0] == second
            with pytest.raises(m3db.DuplicateIdError):  # it is committed: the retry is refused, and says so
                db.add_memory(**make_memory(1), id=second)
            with pytest.warns(IndexSaveWarning, match="Nothing is lost"):
                db.close()
    finally:
        if not db.closed:
            db.close()
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]
    with m3db.connect(path) as again:
        assert sorted(again.locations.ids.tolist()) == [first, second]
        assert again.check().ok
        assert again.recall(make_memory(1)["embedding"], k=1).ids[0] == second


def test_a_failed_index_save_is_retried_and_then_saves(tmp_path):
    """A save that failed is tried again after as many changes again, and the next one that
    works clears the error."""
    require_chattr(tmp_path)
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec(), config={"index_save_every": 2}) as db:
        db.add_memories([make_memory(i) for i in range(2)])
        assert db.store.unsaved == 0
        with immutable(path):
            db.add_memory(**make_memory(2))  # 1 change: no save due
            with pytest.warns(IndexSaveWarning):
                db.add_memory(**make_memory(3))
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                db.add_memory(**make_memory(4))  # the retry waits for 2 more changes
            assert db.store.unsaved == 3
            report = db.check()  # nothing is lost: ok, with the unsaved index as a warning
            assert report.ok and len(report.warnings) == 1 and "could not be saved" in report.warnings[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            db.add_memory(**make_memory(5))  # the retry: it saves
        assert db.store.unsaved == 0 and db.store.index_save_error is None and db.check().warnings == []
    with m3db.connect(path) as again:
        assert len(again) == 6 and again.index.saved_seq == again.commit_seq


def test_opening_where_the_index_cannot_be_saved_warns_and_opens(tmp_path):
    """An open catches the index up and saves it; in a directory that takes no new file the save
    fails (USearch's RuntimeError), and the open goes on: the index in RAM is right."""
    require_chattr(tmp_path)
    path = tmp_path / "kb"
    database(path)
    for name in ("index.usearch", "index.state"):
        os.remove(path / name)
    with immutable(path):
        with pytest.warns(IndexSaveWarning, match="Operation not permitted"):
            db = m3db.connect(path)
        with pytest.warns(IndexSaveWarning, match="closed, but"), db:
            assert len(db) == 2 and db.check().ok
            assert db.recall(make_memory(1)["embedding"], k=1).ids[0] == 1


# -- DuckDB: connect, commit, the writes of a statement, checkpoint ----------------------------------


def test_a_catalog_commit_that_cannot_create_its_wal_rolls_back(tmp_path):
    """chattr +i on the directory of a database closed cleanly (no catalog.duckdb.wal): DuckDB's
    COMMIT raises TransactionException('Failed to commit: Cannot open file ".wal": Operation
    not permitted'); m3db raises StorageError (errno EPERM), nothing is committed, and once the
    directory takes files again the same handle adds it."""
    require_chattr(tmp_path)
    path = tmp_path / "kb"
    database(path)
    assert not os.path.exists(path / "catalog.duckdb.wal")
    with m3db.connect(path) as db:
        with immutable(path):
            with pytest.raises(m3db.StorageError) as raised:
                db.add_memory(**make_memory(7))
            assert raised.value.errno == errno.EPERM
            assert "catalog.duckdb.wal" in str(raised.value)
            assert len(db) == 2 and db.check().ok
        assert db.add_memory(**make_memory(7)) == 2
    with m3db.connect(path) as again:
        assert len(again) == 3 and again.check().ok


def test_opening_a_catalog_that_cannot_be_written(tmp_path):
    """chattr +i on catalog.duckdb: DuckDB's connect raises IOException('Cannot open file ...:
    Operation not permitted'). That is a StorageError (the file is not damaged); a read-only
    open works."""
    require_chattr(tmp_path)
    path = tmp_path / "kb"
    database(path)
    with immutable(path / "catalog.duckdb"):
        with pytest.raises(m3db.StorageError) as raised:
            m3db.connect(path)
        assert raised.value.errno == errno.EPERM and "catalog.duckdb" in str(raised.value)
        with m3db.connect(path, read_only=True) as db:
            assert len(db) == 2
    with m3db.connect(path) as db:
        assert db.check().ok


def test_creating_a_catalog_in_a_directory_that_takes_no_file(tmp_path):
    """A new database's catalog cannot be created: DuckDB's IOException('Cannot open file
    "catalog.duckdb": Operation not permitted') is a StorageError, not a damaged file."""
    require_chattr(tmp_path)
    path = tmp_path / "kb"
    path.mkdir()
    open(path / "lock", "w").close()  # what an interrupted creation leaves: the lock exists
    with immutable(path):
        with pytest.raises(m3db.StorageError) as raised:
            m3db.connect(path, spec=small_spec())
        assert raised.value.errno == errno.EPERM and "catalog.duckdb" in str(raised.value)
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memory(**make_memory(0))


FSIZE = """
import json, os, resource, signal, sys, warnings
import m3db
from conftest import make_memory
from m3db.storage.store import IndexSaveWarning

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
path, case = sys.argv[1], sys.argv[2]
out = {}
def limit(nbytes):
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))
def unlimited():
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
if case == "index":
    # a new small segment and an empty WAL take the add; the index, saved at close, passes the limit
    db = m3db.connect(path, config={"segment_size": 8192})
    limit(os.path.getsize(os.path.join(path, "index.usearch")) - 4096)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out["id"] = db.add_memory(**make_memory(5000))
            db.close()
        except Exception as e:
            out["raised"] = f"{type(e).__name__}: {e}"
        out["warned"] = [f"{w.category.__name__}: {w.message}" for w in caught]
        out["tmp_left"] = [n for n in os.listdir(path) if n.endswith(".tmp")]
    unlimited()
    with m3db.connect(path) as again:
        out["count"], out["ok"] = len(again), again.check().ok
        out["has"] = out.get("id") in again.locations
elif case == "wal":
    # segments roll at 64 KiB, the index is not saved: the WAL is the file that grows past the limit
    db = m3db.connect(path, config={"segment_size": 65536})
    limit(256 << 10)
    added, i = 0, 0
    for i in range(2000):
        try:
            db.add_memory(**make_memory(10_000 + i, text="w" * 2000 + str(i)))
            added += 1
        except Exception as e:
            out["raised"] = f"{type(e).__name__}: {e}"
            out["errno"] = getattr(e, "errno", None)
            break
    out["added"], out["wal"] = added, os.path.getsize(os.path.join(path, "catalog.duckdb.wal"))
    out["count_on_handle"] = len(db)
    unlimited()
    out["retry"] = db.add_memory(**make_memory(10_000 + i, text="w" * 2000 + str(i)))
    db.close()
    with m3db.connect(path) as again:
        out["count"], out["ok"] = len(again), again.check().ok
elif case == "checkpoint":
    db = m3db.connect(path)
    db.add_memories([make_memory(i, text="c" * 4000 + str(i)) for i in range(100, 300)])  # into the WAL
    limit(os.path.getsize(os.path.join(path, "catalog.duckdb")) + 1024)
    try:
        db.catalog.checkpoint()
    except Exception as e:
        out["raised"] = f"{type(e).__name__}: {e}"
        out["errno"] = getattr(e, "errno", None)
    try:  # DuckDB invalidated the database: every later statement fails until it is reopened
        db.add_memory(**make_memory(7))
    except Exception as e:
        out["after"] = f"{type(e).__name__}: {e}"
    db.close()
    unlimited()
    with m3db.connect(path) as again:
        out["count"], out["ok"] = len(again), again.check().ok
print(json.dumps(out))
"""


def test_an_index_save_past_a_file_size_limit(tmp_path):
    """RLIMIT_FSIZE under the index file's size, saved at close: USearch raises
    RuntimeError('Failed to serialize into stream') and leaves a partial temp file. close()
    warns and does not fail, the temp file is removed, and nothing is lost."""
    path = tmp_path / "kb"
    database(path, n=3000)
    out = run_script(FSIZE, path, "index")
    assert "raised" not in out, out
    assert len(out["warned"]) == 1 and out["warned"][0].startswith("IndexSaveWarning: closed, but"), out
    assert "Failed to serialize into stream" in out["warned"][0], out
    assert out["tmp_left"] == [], out
    assert out["count"] == 3001 and out["has"] and out["ok"], out


def test_a_catalog_commit_past_a_file_size_limit(tmp_path):
    """RLIMIT_FSIZE under the WAL's next size: DuckDB's COMMIT raises TransactionException
    ('Failed to commit: Could not write file ".wal": File too large'); m3db: StorageError with
    errno EFBIG, rolled back, the handle adds once the limit is lifted."""
    path = tmp_path / "kb"
    database(path)
    out = run_script(FSIZE, path, "wal")
    assert out["raised"].startswith("StorageError") and out["errno"] == errno.EFBIG, out
    assert "File too large" in out["raised"], out
    assert out["count_on_handle"] == 2 + out["added"], out
    assert out["count"] == 3 + out["added"] and out["ok"], out


def test_a_catalog_checkpoint_past_a_file_size_limit(tmp_path):
    """RLIMIT_FSIZE at the catalog file's size: DuckDB's CHECKPOINT raises FatalException and
    invalidates the database (every later statement: 'database has been invalidated'). m3db:
    StorageError (errno EFBIG) for both, the add rolled back; a reopen holds every commit."""
    path = tmp_path / "kb"
    database(path)
    out = run_script(FSIZE, path, "checkpoint")
    assert out["raised"].startswith("StorageError") and out["errno"] == errno.EFBIG, out
    assert out["after"].startswith("StorageError") and "reopen" in out["after"], out
    assert out["count"] == 202 and out["ok"], out


# -- a full disk and a read-only mount: a small tmpfs ---------------------------------------------

FULL_DISK = """
import json, os, subprocess, sys, warnings
import numpy as np
import m3db
from conftest import make_memory, small_spec

mount = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount], check=True)
path = os.path.join(mount, "kb")
out = {"acknowledged": [], "raised": [], "warned": []}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    db = m3db.connect(path, spec=small_spec(), config={"index_save_every": 1})
    rng = np.random.default_rng(0)
    failures = 0
    for i in range(5000):
        text = rng.integers(0, 2**62, 256).tobytes().hex()  # does not compress
        try:
            out["acknowledged"].append(db.add_memory(**make_memory(i, text=text)))
        except m3db.M3DBError as e:
            out["raised"].append([type(e).__name__, e.errno, str(e)[:300]])
            failures += 1
            if failures == 20:
                break
        except Exception as e:
            out["raised"].append([type(e).__name__, None, "RAW " + str(e)[:300]])
            break
    out["tmp_left"] = [n for n in os.listdir(path) if n.endswith(".tmp")]
    out["count_on_handle"] = len(db)
    try:
        db.close()
    except Exception as e:
        out["close_raised"] = f"{type(e).__name__}: {e}"
    out["warned"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
subprocess.run(["mount", "-o", "remount,size=16m", mount], check=True)  # the disk is freed
with m3db.connect(path) as again:
    out["stored"] = sorted(again.locations.ids.tolist())
    out["ok"] = again.check().ok
print(json.dumps(out))
"""


def test_a_full_disk(tmp_path):
    """A 1 MiB tmpfs filled by single adds (every commit saves the index): each failure is an
    m3db error with ENOSPC (a segment append, DuckDB's WAL write, or USearch's save after the
    commit, which warns and does not fail the add); close() does not fail; once space is freed
    the reopened database holds exactly the acknowledged memories and check() is clean."""
    prefix = require_unshare()
    mount = tmp_path / "mnt"
    mount.mkdir()
    out = run_script(FULL_DISK, mount, prefix=prefix)
    assert out["raised"], "the disk never filled"
    raw = [r for r in out["raised"] if r[2].startswith("RAW")]
    assert not raw, raw
    assert all(kind == "StorageError" and code == errno.ENOSPC for kind, code, _ in out["raised"]), out["raised"]
    assert "close_raised" not in out, out
    assert out["tmp_left"] == [], out
    assert out["stored"] == sorted(out["acknowledged"]) and out["ok"], out
    assert out["count_on_handle"] == len(out["acknowledged"]), out


READ_ONLY_MOUNT = """
import json, os, subprocess, sys
import m3db
from conftest import make_memory, small_spec

mount = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mount], check=True)
path = os.path.join(mount, "kb")
with m3db.connect(path, spec=small_spec()) as db:
    db.add_memories([make_memory(i) for i in range(3)])
subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
out = {}
try:
    m3db.connect(path)
except Exception as e:
    out["writable"] = [type(e).__name__, getattr(e, "errno", None), str(e)[:300]]
with m3db.connect(path, read_only=True) as db:
    out["read_only"] = len(db)
print(json.dumps(out))
"""


def test_a_read_only_mount(tmp_path):
    """A filesystem remounted read-only: a writable open is a StorageError (EROFS), a read-only
    open works."""
    prefix = require_unshare()
    mount = tmp_path / "mnt"
    mount.mkdir()
    out = run_script(READ_ONLY_MOUNT, mount, prefix=prefix)
    kind, code, _ = out["writable"]
    assert kind == "StorageError" and code == errno.EROFS, out
    assert out["read_only"] == 3, out


# -- permission bits (root without CAP_DAC_OVERRIDE) ---------------------------------------------

PERMISSIONS = """
import json, os, sys, warnings
import m3db
from conftest import make_memory

path, case = sys.argv[1], sys.argv[2]
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        if case == "catalog":
            m3db.connect(path).close()
        elif case == "index":
            with m3db.connect(path, read_only=True) as db:
                out["count"] = len(db)
                out["top"] = int(db.recall(make_memory(1)["embedding"], k=1).ids[0])
        elif case == "directory":
            db = m3db.connect(path, config={"index_save_every": 1})
            db.add_memory(**make_memory(8))  # a WAL to append to: the next commit needs no new file
            os.chmod(path, 0o555)
            try:
                out["id"] = db.add_memory(**make_memory(9))
                db.close()
            finally:
                os.chmod(path, 0o755)
    except Exception as e:
        out["raised"] = [type(e).__name__, getattr(e, "errno", None), str(e)[:300]]
    out["warned"] = [f"{w.category.__name__}: {w.message}" for w in caught]
print(json.dumps(out))
"""


def test_permission_bits(tmp_path):
    """Root without CAP_DAC_OVERRIDE: a catalog file without write permission (DuckDB:
    IOException 'Permission denied') is a StorageError (EACCES); an index file nobody may read
    is rebuilt from the catalog (USearch's load and view raise ValueError/RuntimeError
    'Permission denied'; m3db's checksum read meets it first); a directory without write
    permission fails the index save after a commit (USearch: RuntimeError 'Permission
    denied'), which warns and stands."""
    prefix = require_setpriv()
    path = tmp_path / "kb"
    database(path)
    os.chmod(path / "catalog.duckdb", 0o444)
    out = run_script(PERMISSIONS, path, "catalog", prefix=prefix)
    assert out["raised"][:2] == ["StorageError", errno.EACCES], out
    os.chmod(path / "catalog.duckdb", 0o644)

    os.chmod(path / "index.usearch", 0o000)
    out = run_script(PERMISSIONS, path, "index", prefix=prefix)
    assert "raised" not in out and out["count"] == 2 and out["top"] == 1, out
    os.chmod(path / "index.usearch", 0o644)

    out = run_script(PERMISSIONS, path, "directory", prefix=prefix)
    assert "raised" not in out and out["id"] == 3, out
    assert any(w.startswith("IndexSaveWarning") and "Permission denied" in w for w in out["warned"]), out
    with m3db.connect(path) as db:
        assert len(db) == 4 and db.check().ok


def test_usearch_view_and_load_failures_are_a_rebuild_not_an_error(tmp_path):
    """The index.py boundary for reads: whatever USearch raises loading or viewing a file
    (ValueError, RuntimeError), the index is rebuilt from the catalog."""
    path = tmp_path / "kb"
    database(path)
    from usearch.index import Index

    def refuse(*args, **kwargs):
        raise RuntimeError("Permission denied")

    for method in ("load", "view"):
        saved = getattr(Index, method)
        setattr(Index, method, refuse)
        try:
            with m3db.connect(path, read_only=True) as db:
                assert len(db.index) == 2 and db.check().ok
        finally:
            setattr(Index, method, saved)


def test_catalog_maps_only_operating_system_failures(tmp_path):
    """A DuckDB error that carries an operating system's failure is a StorageError; one that
    does not (damage, a query) is left to the caller."""
    import duckdb

    from m3db.storage.catalog import storage_failure

    e = duckdb.TransactionException(
        'TransactionContext Error: Failed to commit: Could not write file "/x/catalog.duckdb.wal": No space left '
        "on device"
    )
    got = storage_failure(e, "committing to the catalog")
    assert isinstance(got, m3db.StorageError) and got.errno == errno.ENOSPC
    assert got.filename == "/x/catalog.duckdb.wal"
    assert storage_failure(duckdb.IOException("IO Error: Corrupt database file: checksum mismatch"), "x") is None
    assert storage_failure(duckdb.BinderException("Binder Error: no column x"), "x") is None
    catalog = Catalog(str(tmp_path / "c.duckdb"))
    catalog.close()


# encodes one compressible record with RLIMIT_AS `margin` bytes above the process's size
ENCODE_UNDER_A_MEMORY_LIMIT = """
import resource, sys
import numpy as np
from m3db.storage.codec import load_codec
from m3db.storage.record import encode_record
codec = load_codec("f32", None)
keys = np.zeros((15, 3, 8, 64), np.float32)
positions = np.zeros((15, 3, 8), np.uint8)
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]), resource.RLIM_INFINITY))
try:
    encode_record(1, codec, keys, keys.copy(), positions, "t", None, None, 0)
    print("ok")
except BaseException as e:
    print(type(e).__module__, type(e).__name__, e)
"""


def test_zstd_out_of_memory_is_a_memory_error(tmp_path):
    """zstd reports an allocation failure as its own ZstdError ('cannot compress: Allocation
    error'), which an add raised raw; it is Python's MemoryError, named."""
    outcomes = []
    for margin in (0, 1 << 18, 1 << 20, 3 << 19, 2 << 20, 3 << 20, 8 << 20):
        out = subprocess.run(
            [sys.executable, "-c", ENCODE_UNDER_A_MEMORY_LIMIT, str(margin)], capture_output=True, text=True, timeout=60
        )
        outcomes.append(out.stdout.strip() or out.stderr.strip().splitlines()[-1])
    assert not any("ZstdError" in o for o in outcomes), outcomes
    assert any(o.startswith("builtins MemoryError memory 1: zstd could not compress") for o in outcomes), outcomes
    assert outcomes[-1] == "ok", outcomes

"""The I/O fault sweep: every write, fsync, rename, mkdir, remove, and each C++ library's write
(USearch's index save; DuckDB's connect, commit, an INSERT's writes, checkpoint; each raising
what that library really raises: tests/io_faults.py) inside add, forget, a transaction,
compact, pack, the index save at close and creating a database fails in turn (N = 1, 2, ...
until the operation runs clean), with ENOSPC, EIO and EACCES, once (transient) and from then on
(a disk that stays full). After each trial:

- the operation raised StorageError (never a raw error, nor one that blames the bytes on disk),
  with the fault's errno, and changed nothing, or it returned and did all it should (a fault after the commit point is
  absorbed: the index catches up later, and a failed index save warns, IndexSaveWarning);
- the open handle shows exactly that state, and retrying the operation on it works;
- reopening shows exactly that state, bit-exact, and check() is clean.

The default run sweeps every N for each operation with ENOSPC (persistent: a disk that stays
full) and EIO (transient); M3DB_SLOW=1 runs all six combinations of ENOSPC, EIO and EACCES,
transient and persistent. The outcome counts are printed (pytest -s).
"""

import collections
import errno
import hashlib
import itertools
import os
import shutil
import warnings

import pytest
from conftest import make_memory, small_spec
from io_faults import IOFaults

import m3db
from m3db.storage.store import IndexSaveWarning

SLOW = os.environ.get("M3DB_SLOW") == "1"
EVERY_SAVE = {"index_save_every": 1}  # every commit saves the index: its save is inside each write
LAZY_SAVE = {"index_save_every": 10**9}  # the index is saved at close only
QUERY = make_memory(10_001)["embedding"]
ERRNOS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO, "EACCES": errno.EACCES}
DEFAULT_RUNS = (("ENOSPC", True), ("EIO", False))
SLOW_RUNS = tuple((e, p) for e in ERRNOS for p in (False, True))
TRIALS = itertools.count()


def state(db) -> tuple:
    """Everything a reader can see, bit-exact: ids, every memory's text, metadata, document and
    arrays, the documents, the commit number and a recall through the index."""
    h = hashlib.sha256()
    ids = sorted(db.locations.ids.tolist())
    for i in ids:
        m = db.get(i)
        h.update(repr((i, m.text, sorted(m.metadata.items()), m.document_id, m.ordinal)).encode())
        h.update(m.keys.tobytes() + m.values.tobytes() + m.positions.tobytes())
    documents = [tuple(r) for r in db.sql("SELECT id, source FROM documents ORDER BY id")]
    top = db.recall(QUERY, k=5).ids if ids else []
    return ids, h.hexdigest(), documents, db.commit_seq, top


# -- the operations: prepare (no faults), then act (under faults) ------------------------------


class Operation:
    config = EVERY_SAVE
    closes = False  # act() closes the handle

    def prepare(self, db, work):
        pass

    def act(self, db, work):
        raise NotImplementedError

    def settled(self, work, raised, persistent=False) -> str | None:
        """What must hold of files beyond the database after act (None: all is well)."""
        return None


class Add(Operation):
    def act(self, db, work):
        db.add_memories([make_memory(100 + i, metadata={"n": 100 + i}, document="doc-b") for i in range(3)])


class Forget(Operation):
    def act(self, db, work):
        db.forget([3, 4])


class Transaction(Operation):
    def act(self, db, work):
        with db.transaction():
            db.add_memories([make_memory(200, document="doc-c"), make_memory(201)])
            db.forget([5])
            db.add_memory(**make_memory(202, metadata={"n": 202}))


class Compact(Operation):
    def act(self, db, work):
        db.compact()


class Pack(Operation):
    def act(self, db, work):
        db.pack(work / "kb.m3kb", overwrite=True)

    def settled(self, work, raised, persistent=False):
        left = [n for n in os.listdir(work) if ".tmp" in n]
        if left and not (raised is not None and persistent):  # a removal that failed too leaves it
            return f"temporary files left beside the package: {left}"
        target = work / "kb.m3kb"
        if raised is not None and target.exists():
            return "a failed pack left a package file"
        if raised is None:
            report = m3db.verify(target)
            if not report.ok:
                return f"the package does not verify: {report.problems[:2]}"
        return None


class SaveAtClose(Operation):
    config = LAZY_SAVE
    closes = True

    def prepare(self, db, work):
        db.add_memories([make_memory(300 + i) for i in range(2)])
        db.forget([6])

    def act(self, db, work):
        db.close()


class Create(Operation):
    """Creating a new database beside the one under test (which must stay as it was)."""

    def act(self, db, work):
        m3db.connect(work / "new", spec=small_spec()).close()

    def settled(self, work, raised, persistent=False):
        try:  # what a failed create left must not stop the next one
            with m3db.connect(work / "new", spec=small_spec()) as new:
                new.add_memory(**make_memory(400))
            with m3db.connect(work / "new") as new:
                if len(new) != 1 or not new.check().ok:
                    return "a database created after a failed create is not right"
        except m3db.M3DBError as e:
            return f"creating again after the fault failed: {type(e).__name__}: {e}"
        shutil.rmtree(work / "new")
        return None


OPERATIONS = {
    "add": Add(),
    "forget": Forget(),
    "transaction": Transaction(),
    "compact": Compact(),
    "pack": Pack(),
    "index save at close": SaveAtClose(),
    "create": Create(),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A closed database: 12 memories in two documents and none, two forgotten (compact has
    work), the index saved."""
    root = tmp_path_factory.mktemp("io-faults")
    with m3db.connect(root / "base", spec=small_spec()) as db:
        db.add_memories([make_memory(i, metadata={"n": i}, document="doc-a" if i < 6 else None) for i in range(12)])
        db.forget([1, 2])
    return root


def fresh(base, name):
    work = base / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copytree(base / "base", work / "kb")
    return work


def reference(base, name, op) -> tuple:
    """The states before and after `op` without faults, and how many I/O calls it makes."""
    work = fresh(base, name)
    db = m3db.connect(work / "kb", config=op.config)
    op.prepare(db, work)
    before = state(db)
    with IOFaults(n=0, errno=errno.EIO) as counted:
        op.act(db, work)
    if not op.closes:
        db.close()
    with m3db.connect(work / "kb") as again:
        after = state(again)
    return before, after, counted.calls


def trial(base, name, op, n, error, persistent, expected_states, retry_on_handle) -> str:
    """One fault; returns the outcome: 'absorbed', 'rolled back', or what went wrong. Each
    trial has a directory of its own: DuckDB shares one open instance per path in a process."""
    work = fresh(base, f"trial-{next(TRIALS)}")
    db = m3db.connect(work / "kb", config=op.config)
    try:
        return judge(db, work, op, n, error, persistent, expected_states, retry_on_handle)
    finally:
        if not db.closed:
            db.close()
        shutil.rmtree(work, ignore_errors=True)


def judge(db, work, op, n, error, persistent, expected_states, retry_on_handle) -> str:
    before, after = expected_states
    op.prepare(db, work)
    raised = None
    with IOFaults(n, error, persistent=persistent) as faults, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            op.act(db, work)
        except Exception as e:  # judged below: only an m3db error is acceptable
            raised = e
    if raised is not None and not isinstance(raised, m3db.M3DBError):
        return f"raw {type(raised).__name__}: {raised}"
    if raised is not None and not isinstance(raised, m3db.StorageError):  # a FormatError would blame the bytes
        return f"an I/O fault raised {type(raised).__name__}, not StorageError: {raised}"
    if isinstance(raised, m3db.StorageError) and raised.errno != error:
        return f"the StorageError lost the errno ({raised.errno}, not {error}): {raised}"
    warned = [w for w in caught if issubclass(w.category, IndexSaveWarning)]
    if raised is None and "index-save" in faults.failed and not warned:
        return "an index save failed after the commit point, and nothing said so"
    expected = before if raised is not None else after
    problem = op.settled(work, raised, persistent)
    if problem:
        return problem
    if not db.closed:
        try:
            if state(db) != expected:
                return "the handle shows another state than the last commit"
            if raised is not None and retry_on_handle:
                op.act(db, work)
                expected = after
                if state(db) != after:
                    return "a retry on the handle did not reach the fault-free result"
        except m3db.M3DBError as e:
            return f"the handle is stuck: {type(e).__name__}: {e}"
        if not op.closes:
            db.close()
    with m3db.connect(work / "kb", config=op.config) as again:
        if state(again) != expected:
            return "reopened, the database is not exactly its last commit"
        report = again.check()
        if not report.ok:
            return f"check() after the fault: {report.problems[:2]}"
        if expected is before and raised is not None and not op.closes:
            op.act(again, work)
            if state(again) != after or op.settled(work, None):
                return "a retry after reopening did not reach the fault-free result"
    return "absorbed" if raised is None else "rolled back"


def test_every_io_fault_leaves_the_last_commit_and_a_usable_handle(base):
    outcomes = collections.Counter()
    bad = []
    for name, op in OPERATIONS.items():
        before, after, calls = reference(base, name, op)
        assert calls > 0
        for error_name, persistent in SLOW_RUNS if SLOW else DEFAULT_RUNS:
            kind = f"{error_name} {'persistent' if persistent else 'transient'}"
            for n in range(1, calls + 1):
                outcome = trial(base, name, op, n, ERRNOS[error_name], persistent, (before, after), n % 2 == 1)
                outcomes[(name, outcome if outcome in ("absorbed", "rolled back") else "WRONG")] += 1
                if outcome not in ("absorbed", "rolled back"):
                    bad.append(f"{name}, {kind}, I/O call {n} of {calls}: {outcome}")
    print("\nI/O fault sweep outcomes:")
    for (name, outcome), count in sorted(outcomes.items()):
        print(f"  {name:22s} {outcome:12s} {count}")
    assert not bad, f"{len(bad)} trials went wrong:\n" + "\n".join(bad[:40])

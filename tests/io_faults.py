"""I/O fault injection (SQLite's way): fail the Nth I/O call m3db makes, with a chosen errno.

`IOFaults(n, errno, persistent)` patches, for the duration of a `with` block, every way m3db
writes to disk: a write, truncate or flush of a file opened for writing (`open` and `os.open`),
`os.fsync`, `os.replace`/`os.rename`, `os.mkdir`/`os.makedirs`, `os.remove`/`os.unlink`,
`os.truncate`/`os.ftruncate`, and the C++ libraries' writes: USearch's index save, and DuckDB's
connect, COMMIT (its WAL), the writes of an INSERT and CHECKPOINT.
Calls are counted in order; the nth fails, and with `persistent=True` every later one fails
too (a disk that stays full), until the block ends. Reads are never failed.

A library's fault is injected as that library really fails (docs/errors.md has the table of
what each call raised on a real full disk, file-size limit, immutable directory, read-only file
and read-only mount; tests/test_real_faults.py provokes them):
- USearch's save raises RuntimeError: the strerror for an open that fails ("Permission
  denied"), "Failed to serialize into stream" for a write that falls short (a full disk, EIO),
  after leaving a partial file;
- DuckDB's connect raises IOException('Cannot open file "...": <strerror>');
- its COMMIT raises TransactionException('Failed to commit: Could not write file "...wal":
  <strerror>') with the transaction gone (DuckDB rolls it back);
- an INSERT's own write raises IOException('Could not write file "...": <strerror>') with the
  transaction aborted (only ROLLBACK is accepted);
- CHECKPOINT raises FatalException('Failed to create checkpoint because of error: ...').
DuckDB's faults are raised from inside m3db's Catalog method by the connection it runs on, so
that catalog.py's own mapping is what the trial sees. Nothing else reaches into m3db: every
other fault is injected where Python meets the OS.
"""

import builtins
import errno
import os

import duckdb
from usearch.index import Index

from m3db.storage.catalog import Catalog

# the calls counted, by kind; `flush` is how buffered writes reach the OS
OS_CALLS = {
    "fsync": ("fsync",),
    "rename": ("replace", "rename"),
    "mkdir": ("mkdir", "makedirs"),
    "remove": ("remove", "unlink"),
    "write": ("truncate", "ftruncate", "write"),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# errors of a write that falls short (USearch then says only "Failed to serialize into stream");
# the others fail the open, and USearch gives their strerror
SHORT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


class IOFaults:
    def __init__(self, n: int, errno: int, *, persistent: bool = False):
        self.n, self.errno, self.persistent = n, errno, persistent
        self.calls = 0  # I/O calls seen so far
        self.failed = []  # the kinds of the calls that failed, in order
        self.armed = False  # files opened under the faults outlive the block: they check this
        self._saved = []

    # -- the decision --------------------------------------------------------------------------

    def _hit(self, kind: str) -> bool:
        if not self.armed:
            return False
        self.calls += 1
        if self.calls == self.n or (self.persistent and self.calls > self.n):
            self.failed.append(kind)
            return True
        return False

    def _os_error(self, what) -> OSError:
        return OSError(self.errno, os.strerror(self.errno), str(what))

    def check(self, kind: str, what) -> None:
        if self._hit(kind):
            raise self._os_error(what)

    # -- patching ------------------------------------------------------------------------------

    def _patch(self, owner, name, replacement):
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def __enter__(self):
        faults = self
        self.armed = True
        for kind, names in OS_CALLS.items():
            for name in names:
                original = getattr(os, name)

                def failing(*args, _original=original, _kind=kind, **kwargs):
                    faults.check(_kind, args[0] if args else "")
                    return _original(*args, **kwargs)

                self._patch(os, name, failing)
        real_open, real_os_open = builtins.open, os.open

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                faults.check("open", file)
                return FaultyFile(real_open(file, mode, *args, **kwargs), faults, file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS:
                faults.check("open", path)
            return real_os_open(path, flags, *args, **kwargs)

        self._patch(builtins, "open", open_)
        self._patch(os, "open", os_open)
        index_save, connect = Index.save, duckdb.connect

        def save(index, path_or_buffer=None, *args, **kwargs):
            if path_or_buffer is not None and not hasattr(path_or_buffer, "write") and faults._hit("index-save"):
                raise faults.usearch_error(path_or_buffer, real_open)
            return index_save(index, path_or_buffer, *args, **kwargs)

        def connect_(database=":memory:", read_only=False, *args, **kwargs):
            if not read_only and database != ":memory:" and faults._hit("catalog-open"):
                raise duckdb.IOException(f'IO Error: Cannot open file "{database}": {faults.strerror}')
            return connect(database, read_only, *args, **kwargs)

        self._patch(Index, "save", save)
        self._patch(duckdb, "connect", connect_)
        self._patch(Catalog, "commit", self._failing(Catalog.commit, "catalog-commit", self.commit_error, "ROLLBACK"))
        self._patch(
            Catalog,
            "insert_memories",
            self._failing(Catalog.insert_memories, "catalog-write", self.write_error, "SELECT error('injected')"),
        )
        self._patch(Catalog, "checkpoint", self._failing(Catalog.checkpoint, "catalog-checkpoint", self.fatal_error))
        return self

    # -- the libraries' own errors ---------------------------------------------------------------

    @property
    def strerror(self) -> str:
        return os.strerror(self.errno)

    def usearch_error(self, path, real_open) -> RuntimeError:
        """What USearch's save raises: a write that falls short leaves a partial file and says
        only "Failed to serialize into stream"; an open that fails gives the strerror."""
        if self.errno in SHORT_WRITE:
            with real_open(path, "wb") as f:
                f.write(b"\0" * 64)
            return RuntimeError("Failed to serialize into stream")
        return RuntimeError(self.strerror)

    def commit_error(self, catalog) -> duckdb.Error:
        return duckdb.TransactionException(
            f'TransactionContext Error: Failed to commit: Could not write file "{catalog.path}.wal": {self.strerror}'
        )

    def write_error(self, catalog) -> duckdb.Error:
        return duckdb.IOException(f'IO Error: Could not write file "{catalog.path}": {self.strerror}')

    def fatal_error(self, catalog) -> duckdb.Error:
        return duckdb.FatalException(
            "FATAL Error: Failed to create checkpoint because of error: Could not write file "
            f'"{catalog.path}": {self.strerror}'
        )

    def _failing(self, method, kind, error, before=None):
        """`method` of Catalog, whose DuckDB statement fails as DuckDB does when `kind` is hit:
        `before` (a statement) is run first on the real connection, to leave it as DuckDB does
        (a COMMIT that failed has rolled back; a statement that failed aborts the transaction)."""
        faults = self

        def run(catalog, *args, **kwargs):
            if not faults._hit(kind):
                return method(catalog, *args, **kwargs)
            real = catalog.con
            catalog.con = FailingConnection(real, error(catalog), before)
            try:
                return method(catalog, *args, **kwargs)
            finally:
                catalog.con = real

        return run

    def __exit__(self, *exc):
        self.armed = False
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)


class FailingConnection:
    """A DuckDB connection whose next execute() fails with `error` (after running `before` on the
    real one); everything else goes to the real connection."""

    def __init__(self, real, error, before):
        self._real, self._error, self._before = real, error, before

    def execute(self, *args, **kwargs):
        if self._before:
            try:
                self._real.execute(self._before)
            except duckdb.Error:
                pass  # it is meant to fail: the transaction is then aborted
        raise self._error

    def __getattr__(self, name):
        return getattr(self._real, name)


class FaultyFile:
    """A file opened for writing whose write, truncate and flush go through the faults first."""

    def __init__(self, f, faults, name):
        self._f, self._faults, self._name = f, faults, name

    def write(self, data):
        self._faults.check("write", self._name)
        return self._f.write(data)

    def truncate(self, *args):
        self._faults.check("write", self._name)
        return self._f.truncate(*args)

    def flush(self):
        self._faults.check("write", self._name)
        return self._f.flush()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

"""I/O fault injection (SQLite's way): fail the Nth I/O call m3db makes, with a chosen errno.

`IOFaults(n, errno, persistent)` patches, for the duration of a `with` block, every way m3db
writes to disk: a write, truncate or flush of a file opened for writing (`open` and `os.open`),
`os.fsync`, `os.replace`/`os.rename`, `os.mkdir`/`os.makedirs`, `os.remove`/`os.unlink`,
`os.truncate`/`os.ftruncate`, the USearch index's save (C++ writing a file), and a DuckDB
commit (C++ writing its WAL; it fails as DuckDB reports a full disk: `duckdb.IOException`).
Calls are counted in order; the nth fails, and with `persistent=True` every later one fails
too (a disk that stays full), until the block ends. Reads are never failed.

Nothing here reaches into m3db's internals except the one C++ boundary per library (the index's
`save` and the catalog's `commit`): every other fault is injected where Python meets the OS.
"""

import builtins
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
        index_save, catalog_commit = Index.save, Catalog.commit

        def save(index, path_or_buffer=None, *args, **kwargs):
            if path_or_buffer is not None and not hasattr(path_or_buffer, "write"):
                faults.check("index-save", path_or_buffer)
            return index_save(index, path_or_buffer, *args, **kwargs)

        def commit(catalog):
            if faults._hit("catalog-commit"):
                raise duckdb.IOException(
                    f'IO Error: Could not write file "{catalog.path}": {os.strerror(faults.errno)}'
                )
            return catalog_commit(catalog)

        self._patch(Index, "save", save)
        self._patch(Catalog, "commit", commit)
        return self

    def __exit__(self, *exc):
        self.armed = False
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)


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

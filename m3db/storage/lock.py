"""The database lock file: one writing process, or many reading processes, never both.

DuckDB enforces the same rule on the catalog; taking our own lock first lets the error say
what happened in m3db's words, and covers the segment files, which DuckDB knows nothing of.
"""

import fcntl
import os
import weakref

from ..errors import FormatError, LockedError

LOCK_FILE = "lock"


class DatabaseLock:
    def __init__(self, directory, *, read_only):
        path = os.path.join(directory, LOCK_FILE)
        # a reader never creates files
        try:
            self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            if not read_only:
                raise
            raise FormatError(
                f"{path!r} is missing: the database directory was damaged or copied without it. Open it once "
                "without read_only=True to make it again (no data is in it)"
            ) from None
        # a connection dropped without close() must not hold the lock until the process ends
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        mode = fcntl.LOCK_SH if read_only else fcntl.LOCK_EX
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._finalizer()
            self.fd = None
            if read_only:
                raise LockedError(
                    f"{directory!r} is open for writing in another process, or in a connection of this process that "
                    "was not closed; a read_only open cannot run beside a writer (DuckDB's rule). Close the writer "
                    "(db.close(), or `with m3db.connect(...) as db:`), or share a packed copy"
                ) from e
            raise LockedError(
                f"{directory!r} is already open in another process, or in a connection of this process that was not "
                "closed; m3db allows one writing process (one connection), or many read_only=True readers. Close "
                "the other (db.close(), or `with m3db.connect(...) as db:`), or open with read_only=True"
            ) from e

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self._finalizer()  # closes the descriptor, once
            self.fd = None

"""The database lock file: one writing process, or many reading processes, never both.

DuckDB enforces the same rule on the catalog; taking our own lock first lets the error say
what happened in m3db's words, and covers the segment files, which DuckDB knows nothing of.
"""

import fcntl
import os

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
        mode = fcntl.LOCK_SH if read_only else fcntl.LOCK_EX
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self.fd)
            self.fd = None
            if read_only:
                raise LockedError(
                    f"{directory!r} is open for writing in another process; a read_only open cannot run beside a "
                    "writer (DuckDB's rule). Close the writer, or share a packed copy"
                ) from e
            raise LockedError(
                f"{directory!r} is already open in another process; m3db allows one writing process, or many "
                "read_only=True processes. Close the other process, or open with read_only=True"
            ) from e

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

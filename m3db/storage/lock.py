"""The database lock file: one writing process, or many reading processes, never both.

DuckDB enforces the same rule on the catalog; taking our own lock first lets the error say
what happened in m3db's words, and covers the segment files, which DuckDB knows nothing of.

A lock that is held elsewhere is waited for up to `timeout` seconds (as sqlite3.connect's
timeout), and writers come first: a writer that waits holds the `lock.writer` file, and a reader
arriving meanwhile waits behind it rather than joining the readers the writer waits for. Without
that, readers reopening in a loop always overlap, and a writer never finds the lock free.
"""

import fcntl
import os
import threading
import time
import weakref

from ..errors import FormatError, LockedError

LOCK_FILE = "lock"
WRITER_FILE = "lock.writer"  # held (exclusively) by a writer waiting for the readers to leave
DEFAULT_TIMEOUT = 5.0  # seconds; sqlite3.connect's default
_POLL_FIRST, _POLL_MOST = 0.002, 0.05  # flock cannot wait with a deadline: poll, backing off

# the lock files this process holds, by (device, inode): {"readers": n, "writer": bool}. A lock
# held by this process is never let go while this call waits (it would wait for itself), so a
# conflict with it fails at once
_held: dict = {}
_held_mutex = threading.Lock()


class DatabaseLock:
    def __init__(self, directory, *, read_only, timeout=DEFAULT_TIMEOUT):
        path = os.path.join(directory, LOCK_FILE)
        self.fd, self.read_only = None, read_only
        # a reader never creates files
        try:
            fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            if not read_only:
                raise
            raise FormatError(
                f"{path!r} is missing: the database directory was damaged or copied without it. Open it once "
                "without read_only=True to make it again (no data is in it)"
            ) from None
        self.fd = fd
        stat = os.fstat(fd)
        key = (stat.st_dev, stat.st_ino)
        deadline = time.monotonic() + timeout
        try:
            if _held_here(key, read_only):
                raise self._refusal(directory, here=True)
            if read_only:
                self._wait_behind_writer(directory, deadline)
            elif timeout > 0:
                self._lock_as_waiting_writer(directory, deadline)
            if not _flock(fd, fcntl.LOCK_SH if read_only else fcntl.LOCK_EX, deadline):
                raise self._refusal(directory, here=False)
        except BaseException:
            os.close(fd)
            self.fd = None
            raise
        _hold(key, read_only, +1)
        # a connection dropped without close() must not hold the lock until the process ends
        self._finalizer = weakref.finalize(self, _let_go, fd, key, read_only)

    def _wait_behind_writer(self, directory, deadline) -> None:
        """A reader waits while a writer waits (it then meets the writer's lock, and waits on)."""
        try:
            fd = os.open(os.path.join(directory, WRITER_FILE), os.O_RDONLY)
        except OSError:  # no writer has waited here (or the file cannot be read): nothing to wait behind
            return
        try:
            if not _flock(fd, fcntl.LOCK_SH, deadline):
                raise LockedError(
                    f"{directory!r}: a writer is waiting for this database's readers to close, and readers that "
                    "arrive meanwhile wait behind it (writers come first); this one waited its timeout. Retry once "
                    "the writer is done, or pass connect(..., timeout=SECONDS) to wait longer"
                )
        finally:
            os.close(fd)  # the shared hold ends here: it was only to queue behind a waiting writer

    def _lock_as_waiting_writer(self, directory, deadline) -> None:
        """Hold WRITER_FILE while waiting for the lock itself (new readers queue behind it), then let
        it go: from then on the lock file alone keeps readers out."""
        try:
            fd = os.open(os.path.join(directory, WRITER_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            # a directory that takes no new file: wait without the queue (a write fails there
            # anyway, and the error should be the write's own, not this file's)
            if not _flock(self.fd, fcntl.LOCK_EX, deadline):
                raise self._refusal(directory, here=False) from None
            return
        try:
            if not _flock(fd, fcntl.LOCK_EX, deadline):
                raise self._refusal(directory, here=False)
            if not _flock(self.fd, fcntl.LOCK_EX, deadline):
                raise self._refusal(directory, here=False)
        finally:
            os.close(fd)

    def _refusal(self, directory, *, here) -> LockedError:
        where = (
            "in a connection of this process that was not closed"
            if here
            else "in another process, or in a connection of this process that was not closed"
        )
        wait = "" if here else "; waited for it the connect timeout (connect(..., timeout=SECONDS) waits longer)"
        if self.read_only:
            return LockedError(
                f"{directory!r} is open for writing {where}; a read_only open cannot run beside a writer "
                f"(DuckDB's rule){wait}. Close the writer (db.close(), or `with m3db.connect(...) as db:`), or share a "
                "packed copy"
            )
        return LockedError(
            f"{directory!r} is already open {where}; m3db allows one writing process (one connection), or many "
            f"read_only=True readers{wait}. Close the other (db.close(), or `with m3db.connect(...) as db:`), or "
            "open with read_only=True"
        )

    def release(self) -> None:
        if self.fd is not None:
            self._finalizer()  # lets go of the lock and closes the descriptor, once
            self.fd = None


def _held_here(key, read_only) -> bool:
    """Does this process hold the lock in a way that conflicts with the one asked for?"""
    with _held_mutex:
        entry = _held.get(key)
    return entry is not None and (entry["writer"] or (not read_only and entry["readers"] > 0))


def _hold(key, read_only, change) -> None:
    with _held_mutex:
        entry = _held.setdefault(key, {"readers": 0, "writer": False})
        if read_only:
            entry["readers"] += change
        else:
            entry["writer"] = change > 0
        if not entry["writer"] and entry["readers"] <= 0:
            del _held[key]


def _let_go(fd, key, read_only) -> None:
    _hold(key, read_only, -1)
    os.close(fd)  # closing the descriptor lets go of its flock


def _flock(fd, mode, deadline) -> bool:
    """Take flock `mode` on `fd`, polling until `deadline` (time.monotonic()); False if it passed."""
    pause = _POLL_FIRST
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MOST)

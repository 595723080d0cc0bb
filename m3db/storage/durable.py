"""Durability on disk: fsync of a path (a file, or a directory after a create/rename/remove), and
small files replaced whole (written aside, fsynced, renamed over); and the operating system's
failures as the C++ libraries report them (as text: `os_error`)."""

import errno
import os

# what a full disk, a quota, a file-size limit, a permission, a read-only mount, a missing file or
# a failing device make a write fail with: the errors a C++ library reports only as their text
_WRITE_ERRNOS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EIO,
    errno.ENOENT,
    errno.EMFILE,
    errno.ENFILE,
)
_BY_TEXT = {os.strerror(n): n for n in _WRITE_ERRNOS}


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path, text: str | bytes) -> None:
    """Write a small file (text or bytes) atomically: a crash leaves the old file or none, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def os_error(text: str, filename=None) -> OSError | None:
    """The OSError whose strerror `text` ends with (USearch raises RuntimeError('Operation not
    permitted'), DuckDB '... "file": No space left on device'), or None when it names none."""
    text = text.strip().rstrip('".')
    for message, code in _BY_TEXT.items():
        if text.endswith(message):
            return OSError(code, message, filename)
    return None


def remove_quietly(*paths) -> None:
    """Remove files that may not exist, ignoring failures (a temporary file a failed write left:
    the next writable open removes it too)."""
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass

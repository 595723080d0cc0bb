"""Durability on disk: fsync of a path (a file, or a directory after a create/rename/remove), and
small files replaced whole (written aside, fsynced, renamed over)."""

import os


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

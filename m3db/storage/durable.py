"""Durability on disk: fsync of a path (a file, or a directory after a create/rename/remove)."""

import os


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

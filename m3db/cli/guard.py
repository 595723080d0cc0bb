"""What every command is checked for before it runs, and how an interrupted one ends: only
build, merge and train make PATH (every other command needs a database or package there);
text arguments must be UTF-8; Ctrl-C is one line saying what is kept, a closed pipe a quiet
exit. Imports the storage layer's names for a database directory; main.py calls these.
"""

import os
import sys

from ..errors import InvalidInputError, NotFoundError
from ..storage.store import CATALOG_FILE, holds_catalog, require_catalog_if_data
from ..storage.validate import names_package

# commands that make a new database (or a training directory) at PATH; every other command needs
# one there already, and a writable open of a typo'd or empty folder must not create one
CREATES = ("build", "merge", "train")
INTERRUPTED = {
    "build": "interrupted; every committed batch is kept: run the same command again to resume",
    "merge": "interrupted; every merged commit is kept: run the same command again to resume",
    "reencode": "interrupted; every staged batch is kept: run the same command again to resume",
    "sync": "interrupted; nothing was changed (a sync is one commit): run the same command again",
    "train": "interrupted; the last checkpoint is kept: run the same command again to resume",
}
# command-line text that reaches the model or the catalog (paths may hold any bytes: not these)
TEXT_ARGUMENTS = {"text": "the text", "question": "the question", "param": "a -p value"}


def require_database(args) -> None:
    """Refuse PATH when no database (or package file) is there, before anything opens it: a
    writable connect() would make a new, empty database in a typo'd or empty folder."""
    path = args.path
    if os.path.isfile(path):
        return  # a package file (or not one: connect() says which)
    if not os.path.exists(path):
        if names_package(path):
            raise NotFoundError(f"no package file at {path!r}; check the path (make one with `m3db pack DB OUT.m3kb`)")
        raise NotFoundError(
            f"no database at {path!r}: nothing is there; check the path (`m3db build` and `m3db merge` make a new "
            "m3db database)"
        )
    if args.command == "check" and args.repair:
        return  # a lost catalog is what --repair rebuilds
    require_catalog_if_data(path)  # segments without a catalog: the error names `m3db check --repair`
    if not holds_catalog(path):
        raise NotFoundError(
            f"no m3db database at {path!r}: the folder holds no {CATALOG_FILE}; check the path "
            "(`m3db build` and `m3db merge` make a new database)"
        )


def require_package_file(path) -> None:
    """`m3db verify` reads package files: a folder (a database, say) is named for what it is."""
    if os.path.isdir(path):
        if holds_catalog(path):
            raise InvalidInputError(
                f"{path!r} is an m3db database directory, not a package file: check a database with "
                f"`m3db check {path}` (verify reads the .m3kb files `m3db pack` writes)"
            )
        raise InvalidInputError(f"{path!r} is a folder, not a package file (.m3kb, written by `m3db pack`)")


def require_text(args) -> None:
    """Refuse text arguments that are not UTF-8 (the shell passes undecodable bytes as lone
    surrogates): the model, the embedder and DuckDB cannot take them."""
    from ..sql.check import utf8_problem

    for name, what in TEXT_ARGUMENTS.items():
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            problem = utf8_problem(value) if isinstance(value, str) else None
            if problem:
                raise InvalidInputError(f"{what} is not valid UTF-8 text: {problem}")


def quiet_stdout() -> None:
    """The reader of stdout went away (`m3db ... | head`): send what is still buffered nowhere,
    so the exit flush does not fail again (the Python documentation's recipe for SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file (captured in a test): nothing to flush at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)

"""The error tree. Every error m3db raises is an `M3DBError` with a stable `code`.

Each leaf also subclasses the builtin a caller would naturally catch (`ValueError`,
`KeyError`, `OSError`...), so code that does not know m3db still handles it sensibly.
The codes are documented in docs/errors.md and must never change meaning.
"""


class M3DBError(Exception):
    """An m3db operation failed."""

    code = "m3db_error"

    def __str__(self):
        return f"[{self.code}] {super().__str__()}"


class InvalidInputError(M3DBError, ValueError):
    """An argument is malformed: wrong shape, dtype, value or type. `option`, when set, names
    the argument at fault (a server reports it as the request field to fix)."""

    code = "invalid_input"

    def __init__(self, *args, option: str | None = None):
        super().__init__(*args)
        self.option = option


class ContextLengthError(InvalidInputError):
    """A prompt and the answer asked for do not fit the model's context."""

    code = "context_length"


class SpecMismatchError(M3DBError, ValueError):
    """A memory spec differs from the one the database was created with."""

    code = "spec_mismatch"


class DuplicateIdError(M3DBError, ValueError):
    """A memory id is already taken."""

    code = "duplicate_id"


class NotFoundError(M3DBError, KeyError):
    """No memory (or document) has the requested id."""

    code = "not_found"

    def __str__(self):  # KeyError would otherwise print the repr of the message
        return f"[{self.code}] {self.args[0] if self.args else ''}"


class FormatError(M3DBError, ValueError):
    """Bytes on disk are not what m3db wrote: corrupt, truncated or from another format."""

    code = "format"


class LockedError(M3DBError, OSError):
    """Another process holds the database in a way that excludes this open."""

    code = "locked"


class ReadOnlyError(M3DBError, PermissionError):
    """A write was attempted on a database opened with read_only=True."""

    code = "read_only"


class ClosedError(M3DBError, RuntimeError):
    """The database was closed."""

    code = "closed"


class QueryError(M3DBError, ValueError):
    """A SQL statement or filter could not be run."""

    code = "query"


class TooManyRowsError(QueryError):
    """A statement gives more rows than the `max_rows` it was run with (db.sql's; a server's cap)."""

    code = "too_many_rows"


class DependencyError(M3DBError, ImportError):
    """An optional package that this call needs is not installed."""

    code = "missing_dependency"


class StorageError(M3DBError, OSError):
    """Reading or writing the database's files failed (a full disk, a permission, an I/O error):
    the operation was rolled back; `errno` is the operating system's, when it gave one."""

    code = "storage"

    def __str__(self):
        # OSError's own text would be "[Errno N] None: file" once errno is set: keep the message
        return f"[{self.code}] {self.args[0] if self.args else ''}"


def storage_error(e: OSError, what: str) -> StorageError:
    """An operating system's I/O error as a StorageError naming what failed and the file, with
    the errno kept (ENOSPC: the disk is full; EACCES: a permission; EIO: the device)."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    error = StorageError(f"{what} failed{where}: {e.strerror or e}; the database is as its last commit left it")
    error.errno, error.filename = e.errno, e.filename
    return error


def rolled_back(e: Exception, what: str) -> StorageError:
    """A commit that failed (the disk, a permission, the catalog's writer) and was rolled back:
    nothing of it was written. The errno and file are kept when the failure had them."""
    error = StorageError(f"{what} failed and was rolled back, nothing was written: {e}")
    error.errno, error.filename = getattr(e, "errno", None), getattr(e, "filename", None)
    return error

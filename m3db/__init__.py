"""m3db: an embedded database for the explicit memory of language models.

    import m3db
    db = m3db.connect("kb.m3db")                  # bound to the bundled model (loaded on first use)
    db.add("Paris is the capital of France.")
    print(db.generate("What is the capital of France?").text)

This module only re-exports; each noun lives in its own module, in layers (docs/architecture.md):
storage/ (records, codecs, segments, catalog, index, the commit protocol), search/ (recall plans
and results), sql/, package/, knowledge/ (text in, answers out), cli/; database.py composes them.
"""

from .database import CheckReport, Database, attach, connect
from .errors import (
    ClosedError,
    ContextLengthError,
    DependencyError,
    DuplicateIdError,
    FormatError,
    InvalidInputError,
    LockedError,
    M3DBError,
    NotFoundError,
    QueryError,
    ReadOnlyError,
    SpecMismatchError,
    StorageError,
    TooManyRowsError,
)
from .knowledge import sources
from .knowledge.answer import Answer, Source
from .knowledge.ingest import IngestReport
from .knowledge.reencode import reencode
from .package.verify import VerifyReport, verify
from .package_set import PackageSet
from .search.results import Match, Matches
from .sql.rows import Rows
from .storage.codec import CODECS, Codec
from .storage.record import Memory
from .storage.repair import repair
from .storage.spec import MemorySpec
from .storage.store import IndexSaveWarning
from .version import __version__

__all__ = [
    "Answer",
    "CODECS",
    "CheckReport",
    "ClosedError",
    "ContextLengthError",
    "Codec",
    "Database",
    "DependencyError",
    "DuplicateIdError",
    "FormatError",
    "IndexSaveWarning",
    "IngestReport",
    "InvalidInputError",
    "LockedError",
    "M3DBError",
    "Match",
    "Matches",
    "Memory",
    "MemorySpec",
    "NotFoundError",
    "PackageSet",
    "QueryError",
    "reencode",
    "repair",
    "ReadOnlyError",
    "Rows",
    "Source",
    "SpecMismatchError",
    "StorageError",
    "TooManyRowsError",
    "VerifyReport",
    "__version__",
    "attach",
    "connect",
    "sources",
    "verify",
]

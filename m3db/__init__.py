"""m3db: an embedded database for the explicit memory of language models.

    import m3db
    db = m3db.connect("kb.m3db")                  # bound to the bundled model (loaded on first use)
    db.add("Paris is the capital of France.")
    print(db.generate("What is the capital of France?").text)

This module only re-exports; each noun lives in its own module.
"""

from .codec import CODECS, Codec
from .database import CheckReport, Database, connect
from .errors import (
    ClosedError,
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
)
from .attach import PackageSet, attach
from .knowledge import Answer, IngestReport, Source
from .package import VerifyReport, verify
from .query import Rows
from .recall import Match, Matches
from .record import Memory
from .spec import MemorySpec

__version__ = "0.1.0"

__all__ = [
    "Answer", "CODECS", "CheckReport", "ClosedError", "Codec", "Database", "DependencyError", "DuplicateIdError", "FormatError",
    "IngestReport", "InvalidInputError", "LockedError", "M3DBError", "Match", "Matches", "Memory", "MemorySpec",
    "NotFoundError", "PackageSet", "QueryError", "ReadOnlyError", "Rows", "Source", "SpecMismatchError", "VerifyReport",
    "attach", "connect", "verify",
]

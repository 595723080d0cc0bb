"""The writer's half of a Ray build: a worker's encoded batch in, one commit out, as
`add_documents` commits a batch.

Owns `commit_batch`, which turns a packed batch (worker.py) into one transaction through the
database's public `add_memories` (the same checks, ids, documents and commit protocol as a local
build) and counts what it did into a `BuildReport`; and `raise_failure`, which raises a worker
that could not start as its own error class.
Imports: the engine's public names (`m3db.errors`, `m3db.extend`), numpy, worker.py (the wire format).
"""

import dataclasses

import numpy as np

from m3db.errors import InvalidInputError, M3DBError
from m3db.extend import EncodedArray

from .worker import unpack

__all__ = ["BuildReport", "commit_batch", "raise_failure"]

# what a worker's failure is raised as by the writer: its own class when it is one of these
_FAILURE_CLASSES = {
    cls.__name__: cls
    for cls in (FileNotFoundError, PermissionError, OSError, ValueError, ImportError, RuntimeError, MemoryError)
}


def _subclasses(cls) -> list:
    """cls and every class below it, at any depth (TooManyRowsError is a QueryError's)."""
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


_FAILURE_CLASSES.update({cls.__name__: cls for cls in _subclasses(M3DBError)})


def raise_failure(failure) -> None:
    """Raise a worker's failure (`worker.pack_failure`) as its own class where the writer knows it."""
    cls = _FAILURE_CLASSES.get(failure["type"], M3DBError)
    raise cls(failure["message"] if cls is not M3DBError else f"{failure['type']}: {failure['message']}")


# -- the writer ---------------------------------------------------------------------------------


@dataclasses.dataclass
class BuildReport:
    """What a Ray build did: documents added, skipped (already committed, or repeated), empty,
    failed (each in `errors` with its input position, source and the problem), memories written."""

    documents_added: int = 0
    documents_skipped: int = 0
    documents_empty: int = 0
    documents_failed: int = 0
    memories_added: int = 0
    errors: list = dataclasses.field(default_factory=list)

    def merge(self, other: "BuildReport") -> None:
        for f in dataclasses.fields(BuildReport):
            if f.name == "errors":
                self.errors.extend(other.errors)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def commit_batch(db, blob, report, *, first=None) -> int:
    """Commit one encoded batch (a worker's packed result) to `db` in one transaction, as
    add_documents commits a batch; return how many documents it held. first: the input position
    of its first document, for the report (default: the one the batch was packed with)."""
    result = unpack(blob)
    if "failure" in result:
        raise_failure(result["failure"])
    if first is not None:
        result["first"] = first
    spec, codec = db.spec, db.codec
    items, added, seen = [], 0, set()
    for k, r in enumerate(result["docs"]):
        state, source = r["state"], r.get("source")
        if state == "new" and source in seen:
            state = "duplicate"  # (a worker sees only its batch; this is for safety)
        if state == "error":
            report.documents_failed += 1
            report.errors.append({"document": result["first"] + k, "source": source, "error": r["error"]})
            continue
        if state == "duplicate":
            report.documents_skipped += 1
            continue
        existing = db.catalog.document_id(source)
        if existing is not None or state == "known":
            stored = [] if existing is None else [(a, b, t) for _, a, b, t in db.catalog.document_chunks(existing)]
            if stored == [(a, b, t) for a, b, t, *_ in r["chunks"]]:
                report.documents_skipped += 1  # committed before: a rerun resumes past it
                continue
            if existing is not None:
                report.documents_failed += 1
                report.errors.append(
                    {
                        "document": result["first"] + k,
                        "source": source,
                        "error": f"a document with source {source!r} is already in the database with other text. "
                        "A source names one document: pass a unique source for the new document",
                    }
                )
                continue
            raise M3DBError(f"document {source!r} was read as committed but is not; rerun the build")
        if state == "empty":
            report.documents_empty += 1
            continue
        seen.add(source)
        doc = r["doc"]
        document = {"source": source, "title": doc["title"], "uri": doc["uri"], "metadata": doc["metadata"] or None}
        for m in r["memories"]:
            shape = tuple(m["shape"])
            items.append(
                dict(
                    embedding=np.frombuffer(m["embedding"], "<f4"),
                    text=m["text"],
                    document=document,
                    ordinal=m["ordinal"],
                    char_start=m["char_start"],
                    char_end=m["char_end"],
                    metadata=dict(doc["metadata"]),
                    keys=EncodedArray(codec.name, codec.version, shape, m["keys"]),
                    values=EncodedArray(codec.name, codec.version, shape, m["values"]),
                    positions=np.frombuffer(m["positions"], np.uint8).reshape(shape[:3]),
                    token_count=m["token_count"],
                )
            )
        added += 1
    if items:
        if spec.embedding_dim != len(items[0]["embedding"]):
            raise InvalidInputError(
                f"a worker sent {len(items[0]['embedding'])}-dim embeddings; the database's are {spec.embedding_dim}"
            )
        with db.transaction():
            ids = db.add_memories(items)
        report.memories_added += len(ids)
    report.documents_added += added
    return len(result["docs"])

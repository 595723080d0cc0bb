"""Ingest: documents in, chunked, embedded, encoded and committed as memories.

`add_documents(db, documents)` is Database.add_documents: it checks each document, skips those
whose source is already committed (so a rerun resumes), chunks the rest into references of at
most the spec's reference length, embeds them, encodes them (warm start) or stores only their
text (cold start), and commits every batch through the database's public `add_memories`.
Imports: errors, progress and this package's chunker; the database arrives as an argument.
"""

import dataclasses
import hashlib

from ..errors import InvalidInputError
from ..progress import progress_bar
from .chunk import chunk_text

MAX_DOCUMENT_CHARS = 20_000_000  # 20 M characters: larger is almost surely not one document


@dataclasses.dataclass
class IngestReport:
    """What add_documents did: documents added, skipped (already committed, or empty), memories written."""

    documents_added: int = 0
    documents_skipped: int = 0
    documents_empty: int = 0
    memories_added: int = 0


def add_documents(
    db, documents, *, batch_size=16, progress=True, cold=False, replace=False, ids_out=None
) -> IngestReport:
    """See Database.add_documents. `ids_out`, a list, receives the new memory ids."""
    db.require_writable()
    for name, value in (("cold", cold), ("replace", replace)):
        if not isinstance(value, bool):
            raise InvalidInputError(f"{name} must be True or False, got {value!r}")
    model, embedder = db.models()
    report = IngestReport()
    bar = progress_bar(progress, "documents", total=_known_length(documents))
    batch = []
    try:
        for doc in documents:
            batch.append(check_document(doc, len(batch)))
            if len(batch) >= batch_size:
                _ingest(db, batch, model, embedder, report, ids_out, cold, replace)
                bar.update(len(batch))
                bar.set_postfix(memories=report.memories_added, refresh=False)
                batch = []
        if batch:
            _ingest(db, batch, model, embedder, report, ids_out, cold, replace)
            bar.update(len(batch))
    finally:
        bar.close()
    return report


def _conflict(source, where):
    return (
        f"a document with source {source!r} is already {where} with other text. A source names one document: "
        "pass a unique source= for a new document, or replace=True to forget the stored document's memories and "
        "add the new text in the same commit (the same text again is skipped, so a rerun resumes)"
    )


def _known_length(documents):
    """len(documents) when it has one (a list), else None: a generator is not consumed to count it."""
    try:
        return len(documents)
    except TypeError:
        return None


def check_document(doc, position) -> dict:
    """A document (a dict with `text`, or a string) checked and normalised: text, source (default: a
    hash of the text), title, uri and metadata (Nones dropped); InvalidInputError names the problem."""
    if isinstance(doc, str):
        doc = {"text": doc}
    if not isinstance(doc, dict):
        raise InvalidInputError(
            f"document #{position}: expected a dict with 'text' or a string, got {type(doc).__name__}"
        )
    text = doc.get("text")
    if not isinstance(text, str):
        raise InvalidInputError(
            f"document #{position}: text must be a str, got {type(text).__name__}"
            + (" (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(text, bytes) else "")
        )
    if len(text) > MAX_DOCUMENT_CHARS:
        raise InvalidInputError(
            f"document #{position} has {len(text):,} characters, over the {MAX_DOCUMENT_CHARS:,} limit; split it "
            "into several documents"
        )
    source = doc.get("source") or "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    metadata = {k: v for k, v in (doc.get("metadata") or {}).items() if v is not None}
    return {"text": text, "source": source, "title": doc.get("title"), "uri": doc.get("uri"), "metadata": metadata}


def _ingest(db, batch, model, embedder, report, ids_out, cold, replace):
    todo, chunks, stale = [], [], []
    seen = {}  # source -> text, within this batch
    for doc in batch:
        source = doc["source"]
        if source in seen:
            if seen[source] != doc["text"]:
                raise InvalidInputError(_conflict(source, "twice in this call"))
            report.documents_skipped += 1
            continue
        seen[source] = doc["text"]
        pieces = chunk_text(doc["text"], model.count_tokens, db.spec.reference_length)
        existing = db.catalog.document_id(source)
        if existing is not None:
            stored = db.catalog.document_chunks(existing)
            if [(p.start, p.end, p.text) for p in pieces] == [(a, b, t) for _, a, b, t in stored]:
                report.documents_skipped += 1  # committed before: a rerun resumes past it
                continue
            if not replace:
                raise InvalidInputError(_conflict(source, "in the database"))
            stale.extend(mid for mid, *_ in stored)
        if not pieces:
            report.documents_empty += 1
            continue
        todo.append((doc, pieces))
        chunks.extend(pieces)
    if not chunks and not stale:
        return
    texts = [c.text for c in chunks]
    vectors = embedder.embed(texts) if texts else []
    encoded = None if cold or not texts else model.encode(texts)
    items, i = [], 0
    for doc, pieces in todo:
        document = {
            "source": doc["source"],
            "title": doc["title"],
            "uri": doc["uri"],
            "metadata": doc["metadata"] or None,
        }
        for piece in pieces:
            item = dict(
                embedding=vectors[i],
                text=piece.text,
                document=document,
                ordinal=piece.ordinal,
                char_start=piece.start,
                char_end=piece.end,
                metadata=dict(doc["metadata"]),
            )
            if cold:
                item.update(cold=True, token_count=piece.tokens)
            else:
                e = encoded[i]
                item.update(
                    keys=e["keys"], values=e["values"], positions=e["positions"], token_count=int(e["token_count"])
                )
            items.append(item)
            i += 1
    with db.transaction():  # replaced documents: their old memories go in the same commit
        if stale:
            db.forget(stale)
        ids = db.add_memories(items) if items else []
    if ids_out is not None:
        ids_out.extend(ids)
    report.documents_added += len(todo)
    report.memories_added += len(ids)

"""Ingest: documents in, chunked, embedded, encoded and committed as memories.

`add_documents(db, documents)` is Database.add_documents: it checks each document, skips those
already committed as they are (the same source, chunks, title, uri and metadata: a rerun
resumes), chunks the rest into references of at most the spec's reference length, embeds them,
encodes them (warm start) or stores only their text (cold start), and commits every batch through
the database's public `add_memories`. A stored source given with other text, title, uri or
metadata is an error, or with replace=True is stored again: its old memories forgotten, its row
restated (the writer's `restate_document`) and its new memories added, in one commit.
Imports: errors, progress and this package's chunker; the database arrives as an argument.
"""

import dataclasses
import hashlib
import json

from ..errors import InvalidInputError
from ..progress import progress_bar
from ..storage.catalog import check_metadata_key, check_text
from .chunk import chunk_text

MAX_DOCUMENT_CHARS = 20_000_000  # 20 M characters: larger is almost surely not one document
# what a document dict may hold; anything else would be silently dropped, so it is refused
DOCUMENT_FIELDS = frozenset({"text", "source", "title", "uri", "metadata"})


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
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    # a string or a dict is iterable too, and would be added as one document per character or key
    if isinstance(documents, (str, bytes, dict)) or not hasattr(documents, "__iter__"):
        raise InvalidInputError(
            f"documents must be a list (or any iterable) of documents, got {type(documents).__name__}; "
            "for one document use db.add(text, source=...)"
        )
    model, embedder = db.models()
    report = IngestReport()
    bar = progress_bar(progress, "documents", total=_known_length(documents))
    batch = []
    try:
        for position, doc in enumerate(documents):
            batch.append(check_document(doc, position))
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


def _conflict(source, where, same_text=False):
    if same_text:
        return (
            f"a document with source {source!r} is already {where} with the same text but another title, uri or "
            "metadata. A source names one document: pass replace=True to store it as given (its memories are encoded "
            "again and replace the old ones in one commit), or leave out the fields that differ"
        )
    return (
        f"a document with source {source!r} is already {where} with other text. A source names one document: "
        "pass a unique source= for a new document, or replace=True to forget the stored document's memories and "
        "add the new text, title, uri and metadata in the same commit (the same document again is skipped, so a "
        "rerun resumes)"
    )


def _known_length(documents):
    """len(documents) when it has one (a list), else None: a generator is not consumed to count it."""
    try:
        return len(documents)
    except TypeError:
        return None


def document_source(text: str, source: str | None) -> str:
    """The source a document is stored under: its own, or (None or "") a hash of its text."""
    return source or "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


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
    unknown = sorted(map(str, set(doc) - DOCUMENT_FIELDS))
    if unknown:
        raise InvalidInputError(
            f"document #{position} has the field(s) {', '.join(map(repr, unknown))}; a document's fields are "
            f"{', '.join(sorted(DOCUMENT_FIELDS))}: put other values under 'metadata' "
            f"(e.g. {{'text': ..., 'metadata': {{{unknown[0]!r}: ...}}}})"
        )
    for name in ("source", "title", "uri"):
        value = doc.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidInputError(f"document #{position}: {name} must be a string or None, got {value!r}")
        if value is not None:
            check_text(f"document #{position}: {name}", value)
    if doc.get("metadata") is not None and not isinstance(doc["metadata"], dict):
        raise InvalidInputError(
            f"document #{position}: metadata must be a dict {{name: value}}, got {type(doc['metadata']).__name__}"
        )
    check_text(f"document #{position}", text)  # the tokenizer and the catalog take only valid Unicode
    if len(text) > MAX_DOCUMENT_CHARS:
        raise InvalidInputError(
            f"document #{position} has {len(text):,} characters, over the {MAX_DOCUMENT_CHARS:,} limit; split it "
            "into several documents"
        )
    source = document_source(text, doc.get("source"))
    for key in doc.get("metadata") or {}:  # every key, a None's and an empty document's too: refused alike
        try:
            check_metadata_key(key)
        except InvalidInputError as e:
            raise InvalidInputError(f"document #{position}: {str(e).split('] ', 1)[-1]}") from None
    metadata = {k: v for k, v in (doc.get("metadata") or {}).items() if v is not None}
    return {"text": text, "source": source, "title": doc.get("title"), "uri": doc.get("uri"), "metadata": metadata}


def _ingest(db, batch, model, embedder, report, ids_out, cold, replace):
    todo, chunks, stale = [], [], []
    seen = {}  # source -> (text, row), within this batch
    fresh = set()  # sources not in the database when checked
    replaced = set()  # stored sources whose row this commit restates
    for doc in batch:
        source = doc["source"]
        if source in seen:
            if seen[source][0] != doc["text"]:
                raise InvalidInputError(_conflict(source, "twice in this call"))
            if seen[source][1] != document_row(doc):
                raise InvalidInputError(
                    f"a document with source {source!r} is twice in this call with the same text but another title, "
                    "uri or metadata: which one to store is not known; pass each source once"
                )
            report.documents_skipped += 1
            continue
        seen[source] = (doc["text"], document_row(doc))
        pieces = chunk_text(doc["text"], model.count_tokens, db.spec.reference_length)
        existing, stored, info = _stored(db, source)
        if existing is None:
            fresh.add(source)
        else:
            if not _changed(doc, pieces, stored, info, replace, "in the database"):
                report.documents_skipped += 1  # committed before: a rerun resumes past it
                continue
            stale.extend(mid for mid, *_ in stored)
            replaced.add(source)
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
    items, i = {}, 0  # source -> its memories
    for doc, pieces in todo:
        document = document_row(doc)
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
            items.setdefault(doc["source"], []).append(item)
            i += 1
    with db.transaction():  # replaced documents: their old memories and their row go in the same commit
        for doc, pieces in todo:
            if doc["source"] not in fresh:
                continue
            # another thread sharing this database may have committed it since it was checked
            existing, stored, info = _stored(db, doc["source"])
            if existing is None:
                continue
            if _changed(doc, pieces, stored, info, replace, "in the database"):
                stale.extend(mid for mid, *_ in stored)
                replaced.add(doc["source"])
            else:
                del items[doc["source"]]
                report.documents_skipped += 1
        if stale:
            db.forget(stale)
        for doc, _ in todo:
            if doc["source"] in replaced and doc["source"] in items:
                # the row says what the new memories say: restated before they are staged (their
                # records carry their document's row, for repair)
                db.writer.restate_document(document_row(doc))
        new = [item for memories in items.values() for item in memories]
        ids = db.add_memories(new) if new else []
    if ids_out is not None:
        ids_out.extend(ids)
    report.documents_added += len(items)
    report.memories_added += len(ids)


def document_row(doc) -> dict:
    """The `documents` row a checked document asks for (what its memories' records carry)."""
    return {"source": doc["source"], "title": doc["title"], "uri": doc["uri"], "metadata": doc["metadata"] or None}


def _changed(doc, pieces, stored, info, replace, where) -> bool:
    """Whether a stored document is to be replaced by `doc`: False when it is the same document
    (the same chunks, and `doc`'s row matches the stored one: skipped, so a rerun resumes), True
    when it differs and replace=True; an InvalidInputError naming replace=True when it differs
    without it."""
    same_text = _same(pieces, stored)
    if same_text and (not pieces or described(document_row(doc), info, exactly=replace)):
        return False
    if not replace:
        raise InvalidInputError(_conflict(doc["source"], where, same_text))
    return True


def described(row, info, *, exactly) -> bool:
    """True when the stored row `info` says what `row` says of title, uri and metadata: all three
    when `exactly` (replace=True stores the row as passed, a field left out as empty), else the
    ones `row` gives (a re-add without replace=True that leaves a field out says nothing of it).
    Values compare as JSON text: 1 and True, 1 and 1.0 differ, as the stored columns keep them."""
    if info is None:
        return False
    info = dict(info, metadata=info.get("metadata") or None)  # add_memory may have stored {}

    def canonical(value):
        return json.dumps(value, sort_keys=True, default=repr)

    keys = [key for key in ("title", "uri", "metadata") if exactly or row[key] is not None]
    return all(canonical(row[key]) == canonical(info.get(key)) for key in keys)


def _stored(db, source):
    """(document id, its chunks [(memory id, start, end, text)], its row {source, title, uri,
    metadata}) of a committed source, else (None, [], None). Inside db.transaction(), memories
    that transaction forgets are not stored: a document whose memories are all being forgotten
    is added again, not skipped as already there (it was lost at commit)."""
    with db.mutex:  # the catalog's one connection serves one call at a time (threads share a database)
        existing = db.catalog.document_id(source)
        chunks = [] if existing is None else db.catalog.document_chunks(existing)
        info = None if existing is None else db.catalog.document_info(existing)
        leaving = db.writer.forgotten() if db.writer is not None else set()
    kept = [c for c in chunks if c[0] not in leaving]
    if chunks and not kept:
        return None, [], None
    return existing, kept, info


def _same(pieces, stored) -> bool:
    return [(p.start, p.end, p.text) for p in pieces] == [(a, b, t) for _, a, b, t in stored]

"""The writer: a store's one writer, its pending batch, and the commit protocol.

Commit protocol (what makes a killed process safe):
1. append every record of the commit to the active segment and fsync it;
2. one DuckDB transaction: the memory rows (which point at those bytes), document rows (new
   ones, and the replaced title, uri and metadata of restated ones), deletions, and the new
   commit number;
3. then the in-RAM location table and the vector index (a cache, saved now and then).
A crash before 2 leaves only garbage bytes past the last committed record: recovery on open
cuts them (store.py). A crash after 2 leaves the index behind: it is caught up on open.
A failure before 2 (a StorageError: the catalog and index modules turn what DuckDB and USearch
raise into m3db's errors) rolls the commit back; nothing after 2 fails the commit: the verb
returns, and a failed index save warns (store.try_save_index), never raises, so that an
error never reports as not written a commit that a retry or a reopen then finds.

Items arrive checked (validate.py's CheckedMemory); the writer assigns ids and documents,
encodes records, and stages them in a `PendingBatch` until the outermost transaction ends.
Imports: storage modules only.
"""

import contextlib
import dataclasses
import json
import zlib
from collections.abc import Iterator

import numpy as np

from ..errors import DuplicateIdError, InvalidInputError, M3DBError, NotFoundError, rolled_back, storage_error
from .record import HEADER_SIZE, encode_record, repair_fields
from .validate import CheckedMemory, check_document, widens, widest

COLD = "cold"  # the codec column of a memory stored as text only, encoded on first read


@dataclasses.dataclass
class MemoryRow:
    """A staged memory: its catalog row, and where its record's bytes went."""

    id: int
    document_id: int | None
    ordinal: int | None
    text: str
    char_start: int | None
    char_end: int | None
    codec: str
    token_count: int | None
    embedding: np.ndarray
    segment: int
    offset: int
    length: int
    checksum: int
    metadata: dict
    types: dict


@dataclasses.dataclass
class PendingBatch:
    """What the open transaction will commit: rows, new and restated documents, forgotten ids,
    and the segment mark to roll back to."""

    mark: tuple
    next_id: int  # the store's next automatic id when the batch began: a rollback burns no ids
    rows: list = dataclasses.field(default_factory=list)  # [MemoryRow]
    # [{"id", "source", "title", "uri", "metadata", "stored"}]: stored is True for a restated
    # document (its row is updated), False for a new one (inserted)
    documents: list = dataclasses.field(default_factory=list)
    forget: list = dataclasses.field(default_factory=list)  # [memory id]
    ids: set = dataclasses.field(default_factory=set)  # ids taken by rows of this batch
    forgotten_mark: int | None = None  # the forgotten log's size before this commit's frame


def payload_crc(blob: bytes) -> int:
    """The checksum the catalog keeps for a record: crc32 of everything after the frame header."""
    return zlib.crc32(blob[HEADER_SIZE:])


class Writer:
    """Stages adds and forgets into one pending batch and commits it atomically."""

    def __init__(self, store):
        self.store = store
        self.depth = 0  # nested transaction() calls; the outermost commits
        self.pending = None
        self._next_doc_id = None  # read from the catalog on first use

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group adds and forgets into one atomic commit: all of them land, or none."""
        self.depth += 1
        try:
            if self.depth == 1:
                try:
                    mark = self.store.segments.mark()
                except OSError as e:  # the writer's own I/O (a caller's errors in the body pass untouched)
                    raise storage_error(e, "starting a transaction") from e
                self.pending = PendingBatch(mark=mark, next_id=self.store.next_id)
            try:
                yield
            except BaseException:
                if self.depth == 1:
                    self.abort()
                raise
            else:
                if self.depth == 1:
                    self.commit()
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.pending = None

    # -- staging -------------------------------------------------------------------------------

    def check_ids(self, checked: list[CheckedMemory]) -> None:
        """Explicit ids are free, and each metadata key keeps one column type and one spelling
        (up to case)."""
        explicit = [c.id for c in checked if c.id is not None]
        if len(set(explicit)) != len(explicit):
            raise DuplicateIdError(
                f"ids repeat within the batch: {sorted(i for i in set(explicit) if explicit.count(i) > 1)}"
            )
        taken = [i for i in explicit if i in self.store.locations or i in self.pending.ids]
        if taken:
            raise DuplicateIdError(
                f"ids already in the database: {taken[:10]}; forget them first or omit id= to get new ones"
            )
        columns = dict(self.store.catalog.columns())
        # DuckDB column names ignore case: one spelling per name, the first one seen (a column's,
        # then this transaction's), else ALTER TABLE fails at commit, reported as storage damage
        committed = set(columns)
        spelling = {name.lower(): name for name in committed}
        for r in self.pending.rows:  # earlier adds of this transaction fix their keys' types too
            for key in r.metadata:
                spelling.setdefault(key.lower(), key)
            for key, sql_type in r.types.items():
                if sql_type and key not in columns:
                    columns[key] = sql_type
        for position, c in enumerate(checked):
            for key in c.metadata:
                first = spelling.setdefault(key.lower(), key)
                if first != key:
                    what = f"the existing column {first!r}" if first in committed else f"{first!r}, given earlier"
                    raise InvalidInputError(
                        f"metadata key {key!r} clashes with {what}: DuckDB column names ignore case; use {first!r}"
                    )
            for key, sql_type in c.types.items():
                have = columns.get(key)
                if not have and sql_type:
                    columns[key] = sql_type
                    continue
                if have and sql_type and not widens(sql_type, have) and not widens(have, sql_type):
                    raise InvalidInputError(
                        f"metadata {key!r} is a {have} column; the value {c.metadata[key]!r} is {sql_type}. "
                        "Use one type per metadata key"
                    )
            if isinstance(c.document, (int, np.integer)) and not self.document_exists(int(c.document)):
                raise NotFoundError(
                    f"memory #{position}: no document with id {c.document}; pass its source string to create it"
                )

    def document_exists(self, document_id: int) -> bool:
        pending = self.pending.documents if self.pending else []
        return any(d["id"] == document_id for d in pending) or self.store.catalog.has_document(document_id)

    def _document_id(self, document):
        """The id of `document` (an id, a source string, or a dict with `source` and optional
        title, uri, metadata), creating the document in this transaction on first use."""
        if document is None or isinstance(document, (int, np.integer)):
            return None if document is None else int(document)
        info = document if isinstance(document, dict) else {"source": document}
        source = info["source"]
        for doc in self.pending.documents:
            if doc["source"] == source:
                return doc["id"]
        existing = self.store.catalog.document_id(source)
        if existing is not None:
            return existing
        if self._next_doc_id is None:
            self._next_doc_id = self.store.catalog.next_document_id()
        doc_id = self._next_doc_id
        self._next_doc_id += 1
        self.pending.documents.append(dict(info, id=doc_id, stored=False))
        return doc_id

    def restate_document(self, document: dict) -> int:
        """Make `document` ({"source", and title, uri, metadata}) its source's row at this commit:
        a new source is created, a stored one keeps its id and gets this title, uri and metadata
        (None where absent), in the commit's one DuckDB transaction. The memories staged after
        this call carry the new values in their records (repair takes a document's row from its
        newest records), so a caller restates a document before it adds its new memories, and
        forgets those that carry the old values in the same commit (add_documents' replace=True
        does both). Return the document's id."""
        check_document("the document", document)
        row = {key: document.get(key) for key in ("source", "title", "uri", "metadata")}
        for doc in self.pending.documents:
            if doc["source"] == row["source"]:
                doc.update(row)
                return doc["id"]
        existing = self.store.catalog.document_id(row["source"])
        if existing is None:
            return self._document_id(row)
        self.pending.documents.append(dict(row, id=existing, stored=True))
        return existing

    def stage(self, checked: list[CheckedMemory]) -> list[int]:
        """Assign ids, encode every record, append it; return the ids. (Encoding in a thread
        pool was measured slower: a record is many small numpy calls that hold the GIL.)"""
        store, pending = self.store, self.pending
        ids, documents = [], []
        for c in checked:
            mid = c.id if c.id is not None else self._allocate_id()
            store.next_id = max(store.next_id, mid + 1)
            pending.ids.add(mid)
            ids.append(mid)
            documents.append(self._document_id(c.document))
        seq = store.commit_seq + 1  # the commit these records join (one writer: nothing commits in between)
        blobs = [
            encode_record(
                mid,
                store.codec,
                c.keys,
                c.values,
                c.positions,
                c.text,
                c.metadata,
                doc,
                c.ordinal,
                c.token_count,
                repair=repair_fields(c.embedding, seq, c.char_start, c.char_end, self.document_info(doc)),
            )
            for mid, doc, c in zip(ids, documents, checked)
        ]
        for mid, doc, c, blob in zip(ids, documents, checked, blobs):
            segment, offset = store.segments.append(blob)
            pending.rows.append(
                MemoryRow(
                    id=mid,
                    document_id=doc,
                    ordinal=c.ordinal,
                    text=c.text,
                    char_start=c.char_start,
                    char_end=c.char_end,
                    codec=COLD if c.cold else store.codec.name,
                    token_count=c.token_count,
                    embedding=c.embedding,
                    segment=segment,
                    offset=offset,
                    length=len(blob),
                    checksum=payload_crc(blob),
                    metadata=c.metadata,
                    types=c.types,
                )
            )
        return ids

    def document_info(self, document_id) -> dict | None:
        """What a record carries of its document (source, title, uri, metadata), for repair."""
        if document_id is None:
            return None
        for doc in self.pending.documents:
            if doc["id"] == document_id:
                return {key: doc.get(key) for key in ("source", "title", "uri", "metadata")}
        return self.store.catalog.document_info(document_id)

    def _allocate_id(self):
        store = self.store
        while store.next_id in store.locations or store.next_id in self.pending.ids:
            store.next_id += 1
        mid = store.next_id
        store.next_id += 1
        return mid

    def forget(self, ids: list[int]) -> None:
        """Stage the removal of committed memories; an id added in this same transaction is
        simply not committed."""
        pending = self.pending
        staged = {r.id for r in pending.rows}
        missing = [i for i in ids if i not in self.store.locations and i not in staged]
        if missing:
            raise NotFoundError(f"no memory with id {missing[0] if len(missing) == 1 else missing}")
        for i in ids:
            if i in staged:
                pending.rows = [r for r in pending.rows if r.id != i]
                pending.ids.discard(i)
            else:
                pending.forget.append(i)

    def forgotten(self) -> set[int]:
        """Committed memories the open transaction has staged for removal (empty outside one):
        a reader of the catalog inside the transaction must not count them as stored."""
        return set(self.pending.forget) if self.pending is not None else set()

    # -- committing ----------------------------------------------------------------------------

    def commit(self) -> None:
        store, p = self.store, self.pending
        if not (p.rows or p.forget):
            with contextlib.suppress(OSError):  # bytes it cannot cut are harmless, as in abort()
                store.segments.rollback_to(p.mark)  # forgotten-in-transaction adds leave bytes
            return
        seq = store.commit_seq + 1
        try:
            store.segments.sync()
            if p.forget:  # before the catalog: a committed forget is always in the log (repair reads it)
                p.forgotten_mark = store.forgotten.append(seq, p.forget)
            store.catalog.begin()
            for doc in p.documents:
                if doc["stored"]:
                    store.catalog.update_document(doc)
                else:
                    store.catalog.insert_document(doc)
            if p.rows:
                insert_rows(store.catalog, p.rows, seq)
            if p.forget:
                store.catalog.delete_memories(p.forget, seq)
            store.catalog.set_meta("commit_seq", seq)
            store.catalog.set_meta("next_id", store.next_id)
            store.catalog.commit()  # the commit point: nothing below may fail the commit
        except BaseException as e:
            self.abort()
            if isinstance(e, M3DBError) or not isinstance(e, Exception):
                raise
            # not the bytes on disk (that is FormatError's meaning): the write itself failed
            raise rolled_back(e, "commit") from e
        store.commit_seq = seq
        if p.rows:
            ids = np.array([r.id for r in p.rows], dtype=np.int64)
            store.locations.insert(
                ids,
                [r.segment for r in p.rows],
                [r.offset for r in p.rows],
                [r.length for r in p.rows],
                [r.checksum for r in p.rows],
            )
            store.index.add(ids, np.stack([r.embedding for r in p.rows]))
        if p.forget:
            store.locations.delete(p.forget)
            store.cache.discard(p.forget)
            store.index.remove(p.forget)
        store.index_changed(len(p.rows) + len(p.forget))

    def abort(self) -> None:
        """Undo the open batch. Never raises an I/O error of its own: it runs while another one
        is on its way out, and bytes it cannot cut are harmless (nothing points at them; the
        next writable open cuts them, as after a crash)."""
        self.store.catalog.rollback()
        self.store.next_id = self.pending.next_id
        self._next_doc_id = None
        with contextlib.suppress(OSError):
            self.store.segments.rollback_to(self.pending.mark)
        if self.pending.forgotten_mark is not None:
            with contextlib.suppress(OSError):  # a frame left names a forget asked for: see forgotten.py
                self.store.forgotten.truncate(self.pending.forgotten_mark)

    def relocate(self, ids: list[int], blobs: list[bytes], codec_name: str) -> None:
        """Point committed memories at new records (a cold memory's first encoding): append and
        fsync the records, then one catalog transaction moves the memories onto them (a crash
        in between leaves bytes that recovery cuts)."""
        store = self.store
        mark = store.segments.mark()
        lengths, checksums = [len(b) for b in blobs], [payload_crc(b) for b in blobs]
        try:
            places = [store.segments.append(blob) for blob in blobs]
            segments, offsets = [p[0] for p in places], [p[1] for p in places]
            store.segments.sync()
            store.catalog.begin()
            store.catalog.relocate_memories(ids, segments, offsets, lengths, checksums, codec_name)
            store.catalog.commit()
        except BaseException as e:
            store.catalog.rollback()
            with contextlib.suppress(OSError):  # as in abort(): uncut bytes are harmless
                store.segments.rollback_to(mark)
            if isinstance(e, M3DBError) or not isinstance(e, Exception):
                raise
            raise rolled_back(e, "storing the encoded memories") from e
        store.locations.move(ids, segments, offsets, lengths, checksums)


def insert_rows(catalog, rows, seq) -> None:
    """Insert staged rows into the catalog (inside its open transaction), adding a column for
    each new metadata key. `seq`: the commit number of every row, or one per row (repair)."""
    columns = catalog.columns()
    for key in sorted({k for r in rows for k, t in r.types.items() if t}):
        if key not in columns:
            catalog.add_metadata_column(key, widest([r.types[key] for r in rows if r.types.get(key)]))
    columns = catalog.columns()
    emb = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        emb[i] = r.embedding
    batch = {
        "id": np.array([r.id for r in rows], dtype=np.int64),
        "document_id": _nullable([r.document_id for r in rows]),
        "ordinal": _nullable([r.ordinal for r in rows]),
        "char_start": _nullable([r.char_start for r in rows]),
        "char_end": _nullable([r.char_end for r in rows]),
        "text": np.array([r.text for r in rows], dtype=object),
        "token_count": _nullable([r.token_count for r in rows]),
        "embedding": emb,
        "segment": np.array([r.segment for r in rows], dtype=np.int32),
        "offset": np.array([r.offset for r in rows], dtype=np.int64),
        "length": np.array([r.length for r in rows], dtype=np.int32),
        "checksum": np.array([r.checksum for r in rows], dtype=np.uint64),
        "codec": np.array([r.codec for r in rows], dtype=object),
        "commit_seq": np.broadcast_to(np.asarray(seq, dtype=np.int64), (len(rows),)).copy(),
    }
    # a key whose values are all None so far has no column yet (no type to give it): its
    # Nones live in the records; the column comes with the key's first typed value
    for key in sorted({k for r in rows for k in r.metadata} & set(columns)):
        values = [r.metadata.get(key) for r in rows]
        if columns.get(key) == "JSON":
            values = [None if v is None else json.dumps(v) for v in values]
        batch[key] = _nullable(values, float if columns.get(key) == "DOUBLE" else None)
    catalog.insert_memories(batch)


def _nullable(values, cast=None):
    """A numpy column for DuckDB that keeps None as NULL (object dtype where needed)."""
    if all(v is not None for v in values):
        arr = np.array([cast(v) for v in values] if cast else values)
        if arr.dtype.kind in "iufb":
            return arr
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = None if v is None else (cast(v) if cast else v)
    return out

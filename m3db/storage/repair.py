"""Repair: rebuild a lost or damaged catalog from the records in the segments.

The catalog is the only place that says which record bytes are live. When it is deleted or its
blocks are damaged, the records still describe themselves: each carries its id, text, metadata,
document (source, title, uri, metadata), embedding and commit number (record.py's repair
fields), and `forgotten.log` says which ids later commits forgot. `spec.json` holds the spec,
and `codebook.msgpack` a trained codec's parameters (without it a pq database is refused).

`repair(path)`:
1. takes the database's write lock (nobody else may have it open);
2. reads every segment from front to back; a damaged stretch is skipped to the next record
   whose frame checks out, and counted;
3. keeps, per id, the record of the latest commit (and of those, the last written: a cold
   memory's encoded record follows its text-only one), unless the forgotten log says a later
   or equal commit forgot it; a document's row is what its newest kept record says (a replace
   restates the row and its new records carry it);
4. writes the new catalog under a temporary name, `catalog.duckdb.repairing` (one transaction
   with those memories and their documents), checkpoints and fsyncs it;
5. removes the index files (a cache), moves the old catalog aside as `catalog.duckdb.damaged-N`
   (never deleted: it may hold what a person wants to recover by hand) and renames the new one
   into place.
Until that rename there is no catalog that could say the segments are empty (a new catalog's
recovery would remove every segment): a repair killed before it leaves the old catalog, or
none, and a temporary file that the next repair removes before it starts again. The next open
rebuilds the vector index from the new catalog, as after any index loss.

Records written before repair fields existed lack the embedding: an `embedder` (with the
spec's fingerprint) embeds their text again, or repair refuses and changes nothing. A memory
whose commit was cut short by a crash between its fsync and its catalog commit comes back:
its bytes were whole, and nothing else tells it from a committed one; so does one of a commit
that failed and whose bytes could not be cut (the cut itself failed: see writer.py's abort).
Imports: storage modules only.
"""

import contextlib
import os

import numpy as np

from ..errors import FormatError, InvalidInputError
from .catalog import Catalog, metadata_sql_type
from .codec import codec_class, load_codec
from .durable import fsync_path
from .forgotten import ForgottenLog
from .index import INDEX_FILE, STATE_FILE
from .lock import DatabaseLock
from .segment import SegmentStore
from .spec import MemorySpec
from .store import CATALOG_FILE, CODEBOOK_FILE, SEGMENTS_DIR, SPEC_FILE
from .writer import COLD, MemoryRow, insert_rows, payload_crc

BUILDING = ".repairing"  # the new catalog is built as catalog.duckdb.repairing, renamed when whole


def repair(path, *, embedder=None) -> dict[str, int | str]:
    """Rebuild the catalog of the database at `path` from its segments; return what was found:
    memories, documents, records read, superseded (older records of an id), forgotten, damaged
    stretches skipped, re-embedded, and `moved_aside` (where the old catalog went, or "")."""
    directory = os.fspath(path)
    spec_path = os.path.join(directory, SPEC_FILE)
    if not os.path.isdir(os.path.join(directory, SEGMENTS_DIR)):
        raise FormatError(f"{directory!r} has no {SEGMENTS_DIR}/ folder: there is nothing to rebuild a catalog from")
    try:
        with open(spec_path) as f:
            spec = MemorySpec.from_json(f.read())
    except FileNotFoundError:
        raise FormatError(
            f"{spec_path!r} is missing: this database was written before m3db kept its spec beside the catalog, or "
            "the file was deleted. Restore catalog.duckdb from a backup or rebuild the knowledge base from its sources"
        ) from None
    codebook = _codebook(directory, spec)
    if embedder is not None and getattr(embedder, "fingerprint", None) != spec.embedder_fingerprint:
        raise InvalidInputError(
            f"the embedder's fingerprint {getattr(embedder, 'fingerprint', None)!r} is not the database's "
            f"{spec.embedder_fingerprint!r}: pass the embedder the database was built with"
        )
    lock = DatabaseLock(directory, read_only=False)
    try:
        return _rebuild(directory, spec, embedder, codebook)
    finally:
        lock.release()


def _codebook(directory, spec) -> bytes | None:
    """A trained codec's parameters from `codebook.msgpack` (checked), or None for an untrained
    codec: without them no record of the database could be decoded, so repair refuses."""
    cls = codec_class(spec.codec)
    if not cls.trained:
        return None
    path = os.path.join(directory, CODEBOOK_FILE)
    try:
        with open(path, "rb") as f:
            params = f.read()
    except OSError as e:
        raise FormatError(
            f"{path!r} cannot be read ({e.strerror}): the database's records are encoded with the trained codec "
            f"{spec.codec}, whose codebook lived in the lost catalog and in that file. Nothing was changed; restore "
            "catalog.duckdb or the codebook file from a backup"
        ) from None
    try:
        load_codec(spec.codec, params)
    except FormatError as e:
        raise FormatError(f"{path!r}: {e}. Nothing was changed; restore it or catalog.duckdb from a backup") from e
    return params


def _rebuild(directory, spec, embedder, codebook):
    segments = SegmentStore(os.path.join(directory, SEGMENTS_DIR), read_only=True)
    try:
        latest, counts = _scan(segments)
    finally:
        segments.close()
    log = ForgottenLog(directory)
    forgotten = log.read()
    # compact() empties the log but keeps the commit and the next id so far: never go below them
    # (a new memory must not get the id of a forgotten one)
    high_seq, high_next_id = log.high_water()
    live = {i: r for i, r in latest.items() if forgotten.get(i, -1) < r["payload"].get("seq", 0)}
    counts["forgotten"] = len(latest) - len(live)
    missing = [i for i, r in live.items() if "embedding" not in r["payload"]]
    if missing and embedder is None:
        raise FormatError(
            f"{len(missing)} record(s) (e.g. memory {missing[0]}) were written before records carried their "
            "embedding: pass embedder= (the one the database was built with) to embed their text again. "
            "Nothing was changed"
        )
    vectors = {}
    if missing:
        embedded = np.asarray(embedder.embed([live[i]["payload"]["text"] for i in missing]), dtype=np.float32)
        vectors = dict(zip(missing, embedded))
    counts["re_embedded"] = len(missing)
    rows, seqs, documents, newest = [], [], {}, {}
    for i in sorted(live):
        record = live[i]
        d = record["payload"]
        doc = d.get("document")
        document_id = d.get("document_id")
        if document_id is not None and isinstance(doc, dict) and doc.get("source") is not None:
            # a replace restates a document's row: its newest records (the latest commit, and of
            # it the last written) say what the row was last (older live ones come back only from
            # a commit cut short between its fsync and its forgotten log)
            when = (int(d.get("seq", 0)), record["segment"], record["offset"])
            if when > newest.get(int(document_id), (-1, -1, -1)):
                newest[int(document_id)] = when
                documents[int(document_id)] = dict(doc, id=int(document_id))
        elif document_id is not None:
            document_id = None  # an older record names a document it cannot describe
        embedding = vectors[i] if i in vectors else np.frombuffer(d["embedding"], dtype="<f4").copy()
        if embedding.shape != (spec.embedding_dim,):
            raise FormatError(
                f"memory {i}: its record's embedding has {embedding.size} values, the spec says {spec.embedding_dim}"
            )
        metadata = d.get("metadata") or {}
        rows.append(
            MemoryRow(
                id=i,
                document_id=document_id,
                ordinal=d.get("ordinal"),
                text=d["text"],
                char_start=d.get("char_start"),
                char_end=d.get("char_end"),
                codec=COLD if d.get("cold") else d["codec"],
                token_count=d.get("token_count"),
                embedding=embedding,
                segment=record["segment"],
                offset=record["offset"],
                length=record["length"],
                checksum=record["checksum"],
                metadata=metadata,
                types={key: metadata_sql_type(key, value) for key, value in metadata.items()},
            )
        )
        seqs.append(int(d.get("seq", 0)))
    building = os.path.join(directory, CATALOG_FILE + BUILDING)
    _remove_catalog_file(building)  # a killed repair's: it is built again from the start
    catalog = Catalog(building)
    try:
        catalog.create(spec.to_json(), spec.embedding_dim)
        catalog.begin()
        if codebook is not None:
            catalog.insert_codec(spec.codec, _codec_version(spec, live), codebook)
        sources = set()
        for doc in sorted(documents.values(), key=lambda doc: doc["id"]):
            if doc["source"] in sources:  # two ids claim one source: only the first keeps it
                continue
            sources.add(doc["source"])
            catalog.insert_document(doc)
        if rows:
            insert_rows(catalog, rows, np.array(seqs, dtype=np.int64))
        last = max(seqs + list(forgotten.values()) + [0, high_seq])
        catalog.set_meta("commit_seq", last)
        catalog.set_meta("next_id", max(max(list(live) + list(forgotten) + [-1]) + 1, high_next_id))
        catalog.commit()
        catalog.checkpoint()
    finally:
        catalog.close()
    if os.path.exists(building + ".wal"):  # the checkpoint folds it in; a file left would be lost
        raise FormatError(f"{building!r}: the new catalog's WAL was not checkpointed; nothing was changed, run again")
    fsync_path(building)
    moved = _move_aside(directory)
    os.replace(building, os.path.join(directory, CATALOG_FILE))
    fsync_path(directory)
    counts.update(memories=len(rows), documents=len(sources), moved_aside=moved)
    return counts


def _codec_version(spec, live) -> int:
    """The version a trained codec's row is stored at: that of the records in it (a database an
    older m3db wrote keeps its version), or this m3db's when none is encoded."""
    cls = codec_class(spec.codec)
    found = {r["payload"].get("codec_version") for r in live.values() if r["payload"].get("codec") == spec.codec}
    readable = sorted(v for v in found if isinstance(v, int) and not isinstance(v, bool) and cls.reads(v))
    return readable[-1] if readable else cls.version


def _scan(segments):
    """{id: the latest record of it} and counts, reading every segment front to back."""
    latest, counts = {}, {"records": 0, "superseded": 0, "damaged": 0}
    for number in segments.numbers():
        try:
            found = list(segments.scan(number))
        except FormatError:
            counts["damaged"] += 1  # a segment whose own header is damaged: none of it can be trusted
            continue
        for offset, blob, payload in found:
            if payload is None:
                counts["damaged"] += 1
                continue
            counts["records"] += 1
            mid = int(payload["id"])
            record = {
                "payload": payload,
                "segment": number,
                "offset": offset,
                "length": len(blob),
                "checksum": payload_crc(blob),
            }
            old = latest.get(mid)
            if old is not None:
                counts["superseded"] += 1
                if old["payload"].get("seq", 0) > payload.get("seq", 0):
                    record = old  # a later commit's record was written earlier (compact copies keep order)
            latest[mid] = record
    return latest, counts


def _remove_catalog_file(path) -> None:
    """Remove a DuckDB file and its WAL, where they exist."""
    for name in (path, path + ".wal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def _move_aside(directory) -> str:
    """Move the old catalog (and its WAL) aside, and remove the index files; return the new name."""
    for name in (INDEX_FILE, STATE_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.remove(path)
    catalog = os.path.join(directory, CATALOG_FILE)
    if not os.path.exists(catalog):
        wal = catalog + ".wal"
        if os.path.exists(wal):
            os.remove(wal)  # a WAL without its database file is nothing DuckDB can use
        return ""
    n = 1
    while os.path.exists(f"{catalog}.damaged-{n}"):
        n += 1
    aside = f"{catalog}.damaged-{n}"
    os.replace(catalog, aside)
    if os.path.exists(catalog + ".wal"):
        os.replace(catalog + ".wal", aside + ".wal")
    return os.path.basename(aside)

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
   or equal commit forgot it, or the index files (whole, and this database's: their vectors
   are the records' embeddings) saved at a later commit do not hold it; a document's row is
   what its newest kept record says (a replace restates the row and its new records carry it);
   when the log cannot vouch for a memory (it is damaged or cut, or missing while the index
   shows forgets, or a commit left neither a record nor a frame) and the index does not either,
   repair refuses, naming the memories, unless `accept_resurrection=True` keeps them;
4. writes the new catalog under a temporary name, `catalog.duckdb.repairing` (one transaction
   with those memories and their documents), checkpoints and fsyncs it;
5. writes `forgotten.log` anew (what was kept out, and the high water) where it was damaged,
   missing or short of what the index showed, keeping the old one as `forgotten.log.damaged-N`;
6. removes the index files (a cache), moves the old catalog aside as `catalog.duckdb.damaged-N`
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
that failed and whose bytes could not be cut (the cut itself failed: see writer.py's abort),
unless the index, saved after it, shows it was never stored. What a damaged stretch of a
segment cost is named where anything knows it: the ids the index holds whose records are gone.
Imports: storage modules only.
"""

import contextlib
import dataclasses
import math
import os
import shutil

import numpy as np

from ..errors import FormatError, InvalidInputError
from .catalog import Catalog, metadata_sql_type
from .codec import codec_class, load_codec
from .durable import fsync_path
from .forgotten import FORGOTTEN_FILE, ForgottenLog
from .index import INDEX_FILE, STATE_FILE, VectorIndex
from .lock import DatabaseLock
from .segment import SegmentStore, segment_name
from .spec import MemorySpec
from .store import CATALOG_FILE, CODEBOOK_FILE, SEGMENTS_DIR, SPEC_FILE
from .writer import COLD, MemoryRow, insert_rows, payload_crc

BUILDING = ".repairing"  # the new catalog is built as catalog.duckdb.repairing, renamed when whole
PROBES = 1024  # index vectors compared with the records' embeddings before the index is evidence
SHOWN = 20  # ids a message names, at most


def repair(path, *, embedder=None, accept_resurrection=False) -> dict[str, object]:
    """Rebuild the catalog of the database at `path` from its segments; return what was found:
    memories, documents, records read, superseded (older records of an id), forgotten, damaged
    (stretches of segment bytes that could not be read) and `stretches` (each: segment, offset,
    bytes, the ids of the whole records after and before it, the ids lost with it), `lost` (ids
    the index held whose records are gone), re-embedded, `forgotten_log` ("whole", "missing" or
    "damaged"), `resurrected` (ids kept by accept_resurrection), `moved_aside` (where the old
    catalog went, or "") and `problems`: what was lost or could not be vouched for, empty when
    the rebuilt catalog holds exactly what the database held.

    Refuses (FormatError, nothing changed) when forgotten.log cannot vouch that some memories
    were never forgotten and the index cannot either; `accept_resurrection=True` keeps them."""
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
        return _rebuild(directory, spec, embedder, codebook, accept_resurrection)
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


def _rebuild(directory, spec, embedder, codebook, accept_resurrection):
    segments = SegmentStore(os.path.join(directory, SEGMENTS_DIR), read_only=True)
    try:
        scan = _scan(segments)
    finally:
        segments.close()
    latest, counts = scan.latest, scan.counts
    found = _forgets(directory, spec, scan)
    if found.unvouched and not accept_resurrection:
        raise FormatError(
            f"repair cannot vouch that {len(found.unvouched)} memories were never forgotten: {found.why()}; a "
            f"memory forgotten there would come back. Nothing was changed. The memories: {_ids(found.unvouched)}. "
            "Restore forgotten.log (or catalog.duckdb) from a backup and repair again, or keep them: "
            "`m3db check --repair --accept-resurrection` (Python: repair(path, accept_resurrection=True)), then "
            "forget again any that had been forgotten"
        )
    forgotten = found.forgotten
    live = {i: r for i, r in latest.items() if forgotten.get(i, -1) < _seq(r)}
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
        # never below a commit or an id anything has seen (compact() empties the log but keeps
        # the commit and the next id so far): a new memory must not get a forgotten one's id
        catalog.set_meta("commit_seq", found.last)
        catalog.set_meta("next_id", found.next_id)
        catalog.commit()
        catalog.checkpoint()
    finally:
        catalog.close()
    if os.path.exists(building + ".wal"):  # the checkpoint folds it in; a file left would be lost
        raise FormatError(f"{building!r}: the new catalog's WAL was not checkpointed; nothing was changed, run again")
    fsync_path(building)
    # before the index files go: a repair killed after this finds in the log what the index showed
    log_aside = _rewrite_log(directory, found) if found.rewrite else ""
    moved = _move_aside(directory)
    os.replace(building, os.path.join(directory, CATALOG_FILE))
    fsync_path(directory)
    counts.update(
        memories=len(rows),
        documents=len(sources),
        moved_aside=moved,
        lost=found.lost,
        stretches=scan.stretches,
        forgotten_log=found.state,
        resurrected=found.unvouched,
        problems=_stretch_problems(scan, found) + found.problems(log_aside),
    )
    return counts


def _codec_version(spec, live) -> int:
    """The version a trained codec's row is stored at: that of the records in it (a database an
    older m3db wrote keeps its version), or this m3db's when none is encoded."""
    cls = codec_class(spec.codec)
    found = {r["payload"].get("codec_version") for r in live.values() if r["payload"].get("codec") == spec.codec}
    readable = sorted(v for v in found if isinstance(v, int) and not isinstance(v, bool) and cls.reads(v))
    return readable[-1] if readable else cls.version


@dataclasses.dataclass
class Scan:
    """What the segments hold: per id its latest record, the counts, every commit a record names
    (`undated`: records written before records carried their commit), the damaged stretches."""

    latest: dict = dataclasses.field(default_factory=dict)
    counts: dict = dataclasses.field(default_factory=lambda: {"records": 0, "superseded": 0, "damaged": 0})
    commits: set = dataclasses.field(default_factory=set)
    undated: int = 0
    stretches: list = dataclasses.field(default_factory=list)


def _scan(segments) -> Scan:
    """Every segment read front to back: each id's latest record, and each damaged stretch with
    the ids of the whole records around it (None at a segment's edge)."""
    scan, latest = Scan(), {}
    scan.latest = latest
    for number in segments.numbers():
        try:
            found = list(segments.scan(number))
        except FormatError:  # a segment whose own header is damaged: none of it can be trusted
            found = [(0, None, None)]
        stretch, after = None, None  # the damaged stretch being read; the last whole record's id
        for k, (offset, blob, payload) in enumerate(found):
            if payload is None:
                if stretch is None:
                    stretch = {"segment": segment_name(number), "offset": offset, "after": after, "before": None}
                    scan.stretches.append(stretch)
                end = found[k + 1][0] if k + 1 < len(found) else segments.size(number)
                stretch["bytes"] = end - stretch["offset"]
                continue
            mid = int(payload["id"])
            if stretch is not None:
                stretch["before"], stretch = mid, None
            after = mid
            scan.counts["records"] += 1
            if "seq" in payload:
                scan.commits.add(int(payload["seq"]))
            else:
                scan.undated += 1
            record = {
                "payload": payload,
                "segment": number,
                "offset": offset,
                "length": len(blob),
                "checksum": payload_crc(blob),
            }
            old = latest.get(mid)
            if old is not None:
                scan.counts["superseded"] += 1
                if _seq(old) > _seq(record):
                    record = old  # a later commit's record was written earlier (compact copies keep order)
            latest[mid] = record
    scan.counts["damaged"] = len(scan.stretches)
    return scan


def _seq(record) -> int:
    return int(record["payload"].get("seq", 0))


@dataclasses.dataclass
class Forgets:
    """Which memories were forgotten, and on what evidence: the log's frames, and the ids the index
    held at commit `index_seq` (-1: no index to trust)."""

    forgotten: dict  # {id: the commit that forgot it}: the log's, and the index's (at index_seq)
    by_index: list  # kept out on the index's word alone (the log does not name them)
    unvouched: list  # neither the log nor the index can say that they were not forgotten
    lost: list  # the index held them; no record of them could be read
    state: str  # forgotten.log: "whole", "missing" (or empty) or "damaged"
    extent: tuple | None  # (bytes read as whole frames, the file's size)
    read_to: int  # the last commit a readable frame names (-1: none)
    gaps: list  # commits after the log's high water that left neither a record nor a frame
    index_seq: int
    last: int  # the last commit anything here names
    next_id: int

    @property
    def rewrite(self) -> bool:
        return self.state != "whole" or bool(self.gaps or self.by_index)

    def why(self) -> str:
        """What the log cannot vouch for, and whether the index can."""
        if self.state == "damaged":
            after = f"after commit {self.read_to}" if self.read_to >= 0 else "to it"
            out = (
                f"{FORGOTTEN_FILE} is damaged from byte {self.extent[0]} of {self.extent[1]}, so the forgets written "
                f"{after} cannot be read"
            )
        elif self.state == "missing":
            out = f"{FORGOTTEN_FILE} is missing or empty"
            if self.by_index:
                out += f", yet the index shows that {len(self.by_index)} memories here were forgotten"
        else:
            out = f"{FORGOTTEN_FILE} is whole but names no commit {_ids(self.gaps)}"
        if self.gaps and self.state != "whole":
            out += f", and commits {_ids(self.gaps)} left neither a record nor a frame in it"
        elif self.gaps:
            out += ", and those commits left no record either (the log was cut, or a compact could not write it anew)"
        if self.index_seq < 0:
            return out + "; there is no index (whole, and this database's) to say which memories were still stored"
        return out + f"; the index says which memories were still stored at commit {self.index_seq}"

    def problems(self, aside) -> list[str]:
        out = []
        if self.state == "damaged" or self.gaps or self.by_index or (self.state == "missing" and self.unvouched):
            text = self.why()
            if self.by_index:
                text += f": {len(self.by_index)} memories it does not hold were kept out ({_ids(self.by_index)})"
            if self.index_seq >= 0:
                text += f"; a forget after commit {self.index_seq} written only to the lost part cannot be seen"
            kept = f", the old one kept as {aside}" if aside else ""
            out.append(f"{text}. {FORGOTTEN_FILE} was written anew with what repair kept out{kept}")
        if self.unvouched:
            out.append(
                f"{len(self.unvouched)} memories were kept though repair cannot vouch that they were never forgotten "
                f"(accept_resurrection): {_ids(self.unvouched)}; forget again any that had been forgotten"
            )
        return out


def _forgets(directory, spec, scan) -> Forgets:
    """Which memories to keep out, and which no evidence here vouches for. A commit may forget
    only what an earlier one stored, so a memory is in doubt when a commit after the last one
    that vouches for it (its own, or the index's) may hold a forget that cannot be read: a
    damaged or missing log hides every commit after its last readable frame, a whole one those
    that left no frame and no record. With the index, doubt reaches the last commit anything
    here names; without it, any commit at all (a forget after the last record leaves no trace)."""
    log = ForgottenLog(directory)
    frames = log.frames()
    extent = log.extent
    forgotten = log.read()
    high_seq, high_next_id = log.high_water()
    latest = scan.latest
    index_seq, keys = _index_evidence(directory, spec, latest)
    frame_seqs = {int(e["seq"]) for e in frames}
    cleared = max((int(e["seq"]) for e in frames if "next_id" in e), default=0)  # clear(): all before it vouched
    last = max([0, high_seq, index_seq, *scan.commits, *forgotten.values()])
    known = scan.commits | frame_seqs
    gaps = [] if scan.undated else [s for s in range(cleared + 1, last + 1) if s not in known]
    by_index = {}
    if keys is not None:
        by_index = {i: index_seq for i, r in latest.items() if forgotten.get(i, -1) < _seq(r) <= index_seq}
        by_index = {i: s for i, s in by_index.items() if i not in keys}
    state = "missing" if extent is None or extent[1] == 0 else "damaged" if extent[0] < extent[1] else "whole"
    read_to = max(frame_seqs, default=-1)
    tail = None  # every commit after this one may have forgotten something unreadable
    if state == "damaged":
        tail = max(read_to, 0)
    elif state == "missing" and (by_index or gaps or keys is None):
        tail = 0
    bound = last if keys is not None else math.inf
    top_gap = max(gaps, default=-1)
    unvouched = []
    for i, r in latest.items():
        seq = _seq(r)
        if forgotten.get(i, -1) >= seq or i in by_index:
            continue
        held = index_seq if keys is not None and i in keys and seq <= index_seq else seq
        if top_gap > held or (tail is not None and max(held, tail) < bound):
            unvouched.append(i)
    lost = []
    if keys is not None and cleared <= index_seq:  # else a compact may have removed a forgotten one's record
        lost = sorted(i for i in keys if i not in latest and forgotten.get(i, -1) <= index_seq)
    ids = [*latest, *forgotten, *(keys or ())]
    return Forgets(
        forgotten={**forgotten, **by_index},
        by_index=sorted(by_index),
        unvouched=sorted(unvouched),
        lost=lost,
        state=state,
        extent=extent,
        read_to=read_to,
        gaps=gaps,
        index_seq=index_seq,
        last=last,
        next_id=max(high_next_id, max(ids, default=-1) + 1),
    )


def _index_evidence(directory, spec, latest) -> tuple[int, set[int] | None]:
    """(the commit the saved index holds, the ids it holds), when its files are whole (their
    checksum) and this database's (its vectors are the records' embeddings); (-1, None) else."""
    index = VectorIndex(spec.embedding_dim, directory, read_only=True)
    try:
        seq = index.load()
        if seq < 0:
            return -1, None
        keys = index.keys()
        width = 4 * spec.embedding_dim
        ids = [
            i
            for i in keys.tolist()
            if i in latest and _seq(latest[i]) <= seq and len(latest[i]["payload"].get("embedding", b"")) == width
        ]
        if len(keys) and not ids:
            return -1, None  # nothing here to compare it with: it proves nothing
        if ids:
            ids = [ids[k] for k in np.unique(np.linspace(0, len(ids) - 1, min(PROBES, len(ids))).astype(np.int64))]
            embeddings = np.stack([np.frombuffer(latest[i]["payload"]["embedding"], dtype="<f4") for i in ids])
            if index.differs(np.asarray(ids, dtype=np.int64), embeddings).any():
                return -1, None  # another database's index files
        return seq, set(keys.tolist())
    finally:
        index.close()


def _stretch_problems(scan, found) -> list[str]:
    """A line per damaged stretch: where, between which memories, and which were lost with it (a
    lost id goes to the one stretch whose neighbours' ids bound it); one more for lost ids that no
    single stretch bounds."""
    out, placed = [], set()
    bounds = [(st["after"], st["before"]) for st in scan.stretches]
    for st, (after, before) in zip(scan.stretches, bounds):
        inside = [
            i
            for i in found.lost
            if sum((a is None or a < i) and (b is None or i < b) for a, b in bounds) == 1
            and (after is None or after < i)
            and (before is None or i < before)
        ]
        st["lost"] = inside
        placed.update(inside)
        near = [f"after memory {after}"] if after is not None else []
        near += [f"before memory {before}"] if before is not None else []
        where = f"{SEGMENTS_DIR}/{st['segment']} bytes {st['offset']}-{st['offset'] + st['bytes']}"
        where += f" ({', '.join(near)})" if near else " (the whole segment)"
        if inside:
            what = f"lost with them: {_named(inside)} (in the index, and no record of them reads)"
        elif found.index_seq >= 0:
            what = (
                "the index names no memory lost here (an older copy, a forgotten one, or one added after it was saved)"
            )
        else:
            what = "which memories they held is not known (there is no index to name them)"
        out.append(f"{where} could not be read: {what}")
    rest = [i for i in found.lost if i not in placed]
    if rest:
        out.append(f"lost: {_named(rest)} (in the index at commit {found.index_seq}, and no record of them reads)")
    return out


def _named(ids) -> str:
    return f"memory {ids[0]}" if len(ids) == 1 else f"memories {_ids(ids)}"


def _ids(ids) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:SHOWN])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > SHOWN else "")


def _rewrite_log(directory, found) -> str:
    """Keep the old forgotten.log aside (never deleted) and write it anew: what repair kept out
    and the high water. Returns the name the old one was kept as, or ""."""
    log = ForgottenLog(directory)
    aside = ""
    if os.path.exists(log.path):
        aside = _aside_name(log.path)
        shutil.copyfile(log.path, aside)
        fsync_path(aside)
    log.rewrite(found.forgotten, found.last, found.next_id)
    return os.path.basename(aside)


def _aside_name(path) -> str:
    n = 1
    while os.path.exists(f"{path}.damaged-{n}"):
        n += 1
    return f"{path}.damaged-{n}"


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
    aside = _aside_name(catalog)
    os.replace(catalog, aside)
    if os.path.exists(catalog + ".wal"):
        os.replace(catalog + ".wal", aside + ".wal")
    return os.path.basename(aside)

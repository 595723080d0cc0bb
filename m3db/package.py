"""Packages: one read-only file holding a whole knowledge base. `pack` writes it, `verify` checks it.

The frame (header, manifest, section table) is manifest.py's; this module owns the sections:
- `segment/NNNNNN`: a segment file byte for byte (segment.py's 16-byte header, then framed
  records back to back). Pack rewrites the live records in id order into fresh segments, so
  forgotten memories are not shipped and the layout is a function of the content alone.
- `catalog`: a canonical export of the catalog (not the DuckDB file, whose bytes differ from
  one write to the next), written here and read by catalog_export.py; attach re-materializes
  it into a DuckDB file in the cache directory (attach.py).
- `index`: the USearch HNSW graph, built single-threaded in id order so the bytes repeat.
Packing the same database twice gives byte-identical files: nothing depends on the clock,
dict order, thread timing or the database's write history.

Verify reads every byte with bounded memory (sections are hashed in READ_STEP pieces) and
never writes; nothing in a package is unpickled or executed.
"""

import hashlib
import mmap
import os
import struct
import sys
import zlib

import msgpack
import numpy as np

from .catalog import CATALOG_VERSION
from .catalog_export import (
    CHUNK_BYTES, CHUNK_ROWS, DOCUMENT_COLUMNS, MAX_CHUNK, META_KEYS, STREAM_NAME, STREAM_VERSION, read_catalog,
)
from .errors import FormatError, InvalidInputError, NotFoundError
from .index import CONNECTIVITY, EXPANSION_ADD, EXPANSION_SEARCH, VectorIndex
from .manifest import (
    ALIGN, FORMAT_NAME, FORMAT_VERSION, HEADER_PAGE, MAX_TEXT_FIELD, Frame, align, dump_manifest, pack_header,
    section_name, segment_number,
)
from .record import FORMAT_VERSION as RECORD_VERSION, HEADER_SIZE as RECORD_HEADER, decode_record, read_header
from .segment import DEFAULT_SEGMENT_SIZE, HEADER as SEG_HEADER, HEADER_SIZE as SEG_HEADER_SIZE, MAGIC as SEG_MAGIC, VERSION as SEG_VERSION

PACKAGE_SEGMENT_SIZE = DEFAULT_SEGMENT_SIZE
READ_STEP = 8 << 20
MAX_PROBLEMS = 100
# -- pack ----------------------------------------------------------------------------------------


class _Section:
    """Writes one section at the next aligned offset, hashing as it goes."""

    def __init__(self, f, name):
        pos = f.seek(0, os.SEEK_END)
        f.write(bytes(align(pos) - pos))
        self.f, self.name, self.offset, self.length = f, name, align(pos), 0
        self.hash = hashlib.sha256()

    def write(self, data):
        self.f.write(data)
        self.hash.update(data)
        self.length += len(data)

    def entry(self):
        return {"name": self.name, "offset": self.offset, "length": self.length, "sha256": self.hash.hexdigest()}


def pack(db, path, *, name=None, description=None, version=None, license=None, attribution=None, overwrite=False,
         progress=False):
    """Write the database `db` as one package file at `path`; return its manifest (a dict).

    name, description, version, license, attribution: strings stored in the manifest's
    `about` (name defaults to the database directory's name). The file is written to a
    temporary name beside `path` and renamed when complete. progress=True draws a bar on stderr.
    """
    about = {"name": name if name is not None else _default_name(db)}
    for key, value in (("description", description), ("version", version), ("license", license), ("attribution", attribution)):
        if value is not None:
            about[key] = value
    for key, value in about.items():
        if not isinstance(value, str) or len(value) > MAX_TEXT_FIELD:
            raise InvalidInputError(f"pack(): {key} must be a string of at most {MAX_TEXT_FIELD} characters, got {str(value)[:80]!r}")
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise InvalidInputError(f"{path!r} exists; pass overwrite=True (or --force) to replace it")
    if getattr(db, "_in_transaction", 0):
        raise InvalidInputError("pack() cannot run inside a transaction; call it after the transaction commits")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w+b") as f:
            f.write(bytes(HEADER_PAGE))  # the header is written last, once the manifest is known
            with _bar(progress, 2 * len(db.locations), "pack") as bar:
                manifest = _write_sections(db, f, about, bar)
            raw = dump_manifest(manifest)
            pos = f.seek(0, os.SEEK_END)
            f.write(bytes(align(pos) - pos))
            manifest_offset = align(pos)
            f.write(raw)
            f.seek(0)
            f.write(pack_header(manifest_offset, raw))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return manifest


def _default_name(db):
    base = os.path.basename(os.path.normpath(db.path)) if db.path != ":memory:" else "memory"
    for suffix in (".m3kb", ".m3db"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base or "knowledge-base"


def _write_sections(db, f, about, bar):
    ids = db.locations.ids.copy()
    cols = {k: v.copy() for k, v in db.locations.cols.items()}
    if len(np.unique(ids)) != len(ids):
        raise FormatError(f"{db.path!r}: memory ids repeat in the catalog; run `m3db check` and repair before packing")
    sections = []
    new_seg, new_off, record_bytes = _write_segments(db, f, ids, cols, sections, bar)
    catalog = _Section(f, "catalog")
    index = VectorIndex(db.spec.embedding_dim)
    counts, codec_hash = _write_catalog(db, catalog, ids, new_seg, new_off, index, bar)
    sections.append(catalog.entry())
    idx = _Section(f, "index")
    idx.write(index.to_bytes())
    sections.append(idx.entry())
    index.close()
    meta = db.catalog.meta()
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "about": about,
        "spec": db.spec.to_dict(),
        "codec": {"name": db.codec.name, "version": db.codec.version, "params_sha256": codec_hash},
        "counts": {"memories": len(ids), "documents": counts["documents"],
                   "segments": sum(1 for s in sections if s["name"].startswith("segment/")), "record_bytes": record_bytes},
        "build": {
            "m3db_version": _version(), "record_format": RECORD_VERSION, "segment_format": SEG_VERSION,
            "catalog_format": CATALOG_VERSION, "catalog_stream": STREAM_VERSION, "source_commit": int(meta["commit_seq"]),
            "index": f"usearch hnsw cos f16 connectivity={CONNECTIVITY} expansion_add={EXPANSION_ADD} "
                     f"expansion_search={EXPANSION_SEARCH} single-threaded, id order",
        },
        "sections": sorted(sections, key=lambda s: s["offset"]),
    }


def _version():
    from . import __version__
    return __version__


def _write_segments(db, f, ids, cols, sections, bar):
    """Copy every live record, in id order, into fresh segment sections; return their new places."""
    new_seg = np.zeros(len(ids), np.int32)
    new_off = np.zeros(len(ids), np.int64)
    current, number, record_bytes = None, 0, 0
    for i, mid in enumerate(ids.tolist()):
        seg, off, length, crc = (int(cols[c][i]) for c in ("segment", "offset", "length", "checksum"))
        blob = db.segments.read(seg, off, length)
        where = f"{db.path!r}: memory {mid} (segment {seg} @ {off})"
        read_header(blob, where)
        if zlib.crc32(blob[RECORD_HEADER:]) != crc:
            raise FormatError(f"{where}: record checksum mismatch; run `m3db check` and repair the database before packing")
        if current is None or (current.length + length > PACKAGE_SEGMENT_SIZE and current.length > SEG_HEADER_SIZE):
            if current is not None:
                sections.append(current.entry())
            number += 1
            current = _Section(f, section_name(number))
            head = SEG_HEADER.pack(SEG_MAGIC, SEG_VERSION, 0, number)
            current.write(head + struct.pack("<I", zlib.crc32(head)))
        new_seg[i], new_off[i] = number, current.length
        current.write(blob)
        record_bytes += length
        bar.update(1)
    if current is not None:
        sections.append(current.entry())
    return new_seg, new_off, record_bytes


def _write_catalog(db, out, ids, new_seg, new_off, index, bar):
    """Write the canonical catalog stream; feed the index the embeddings as they pass."""
    con = db.catalog.con
    columns = list(db.catalog.columns().items())
    meta = db.catalog.meta()
    codecs = con.execute("SELECT name, version, params FROM codecs ORDER BY name, version").fetchall()
    codecs = [[n, int(v), None if p is None else bytes(p)] for n, v, p in codecs]
    params = next((p for n, v, p in codecs if n == db.codec.name and v == db.codec.version), None)
    n_docs = con.execute("SELECT count(*) FROM documents").fetchone()[0]
    head = {
        "format": STREAM_NAME, "version": STREAM_VERSION,
        "meta": {k: str(meta[k]) for k in META_KEYS},
        "codecs": codecs,
        "memory_columns": [[n, "FLOAT[]" if n == "embedding" else t] for n, t in columns],
        "documents": int(n_docs), "memories": len(ids), "embedding_dim": db.spec.embedding_dim,
    }
    out.write(msgpack.packb(head, use_bin_type=True))
    # documents, in id order
    doc_select = ", ".join("epoch_us(created_at)" if c == "created_at" else f'"{c}"' for c, _, _ in DOCUMENT_COLUMNS)
    cur = con.execute(f"SELECT {doc_select} FROM documents ORDER BY id")
    while True:
        rows = cur.fetchmany(CHUNK_ROWS)
        if not rows:
            break
        _write_chunk(out, "documents", [list(c) for c in zip(*rows)], None, db.path)
    # memories, in id order, chunked by id ranges of the (sorted) location table
    scalar = [n for n, _ in columns if n != "embedding"]
    select = ", ".join("epoch_us(created_at)" if c == "created_at" else f'"{c}"' for c in scalar)
    seg_col, off_col = scalar.index("segment"), scalar.index("offset")
    i = 0
    while i < len(ids):
        j = min(len(ids), i + CHUNK_ROWS)
        lo, hi = int(ids[i]), int(ids[j - 1])
        rows = con.execute(f"SELECT {select} FROM memories WHERE id BETWEEN ? AND ? ORDER BY id", [lo, hi]).fetchall()
        emb = con.execute("SELECT embedding FROM memories WHERE id BETWEEN ? AND ? ORDER BY id", [lo, hi]).fetchnumpy()["embedding"]
        if len(rows) != j - i or [r[0] for r in rows] != ids[i:j].tolist():
            raise FormatError(f"{db.path!r}: the catalog and the location table disagree between ids {lo} and {hi}; run `m3db check`")
        cols = [list(c) for c in zip(*rows)]
        cols[seg_col] = new_seg[i:j].tolist()
        cols[off_col] = new_off[i:j].tolist()
        vectors = np.ascontiguousarray(np.stack(list(emb)), dtype="<f4") if len(emb) else np.zeros((0, db.spec.embedding_dim), "<f4")
        _write_chunk(out, "memories", cols, vectors, db.path)
        # single-threaded, in id order: HNSW's graph (and so the file) is then the same every time
        index.add(ids[i:j], vectors, threads=1)
        bar.update(j - i)
        i = j
    out.write(msgpack.packb({"t": "end"}, use_bin_type=True))
    return {"documents": int(n_docs)}, hashlib.sha256(params or b"").hexdigest()


def _write_chunk(out, kind, cols, vectors, where):
    """Write rows as one chunk, or as halves while a chunk would pass CHUNK_BYTES (long texts),
    so that every object stays readable under the reader's MAX_CHUNK bound."""
    n = len(cols[0])
    obj = {"t": kind, "n": n, "columns": cols}
    if vectors is not None:
        obj["embedding"] = vectors.tobytes()
    blob = msgpack.packb(obj, use_bin_type=True)
    if len(blob) > CHUNK_BYTES and n > 1:
        half = n // 2
        for part in (slice(0, half), slice(half, n)):
            _write_chunk(out, kind, [c[part] for c in cols], None if vectors is None else vectors[part], where)
        return
    if len(blob) > MAX_CHUNK // 2:
        raise InvalidInputError(
            f"{where!r}: {kind} id {cols[0][0]} takes {len(blob)} bytes of text and metadata; a package row may take "
            f"at most {MAX_CHUNK // 2}. Split the text into smaller references"
        )
    out.write(blob)


def section_pieces(mm, offset, length, hasher=None):
    """The bytes of a section in READ_STEP pieces (bounded memory), hashing them on the way."""
    end = offset + length
    for pos in range(offset, end, READ_STEP):
        piece = mm[pos : min(end, pos + READ_STEP)]
        if hasher is not None:
            hasher.update(piece)
        yield piece


def open_map(f):
    size = os.fstat(f.fileno()).st_size
    return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None


def check_segment_header(mm, offset, length, number, where):
    if length < SEG_HEADER_SIZE:
        raise FormatError(f"{where}: segment section is {length} bytes, shorter than a segment header")
    head = mm[offset : offset + SEG_HEADER_SIZE]
    magic, version, _, stored = SEG_HEADER.unpack_from(head)
    (crc,) = struct.unpack_from("<I", head, SEG_HEADER.size)
    if magic != SEG_MAGIC or zlib.crc32(head[: SEG_HEADER.size]) != crc:
        raise FormatError(f"{where}: corrupt segment header (not an m3db segment)")
    if version != SEG_VERSION or stored != number:
        raise FormatError(f"{where}: segment header says version {version}, number {stored}; expected {SEG_VERSION}, {number}")


def _bar(enabled, total, desc):
    """A progress bar on stderr (tqdm), or one that draws nothing."""
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=" memories", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    return _NoBar()


class _NoBar:
    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


# -- verify --------------------------------------------------------------------------------------


class VerifyReport:
    """What verify() found: `ok`, `problems` (each names where), the manifest, and what was read."""

    def __init__(self, path, problems, manifest, *, sections=(), memories_checked=0, bytes_read=0):
        self.path = path
        self.problems = problems
        self.ok = not problems
        self.manifest = manifest
        self.sections = list(sections)
        self.memories_checked = memories_checked
        self.bytes_read = bytes_read

    def to_dict(self):
        return {"path": self.path, "ok": self.ok, "problems": self.problems, "sections": self.sections,
                "memories_checked": self.memories_checked, "bytes_read": self.bytes_read}

    def __repr__(self):
        return f"<VerifyReport ok={self.ok} problems={len(self.problems)} memories={self.memories_checked}>"


def verify(path, *, arrays=True, progress=False):
    """Check a package: the header, the manifest, every section's sha256, the layout (sections
    inside the file, aligned, not overlapping, zeros between them), the catalog's contents and
    counts, every record (decoded; arrays=False skips decoding tensors), and the index against
    the catalog. Returns a VerifyReport; nothing is written anywhere. progress=True draws a
    bar on stderr."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NotFoundError(f"no package file at {path!r}")
    problems = []

    def problem(text):
        if len(problems) < MAX_PROBLEMS:
            problems.append(text)
        elif len(problems) == MAX_PROBLEMS:
            problems.append("... more problems not listed")

    with open(path, "rb") as f:
        try:
            frame = Frame(f, path)
        except FormatError as e:
            return VerifyReport(path, [str(e).split("] ", 1)[-1]], None)
        mm = open_map(f)
    try:
        with _bar(progress, frame.manifest["counts"]["memories"], "verify") as bar:
            return _verify_sections(path, frame, mm, problem, problems, arrays, bar)
    finally:
        mm.close()


def _verify_sections(path, frame, mm, problem, problems, arrays, bar):
    manifest, sections = frame.manifest, frame.sections
    summary, bytes_read = [], HEADER_PAGE + len(frame.manifest_bytes)
    placed = sorted((off, length, name) for name, (off, length, _) in sections.items())
    pos = HEADER_PAGE
    for off, length, name in placed + [(frame.manifest_offset, 0, "manifest")]:
        if off - pos >= ALIGN:
            problem(f"bytes [{pos}, {off}) before section {name!r} are a gap of {off - pos} bytes; pack leaves less than {ALIGN}")
        if any(any(piece) for piece in section_pieces(mm, pos, off - pos)):  # (in pieces: a gap may be large)
            problem(f"bytes [{pos}, {off}) before section {name!r} should be zero padding; the file is damaged")
        pos = off + length
    intact = {}
    for off, length, name in placed:
        h = hashlib.sha256()
        for _ in section_pieces(mm, off, length, h):
            pass
        bytes_read += length
        intact[name] = h.hexdigest() == sections[name][2]
        if not intact[name]:
            problem(f"section {name!r} [{off}, {off + length}): sha256 mismatch, its bytes are damaged")
        summary.append({"name": name, "offset": off, "length": length, "ok": intact[name]})
    for name, (off, length, _) in sections.items():
        if name.startswith("segment/"):
            try:
                check_segment_header(mm, off, length, segment_number(name), f"section {name!r}")
            except FormatError as e:
                problem(str(e).split("] ", 1)[-1])
    # the catalog: parse it all, keeping only what checks the segments and the index
    where = "section 'catalog'"
    off, length, _ = sections["catalog"]
    loc = {"id": [], "segment": [], "offset": [], "length": [], "checksum": []}
    head = None
    try:
        for item in read_catalog(section_pieces(mm, off, length), where, manifest):
            if item[0] == "head":
                head = item[1]
            elif item[0] == "memories":
                for key in loc:
                    loc[key].append(np.asarray(item[1][key]))
    except FormatError as e:
        problem(str(e).split("] ", 1)[-1])
        head = None
    checked = 0
    if head is not None:
        loc = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in loc.items()}
        checked = _verify_records(mm, sections, loc, problem, arrays, bar)
        if int(loc["length"].sum()) != manifest["counts"]["record_bytes"]:
            problem(f"the manifest counts {manifest['counts']['record_bytes']} record bytes; the catalog's records take {int(loc['length'].sum())}")
        if intact.get("index"):
            _verify_index(mm, sections["index"], loc["id"], head["spec"].embedding_dim, problem)
    return VerifyReport(path, problems, manifest, sections=summary, memories_checked=checked, bytes_read=bytes_read)


def _verify_records(mm, sections, loc, problem, arrays, bar):
    """Every record decodes, and the records tile their segment exactly (no gaps, no overlaps)."""
    order = np.lexsort((loc["offset"], loc["segment"]))
    checked = 0
    ends = {}
    for i in order.tolist():
        mid, seg, off, length, crc = (int(loc[k][i]) for k in ("id", "segment", "offset", "length", "checksum"))
        name = section_name(seg) if 0 < seg < 1_000_000 else f"segment/{seg}"
        where = f"memory {mid} ({name} @ {off})"
        if name not in sections:
            problem(f"{where}: the catalog points into a segment the package does not have")
            continue
        base, size, _ = sections[name]
        expected = ends.get(seg, SEG_HEADER_SIZE)
        if off != expected:
            problem(f"{where}: records of {name} should follow each other; expected offset {expected} (a gap or an overlap)")
        ends[seg] = off + length
        if off + length > size:
            problem(f"{where}: bytes [{off}, {off + length}) lie outside the {size}-byte segment")
            continue
        try:
            decode_record(mm[base + off : base + off + length], where, expect_id=mid, expect_crc=crc, arrays=arrays)
        except FormatError as e:
            problem(str(e).split("] ", 1)[-1])
        checked += 1
        bar.update(1)
    for name, (base, size, _) in sections.items():
        if name.startswith("segment/") and ends.get(segment_number(name), SEG_HEADER_SIZE) != size:
            problem(f"section {name!r}: its records end at {ends.get(segment_number(name), SEG_HEADER_SIZE)}, the section at {size}")
    return checked


def _verify_index(mm, section, ids, dim, problem):
    off, length, _ = section
    index = VectorIndex.from_bytes(mm[off : off + length])  # only once the section's sha256 matched
    if index is None:
        problem("section 'index': USearch cannot load it")
        return
    if index.dim != dim or len(index) != len(ids):
        problem(f"section 'index': holds {len(index)} vectors of dimension {index.dim}; the catalog has {len(ids)} of dimension {dim}")
        return
    if not np.array_equal(np.sort(index.keys()), np.sort(ids)):
        problem("section 'index': its keys differ from the catalog's memory ids")


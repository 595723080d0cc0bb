"""Packing: one read-only file holding a whole knowledge base. `pack` writes it (verify.py checks it).

The frame (header, manifest, section table) is manifest.py's; this module writes the sections:
- `segment/NNNNNN`: a segment file byte for byte (segment.py's 16-byte header, then framed
  records back to back). Pack rewrites the live records in id order into fresh segments, so
  forgotten memories are not shipped and the layout is a function of the content alone.
- `catalog`: a canonical export of the catalog (not the DuckDB file, whose bytes differ from
  one write to the next), written here and read by export.py; store.py re-materializes
  it into a DuckDB file in the cache directory.
- `index`: the USearch HNSW graph, built single-threaded in id order so the bytes repeat.
Packing the same database twice gives byte-identical files: nothing depends on the clock,
dict order, thread timing or the database's write history.

Verify reads every byte with bounded memory (sections are hashed in READ_STEP pieces) and
never writes; nothing in a package is unpickled or executed.
"""

import contextlib
import errno
import hashlib
import os
import re
import secrets
import threading
import zlib

import msgpack
import numpy as np

from ..errors import FormatError, InvalidInputError, NotFoundError
from ..progress import progress_bar
from ..storage.catalog import CATALOG_VERSION
from ..storage.index import CONNECTIVITY, EXPANSION_ADD, EXPANSION_SEARCH, VectorIndex
from ..storage.record import FORMAT_VERSION as RECORD_VERSION
from ..storage.record import HEADER_SIZE as RECORD_HEADER
from ..storage.record import read_header
from ..storage.segment import (
    DEFAULT_SEGMENT_SIZE,
    segment_header,
)
from ..storage.segment import (
    HEADER_SIZE as SEG_HEADER_SIZE,
)
from ..storage.segment import (
    VERSION as SEG_VERSION,
)
from ..storage.validate import check_path
from ..version import __version__
from .export import CHUNK_BYTES, CHUNK_ROWS, DOCUMENT_COLUMNS, MAX_CHUNK, META_KEYS, STREAM_NAME, STREAM_VERSION
from .manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_PAGE,
    MAX_TEXT_FIELD,
    align,
    dump_manifest,
    pack_header,
    section_name,
)

PACKAGE_SEGMENT_SIZE = DEFAULT_SEGMENT_SIZE
# a pack's temporary file: `<target>.tmp-<pid>-<random>` (one per call, so two packs of one target
# in one process never share a file), or `<target>.tmp-<pid>`, the name earlier versions used
_TEMPORARY = re.compile(r"(\d+)(?:-[0-9a-f]+)?")
# the file names of the temporaries this process is writing now: the removal of dead ones keeps
# them (their pid is ours). Names, not paths: one folder can be reached by several paths
_writing: set[str] = set()
_writing_lock = threading.Lock()
# link() errors that mean "this filesystem has no hard links", not "the target exists"
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}
# -- pack ----------------------------------------------------------------------------------------


class _Section:
    """Writes one section at the next aligned offset, hashing as it goes."""

    def __init__(self, f, name):
        pos = f.seek(0, os.SEEK_END)
        f.write(bytes(align(pos) - pos))
        self.f, self.name, self.offset, self.length = f, name, align(pos), 0
        self.hash = hashlib.sha256()

    def write(self, data) -> None:
        self.f.write(data)
        self.hash.update(data)
        self.length += len(data)

    def entry(self) -> dict[str, str | int]:
        return {"name": self.name, "offset": self.offset, "length": self.length, "sha256": self.hash.hexdigest()}


def pack(
    store,
    path,
    *,
    source,
    name=None,
    description=None,
    version=None,
    license=None,
    attribution=None,
    overwrite=False,
    progress=False,
) -> dict[str, object]:
    """Write the store of a database as one package file at `path`; return its manifest (a dict).

    source: the database's path (the default name, and where errors say the problem is).
    name, description, version, license, attribution: strings stored in the manifest's
    `about` (name defaults to the database directory's name). overwrite: replace a file at
    `path`; without it, a file there is an error, also one that appears while this pack runs.
    The file is written to a temporary name of its own beside `path` and moved there when
    complete. progress=True draws a bar on stderr.
    """
    about = {"name": name if name is not None else _default_name(source)}
    for key, value in (
        ("description", description),
        ("version", version),
        ("license", license),
        ("attribution", attribution),
    ):
        if value is not None:
            about[key] = value
    for key, value in about.items():
        if not isinstance(value, str) or len(value) > MAX_TEXT_FIELD:
            raise InvalidInputError(
                f"pack(): {key} must be a string of at most {MAX_TEXT_FIELD} characters, got {str(value)[:80]!r}"
            )
    path = _check_target(os.fspath(path), store.directory, overwrite)
    remove_dead_temporaries(path)
    f, tmp = _create_temporary(path)
    try:
        with f:
            f.write(bytes(HEADER_PAGE))  # the header is written last, once the manifest is known
            with progress_bar(progress, "memories", total=2 * len(store.locations), desc="pack") as bar:
                manifest = _write_sections(store, source, f, about, bar)
            raw = dump_manifest(manifest)
            pos = f.seek(0, os.SEEK_END)
            f.write(bytes(align(pos) - pos))
            manifest_offset = align(pos)
            f.write(raw)
            f.seek(0)
            f.write(pack_header(manifest_offset, raw))
            f.flush()
            os.fsync(f.fileno())
        _install(tmp, path, overwrite)
    except BaseException:
        # a temporary file that cannot be removed now (a permission, the device) is removed by
        # a later pack of the target once this process is gone
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    finally:
        with _writing_lock:
            _writing.discard(os.path.basename(tmp))
    return manifest


def _create_temporary(path):
    """(an open file, its name): a new file `<path>.tmp-<pid>-<random>` beside `path`, created
    exclusively, so no other pack (another thread, another process) can be writing it. `open`'s
    "x" mode, not mkstemp: the package gets the permissions the umask gives, not mkstemp's 0600."""
    while True:
        tmp = os.path.abspath(f"{path}.tmp-{os.getpid()}-{secrets.token_hex(8)}")
        with _writing_lock:
            _writing.add(os.path.basename(tmp))  # before the file exists: a listing that sees it sees this
        try:
            return open(tmp, "x+b"), tmp
        except BaseException as e:
            with _writing_lock:
                _writing.discard(os.path.basename(tmp))
            if not isinstance(e, FileExistsError):  # taken: only a leftover; draw another name
                raise


def _install(tmp, path, overwrite) -> None:
    """Move the finished temporary to `path`. overwrite=False was checked when pack started, but
    another process may have installed a package there since: a hard link fails on an existing
    name where a rename would replace it, so that package is kept and this pack fails."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise InvalidInputError(
            f"{path!r} exists (it was written while this pack ran); pass overwrite=True (or --force) to replace it"
        ) from None
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        # no hard links on this filesystem (FAT, some network shares): the check and the rename
        # are separate steps here, so a package written in between is replaced
        if os.path.exists(path):
            raise InvalidInputError(f"{path!r} exists; pass overwrite=True (or --force) to replace it") from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def _check_target(path, home, overwrite) -> str:
    """The package path, refused when writing it would harm the database or cannot work: inside
    the database's own directory, an existing directory, a folder that does not exist, or an
    existing file without overwrite."""
    path = check_path(path)  # as connect() reads a path: no empty name, NUL or stray space; ~ is home
    target, home = os.path.realpath(path), os.path.realpath(home)
    if target == home or target.startswith(home + os.sep):
        raise InvalidInputError(
            f"pack(): {path!r} is inside the database directory {home!r}: a package there would overwrite or "
            "litter the database's own files. Pack to a path outside it"
        )
    if os.path.isdir(path):
        raise InvalidInputError(f"pack(): {path!r} is a directory; name the package file, e.g. {path}/kb.m3kb")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise NotFoundError(f"pack(): the folder {folder!r} does not exist; create it first")
    if os.path.exists(path) and not overwrite:
        raise InvalidInputError(f"{path!r} exists; pass overwrite=True (or --force) to replace it")
    return path


def remove_dead_temporaries(path) -> list[str]:
    """Remove the temporary files of `path` that packs killed mid-write left behind:
    `path.tmp-<pid>-<random>` (and `path.tmp-<pid>`, the older name) whose process is gone, or
    this process's own that no pack of it is writing now (one whose removal failed). A live
    pack's file is kept. Returns the names removed."""
    folder, base = os.path.split(os.path.abspath(path))
    prefix = base + ".tmp-"
    me = os.getpid()
    removed = []
    for name in os.listdir(folder):
        found = _TEMPORARY.fullmatch(name[len(prefix) :]) if name.startswith(prefix) else None
        if found is None:
            continue
        pid = int(found.group(1))
        if pid == me:
            with _writing_lock:
                if name in _writing:
                    continue
        elif _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _default_name(source):
    base = os.path.basename(os.path.normpath(source)) if source != ":memory:" else "memory"
    for suffix in (".m3kb", ".m3db"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base or "knowledge-base"


def _write_sections(store, source, f, about, bar):
    ids = store.locations.ids.copy()
    cols = {k: v.copy() for k, v in store.locations.cols.items()}
    if len(np.unique(ids)) != len(ids):
        raise FormatError(f"{source!r}: memory ids repeat in the catalog; run `m3db check` and repair before packing")
    sections = []
    new_seg, new_off, record_bytes = _write_segments(store, source, f, ids, cols, sections, bar)
    catalog = _Section(f, "catalog")
    index = VectorIndex(store.spec.embedding_dim)
    counts, codec_hash = _write_catalog(store, source, catalog, ids, new_seg, new_off, index, bar)
    sections.append(catalog.entry())
    idx = _Section(f, "index")
    idx.write(index.to_bytes())
    sections.append(idx.entry())
    index.close()
    meta = store.catalog.meta()
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "about": about,
        "spec": store.spec.to_dict(),
        "codec": {"name": store.codec.name, "version": store.codec.version, "params_sha256": codec_hash},
        "counts": {
            "memories": len(ids),
            "documents": counts["documents"],
            "segments": sum(1 for s in sections if s["name"].startswith("segment/")),
            "record_bytes": record_bytes,
        },
        "build": {
            "m3db_version": __version__,
            "record_format": RECORD_VERSION,
            "segment_format": SEG_VERSION,
            "catalog_format": CATALOG_VERSION,
            "catalog_stream": STREAM_VERSION,
            "source_commit": int(meta["commit_seq"]),
            "index": f"usearch hnsw cos f16 connectivity={CONNECTIVITY} expansion_add={EXPANSION_ADD} "
            f"expansion_search={EXPANSION_SEARCH} single-threaded, id order",
        },
        "sections": sorted(sections, key=lambda s: s["offset"]),
    }


def _write_segments(store, source, f, ids, cols, sections, bar):
    """Copy every live record, in id order, into fresh segment sections; return their new places."""
    new_seg = np.zeros(len(ids), np.int32)
    new_off = np.zeros(len(ids), np.int64)
    current, number, record_bytes = None, 0, 0
    for i, mid in enumerate(ids.tolist()):
        seg, off, length, crc = (int(cols[c][i]) for c in ("segment", "offset", "length", "checksum"))
        blob = store.segments.read(seg, off, length)
        where = f"{source!r}: memory {mid} (segment {seg} @ {off})"
        read_header(blob, where)
        if zlib.crc32(blob[RECORD_HEADER:]) != crc:
            raise FormatError(
                f"{where}: record checksum mismatch; run `m3db check` and repair the database before packing"
            )
        if current is None or (current.length + length > PACKAGE_SEGMENT_SIZE and current.length > SEG_HEADER_SIZE):
            if current is not None:
                sections.append(current.entry())
            number += 1
            current = _Section(f, section_name(number))
            current.write(segment_header(number))
        new_seg[i], new_off[i] = number, current.length
        current.write(blob)
        record_bytes += length
        bar.update(1)
    if current is not None:
        sections.append(current.entry())
    return new_seg, new_off, record_bytes


def _write_catalog(store, source, out, ids, new_seg, new_off, index, bar):
    """Write the canonical catalog stream; feed the index the embeddings as they pass."""
    catalog = store.catalog
    columns = list(catalog.columns().items())
    meta = catalog.meta()
    codecs = catalog.codec_rows()
    params = next((p for n, v, p in codecs if n == store.codec.name and v == store.codec.version), None)
    n_docs = catalog.document_count()
    head = {
        "format": STREAM_NAME,
        "version": STREAM_VERSION,
        "meta": {k: str(meta[k]) for k in META_KEYS},
        "codecs": codecs,
        "memory_columns": [[n, "FLOAT[]" if n == "embedding" else t] for n, t in columns],
        "documents": int(n_docs),
        "memories": len(ids),
        "embedding_dim": store.spec.embedding_dim,
    }
    out.write(msgpack.packb(head, use_bin_type=True))
    # documents, in id order
    for rows in catalog.document_rows([c for c, _, _ in DOCUMENT_COLUMNS], CHUNK_ROWS):
        _write_chunk(out, "documents", [list(c) for c in zip(*rows)], None, source)
    # memories, in id order, chunked by id ranges of the (sorted) location table
    scalar = [n for n, _ in columns if n != "embedding"]
    seg_col, off_col = scalar.index("segment"), scalar.index("offset")
    i = 0
    while i < len(ids):
        j = min(len(ids), i + CHUNK_ROWS)
        lo, hi = int(ids[i]), int(ids[j - 1])
        rows, emb = catalog.memory_rows(scalar, lo, hi)
        if len(rows) != j - i or [r[0] for r in rows] != ids[i:j].tolist():
            raise FormatError(
                f"{source!r}: the catalog and the location table disagree between ids {lo} and {hi}; run `m3db check`"
            )
        cols = [list(c) for c in zip(*rows)]
        cols[seg_col] = new_seg[i:j].tolist()
        cols[off_col] = new_off[i:j].tolist()
        vectors = (
            np.ascontiguousarray(np.stack(list(emb)), dtype="<f4")
            if len(emb)
            else np.zeros((0, store.spec.embedding_dim), "<f4")
        )
        _write_chunk(out, "memories", cols, vectors, source)
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

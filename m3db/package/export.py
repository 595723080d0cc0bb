"""The catalog section of a package: a canonical, checked export of the catalog.

DuckDB's file bytes depend on its history, so a package holds this stream instead (pack.py
writes it, store.py loads it back into DuckDB, verify.py reads it). A stream of msgpack objects:

    head     {format: "m3db-catalog", version, meta: {commit_seq, format_version, next_id,
              spec}, codecs: [[name, version, params]], memory_columns: [[name, type]],
              documents: count, memories: count, embedding_dim}
    chunks   {t: "documents", n, columns: [[values of one column]...]}, then
             {t: "memories", n, columns: [...], embedding: n*dim little-endian float32}
    end      {t: "end"}

Rows are in id order, at most CHUNK_ROWS a chunk; timestamps are epoch microseconds.
Reading is hardened: every object is bounded (MAX_CHUNK) before it is decoded, extension types
are refused, every value is type- and range-checked, column names must be identifiers and
column types come from a fixed list. This module never talks to DuckDB.
"""

import hashlib
import json
from collections.abc import Iterator

import msgpack
import numpy as np

from ..errors import FormatError, InvalidInputError, M3DBError
from ..storage.catalog import BUILTIN_COLUMNS, CATALOG_VERSION, check_metadata_key
from ..storage.record import HEADER_SIZE as RECORD_HEADER
from ..storage.segment import HEADER_SIZE as SEG_HEADER_SIZE
from ..storage.spec import MemorySpec

STREAM_NAME = "m3db-catalog"
STREAM_VERSION = 1
CHUNK_ROWS = 4096
CHUNK_BYTES = 16 << 20  # the writer halves a chunk that would pass this (long texts)
MAX_CHUNK = 64 << 20  # the most bytes one msgpack object of the catalog may take
META_KEYS = ("commit_seq", "format_version", "next_id", "spec")
METADATA_TYPES = ("BIGINT", "BOOLEAN", "DOUBLE", "JSON", "VARCHAR")
# (DuckDB type, nullable) of each built-in column of `memories`, in table order
BUILTIN_TYPES = {
    "id": ("BIGINT", False),
    "document_id": ("BIGINT", True),
    "ordinal": ("INTEGER", True),
    "char_start": ("INTEGER", True),
    "char_end": ("INTEGER", True),
    "text": ("VARCHAR", False),
    "token_count": ("INTEGER", True),
    "embedding": ("FLOAT[]", False),
    "segment": ("INTEGER", False),
    "offset": ("BIGINT", False),
    "length": ("INTEGER", False),
    "checksum": ("UBIGINT", False),
    "codec": ("VARCHAR", False),
    "commit_seq": ("BIGINT", False),
    "created_at": ("TIMESTAMP", False),
}
DOCUMENT_COLUMNS = (
    ("id", "BIGINT", False),
    ("source", "VARCHAR", False),
    ("title", "VARCHAR", True),
    ("uri", "VARCHAR", True),
    ("metadata", "JSON", True),
    ("created_at", "TIMESTAMP", False),
)
_RANGES = {
    "BIGINT": (-(2**63), 2**63 - 1),
    "INTEGER": (-(2**31), 2**31 - 1),
    "UBIGINT": (0, 2**64 - 1),
    "TIMESTAMP": (-(2**62), 2**62),
}


def read_catalog(
    chunks, where, manifest
) -> Iterator[tuple[str, dict[str, object]] | tuple[str, dict[str, object], np.ndarray]]:
    """Parse a catalog stream (an iterable of bytes pieces) with every object bounded.

    Yields ("head", dict), then ("documents", columns) and ("memories", columns, embeddings)
    chunks, each checked: column types and nullability, value ranges, ids ascending, counts
    equal to the head's and the manifest's. Raises FormatError naming the first problem.
    """
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=MAX_CHUNK,
        max_bin_len=MAX_CHUNK,
        max_str_len=MAX_CHUNK,
        max_array_len=MAX_CHUNK // 8,
        max_map_len=1024,
        max_ext_len=0,
    )
    objects = _objects(unpacker, chunks, where)
    head = next(objects, None)
    head = check_head(head, where, manifest)
    yield "head", head
    names = [n for n, _ in head["memory_columns"] if n != "embedding"]
    types = dict((n, t) for n, t in head["memory_columns"])
    dim = head["embedding_dim"]
    seen_docs = seen_mem = 0
    last_doc = last_mem = -1
    for obj in objects:
        kind = obj.get("t") if isinstance(obj, dict) else None
        if kind == "end":
            if seen_docs != head["documents"] or seen_mem != head["memories"]:
                raise FormatError(
                    f"{where}: the catalog holds {seen_docs} documents and {seen_mem} memories; its head declares "
                    f"{head['documents']} and {head['memories']}"
                )
            if next(objects, None) is not None:
                raise FormatError(f"{where}: bytes follow the end of the catalog stream")
            return
        if kind not in ("documents", "memories") or set(obj) - {"t", "n", "columns", "embedding"}:
            raise FormatError(f"{where}: the catalog stream holds an unexpected object ({str(obj)[:100]})")
        n = obj.get("n")
        cols = obj.get("columns")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= CHUNK_ROWS or not isinstance(cols, list):
            raise FormatError(f"{where}: a catalog chunk declares {str(n)[:40]} rows; chunks hold 1..{CHUNK_ROWS}")
        if kind == "documents":
            if seen_mem or seen_docs + n > head["documents"]:
                raise FormatError(
                    f"{where}: the catalog has more documents than its head declares ({head['documents']}), or they "
                    "come late"
                )
            if len(cols) != len(DOCUMENT_COLUMNS):
                raise FormatError(
                    f"{where}: a documents chunk has {len(cols)} columns, expected {len(DOCUMENT_COLUMNS)}"
                )
            out = {}
            for (name, sql_type, nullable), values in zip(DOCUMENT_COLUMNS, cols):
                out[name] = check_column(values, n, sql_type, nullable, f"{where}: documents.{name}")
            last_doc = _ascending(out["id"], last_doc, f"{where}: documents.id")
            seen_docs += n
            yield "documents", out
        else:
            if seen_docs != head["documents"] or seen_mem + n > head["memories"]:
                raise FormatError(
                    f"{where}: the catalog has more memories than its head declares ({head['memories']}), or "
                    "documents are missing"
                )
            if len(cols) != len(names):
                raise FormatError(f"{where}: a memories chunk has {len(cols)} columns, its head declares {len(names)}")
            out = {}
            for name, values in zip(names, cols):
                sql_type, nullable = BUILTIN_TYPES.get(name, (types[name], True))
                out[name] = check_column(values, n, sql_type, nullable, f"{where}: memories.{name}")
            emb = obj.get("embedding")
            if not isinstance(emb, bytes) or len(emb) != n * dim * 4:
                raise FormatError(
                    f"{where}: a memories chunk's embeddings are {len(emb) if isinstance(emb, bytes) else emb!r} "
                    f"bytes, expected {n * dim * 4}"
                )
            vectors = np.frombuffer(emb, dtype="<f4").reshape(n, dim)
            if not np.isfinite(vectors).all():
                raise FormatError(f"{where}: embeddings hold NaN or infinite values")
            last_mem = _ascending(out["id"], last_mem, f"{where}: memories.id")
            if (
                (out["id"] < 0).any()
                or (out["length"] < RECORD_HEADER).any()
                or (out["offset"] < SEG_HEADER_SIZE).any()
            ):
                raise FormatError(f"{where}: a memory has a negative id, or a location inside a segment header")
            seen_mem += n
            yield "memories", out, vectors
    raise FormatError(f"{where}: the catalog stream ends without its end marker; the section is truncated")


def _objects(unpacker, chunks, where):
    try:
        for piece in chunks:
            unpacker.feed(piece)
            yield from unpacker
        yield from unpacker
    except msgpack.BufferFull:
        raise FormatError(f"{where}: a catalog object is larger than the {MAX_CHUNK}-byte limit") from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{where}: the catalog stream is malformed ({type(e).__name__}: {str(e)[:200]})") from None


def check_head(head, where, manifest) -> dict[str, object]:
    if not isinstance(head, dict) or head.get("format") != STREAM_NAME:
        raise FormatError(f"{where}: the catalog section does not start with an m3db catalog head")
    if head.get("version") != STREAM_VERSION:
        raise FormatError(
            f"{where}: catalog stream version {head.get('version')!r}; this m3db reads version {STREAM_VERSION}"
        )
    expected = {"format", "version", "meta", "codecs", "memory_columns", "documents", "memories", "embedding_dim"}
    if set(head) != expected:
        raise FormatError(f"{where}: the catalog head's fields are {sorted(head)}, expected {sorted(expected)}")
    meta = head["meta"]
    if (
        not isinstance(meta, dict)
        or sorted(meta) != list(META_KEYS)
        or not all(isinstance(v, str) for v in meta.values())
    ):
        raise FormatError(f"{where}: the catalog's meta must hold strings {', '.join(META_KEYS)}")
    if meta["format_version"] != str(CATALOG_VERSION):
        raise FormatError(
            f"{where}: catalog format version {meta['format_version'][:20]!r}; this m3db reads version "
            f"{CATALOG_VERSION}"
        )
    for key in ("commit_seq", "next_id"):
        if not (meta[key].isascii() and meta[key].isdigit()) or len(meta[key]) > 19:  # "²".isdigit() too
            raise FormatError(
                f"{where}: the catalog's meta {key} is {meta[key][:30]!r}, expected a non-negative integer"
            )
    try:
        spec = MemorySpec.from_json(meta["spec"])
    except (M3DBError, ValueError, TypeError, RecursionError) as e:
        raise FormatError(f"{where}: the catalog's memory spec is invalid ({str(e)[:300]})") from None
    if spec.to_dict() != manifest["spec"]:
        raise FormatError(f"{where}: the catalog's memory spec differs from the manifest's")
    head["spec"] = spec
    for key in ("documents", "memories", "embedding_dim"):
        if not isinstance(head[key], int) or isinstance(head[key], bool) or head[key] < 0:
            raise FormatError(f"{where}: the catalog head's {key} is {head[key]!r}, expected a non-negative integer")
    if head["memories"] != manifest["counts"]["memories"] or head["documents"] != manifest["counts"]["documents"]:
        raise FormatError(
            f"{where}: the catalog declares {head['memories']} memories and {head['documents']} documents; the "
            "manifest "
            f"counts {manifest['counts']['memories']} and {manifest['counts']['documents']}"
        )
    if head["embedding_dim"] != spec.embedding_dim:
        raise FormatError(
            f"{where}: the catalog's embedding_dim {head['embedding_dim']} differs from the spec's {spec.embedding_dim}"
        )
    codecs = head["codecs"]
    if (
        not isinstance(codecs, list)
        or len(codecs) > 64
        or not all(
            isinstance(c, list)
            and len(c) == 3
            and isinstance(c[0], str)
            and isinstance(c[1], int)
            and isinstance(c[2], (bytes, type(None)))
            for c in codecs
        )
    ):
        raise FormatError(f"{where}: the catalog's codecs table is malformed")
    codec = manifest["codec"]
    params = next((c[2] for c in codecs if c[0] == codec["name"] and c[1] == codec["version"]), None)
    if hashlib.sha256(params or b"").hexdigest() != codec["params_sha256"] or codec["name"] != spec.codec:
        raise FormatError(
            f"{where}: the codec parameters in the catalog do not match the manifest's codec {codec['name']} "
            f"v{codec['version']}"
        )
    columns = head["memory_columns"]
    if (
        not isinstance(columns, list)
        or len(columns) > 4096
        or not all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], str) for c in columns
        )
    ):
        raise FormatError(f"{where}: the catalog's column list is malformed")
    names = [c[0] for c in columns]
    if tuple(names[: len(BUILTIN_COLUMNS)]) != BUILTIN_COLUMNS or len(set(names)) != len(names):
        raise FormatError(
            f"{where}: the catalog's columns {names[:20]} do not start with m3db's built-in columns "
            f"{list(BUILTIN_COLUMNS)}"
        )
    for name, sql_type in columns:
        if name in BUILTIN_TYPES:
            if sql_type.split("[")[0] != BUILTIN_TYPES[name][0].split("[")[0]:
                raise FormatError(
                    f"{where}: built-in column {name} has type {sql_type[:40]!r}, expected {BUILTIN_TYPES[name][0]}"
                )
            continue
        try:
            check_metadata_key(name)  # a column name from a file becomes SQL: only plain identifiers
        except InvalidInputError:
            raise FormatError(
                f"{where}: the catalog has a column named {name[:80]!r}; column names are plain identifiers"
            ) from None
        if sql_type not in METADATA_TYPES:
            raise FormatError(
                f"{where}: metadata column {name} has type {sql_type[:40]!r}; allowed: {', '.join(METADATA_TYPES)}"
            )
    return head


def check_column(values, n, sql_type, nullable, where) -> np.ndarray | list[object]:
    """A list of `n` decoded values of one column, checked; numpy for numbers, lists otherwise."""
    if not isinstance(values, list) or len(values) != n:
        raise FormatError(
            f"{where}: the column has {len(values) if isinstance(values, list) else 'no'} values, the chunk {n} rows"
        )
    if not nullable and any(v is None for v in values):
        raise FormatError(f"{where}: NULL in a column that cannot hold one")
    if sql_type in _RANGES:
        lo, hi = _RANGES[sql_type]
        if not all(v is None or (type(v) is int and lo <= v <= hi) for v in values):
            raise FormatError(f"{where}: values must be integers in [{lo}, {hi}]")
        if nullable and any(v is None for v in values):
            return values
        return np.array(values, dtype=np.uint64 if sql_type == "UBIGINT" else np.int64)
    if sql_type == "DOUBLE":
        if not all(v is None or type(v) in (int, float) for v in values):
            raise FormatError(f"{where}: values must be numbers")
        return [None if v is None else float(v) for v in values]
    if sql_type == "BOOLEAN":
        if not all(v is None or type(v) is bool for v in values):
            raise FormatError(f"{where}: values must be booleans")
        return values
    if sql_type in ("VARCHAR", "JSON"):
        if not all(v is None or type(v) is str for v in values):
            raise FormatError(f"{where}: values must be strings")
        if sql_type == "JSON":
            for v in values:
                try:
                    v is None or json.loads(v)
                except (ValueError, RecursionError):
                    raise FormatError(f"{where}: {v[:60]!r} is not JSON") from None
        return values
    raise FormatError(f"{where}: unknown column type {sql_type[:40]!r}")


def _ascending(ids, last, where):
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids[0] <= last or (np.diff(ids) <= 0).any()):
        raise FormatError(f"{where}: ids must be unique and ascending")
    return int(ids[-1]) if len(ids) else last

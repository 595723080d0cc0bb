"""The database: one directory, one writer, the commit protocol, and the public verbs.

A database is a directory: `catalog.duckdb` (catalog.py), `segments/NNNNNN.seg`
(segment.py), `index.usearch` + `index.state` (index.py), and `lock` (lock.py).

Commit protocol (what makes a killed process safe):
1. append every record of the commit to the active segment and fsync it;
2. one DuckDB transaction: the memory rows (which point at those bytes), document rows,
   deletions, and the new commit number;
3. then the in-RAM location table and the vector index (a cache, saved now and then).
A crash before 2 leaves only garbage bytes past the last committed record: recovery on open
cuts them. A crash after 2 leaves the index behind: it is caught up from the catalog on open.
"""

import contextlib
import functools
import json
import os
import shutil
import tempfile
import threading
import zlib

import numpy as np

from . import recall as recall_mod
from .cache import MemoryCache
from .catalog import Catalog, check_metadata_key, metadata_sql_type
from .codec import codec_class
from .errors import (
    ClosedError, DuplicateIdError, FormatError, InvalidInputError, M3DBError, NotFoundError, QueryError, SpecMismatchError,
)
from .index import INDEX_FILE, STATE_FILE, VectorIndex
from .knowledge import MEMORY_MODES, KnowledgeVerbs, bundled, progress_bar, spec_fields
from .locations import LocationTable
from .lock import DatabaseLock
from .manifest import is_package
from .record import HEADER_SIZE, decode_record, encode_record
from .segment import DEFAULT_SEGMENT_SIZE, SegmentStore, segment_name
from .spec import MemorySpec

CATALOG_FILE = "catalog.duckdb"
SEGMENTS_DIR = "segments"
MAX_K = 10_000
FILTER_CACHE_SIZE = 64
# save the index once this many changes (or a quarter of its size) are unsaved: a crash then
# costs at most that much catch-up on the next open
INDEX_SAVE_EVERY = 50_000
CONFIG_KEYS = {"segment_size": int, "exact_limit": int, "index_save_every": int, "cache_bytes": int}
DEFAULT_CACHE_BYTES = 256 << 20
# a model-bound database's codec: docs/quality.md measured int4 within noise of int8, f16 and
# f32 (-0.10 +- 0.06 nats per answer) at half int8's bytes
DEFAULT_CODEC = "int4"
COLD = "cold"  # the codec column of a memory stored as text only, encoded on first read


def connect(path, *, spec=None, read_only=False, config=None, model=None, embedder=None, codec=DEFAULT_CODEC,
            memory_mode=None):
    """Open (or create) the m3db database at `path` (a directory), or ":memory:".

    spec: a MemorySpec (or its dict) for a database of precomputed memories. Without it, a new
    database is bound to `model` and `embedder` (default: the bundled SmolLM2-135M-Instruct
    and all-MiniLM-L6-v2), which the text verbs (add, recall by text, generate) use; opening
    an existing database checks they match what built it.
    read_only: many processes may open a database read-only; only one may open it to write.
    config: {"segment_size": bytes, "exact_limit": ids, "index_save_every": changes,
    "cache_bytes": RAM for decoded memories (256 MiB by default)}.
    codec: how a new database bound to a model stores keys and values ('f32', 'f16', 'int8',
    'int4'; default int4: it reads as well as int8 at half the bytes, docs/quality.md). A
    spec= names its own codec.
    memory_mode: the bundled model's memory mode for a new database: "dense" (the default: every
    layer, 32 tokens per head) or "sparse" (8 tokens per head on half the layers, 15% of
    dense's bytes at the same codec, read through the bundled reader adapter; docs/adapter.md). An
    existing database opens with the mode it was built with; naming another is an error.
    A package file (`.m3kb`, from db.pack()) opens read-only in place; a list of package
    files (or a dict {name: path}) attaches them together, returning a PackageSet.
    """
    if isinstance(path, (list, tuple, dict)):
        from .attach import attach  # several packages recalled together

        return attach(path, spec=spec, config=config, model=model, embedder=embedder)
    return Database(path, spec=spec, read_only=read_only, config=config, model=model, embedder=embedder, codec=codec,
                    memory_mode=memory_mode)


def _guarded(method):
    """Run a public method under the database mutex, refusing a closed database."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._mutex:
            if self._closed:
                raise ClosedError(f"the database {self.path!r} is closed; connect() again to use it")
            return method(self, *args, **kwargs)

    return wrapper


class CheckReport:
    """What check() found: `ok`, the number of memories read, and a list of problems."""

    def __init__(self, checked, problems):
        self.checked = checked
        self.problems = problems
        self.ok = not problems

    def __repr__(self):
        return f"<CheckReport ok={self.ok} checked={self.checked} problems={len(self.problems)}>"


class Database(KnowledgeVerbs):
    def __init__(self, path, *, spec=None, read_only=False, config=None, model=None, embedder=None, codec=DEFAULT_CODEC,
                 memory_mode=None):
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"path must be a string or path-like (a directory, a .m3kb file or ':memory:'), got {type(path).__name__}")
        if memory_mode is not None and memory_mode not in MEMORY_MODES:
            raise InvalidInputError(f"memory_mode={memory_mode!r}: expected one of {', '.join(map(repr, MEMORY_MODES))}")
        if memory_mode is not None and (model is not None or spec is not None):
            raise InvalidInputError("pass memory_mode= or model=/spec=, not both: a model or spec carries its own memory settings")
        self.path = os.fspath(path)
        self._model = self._embedder = None  # bound on first use of a text verb
        self._model_arg, self._embedder_arg, self._memory_mode = model, embedder, memory_mode
        self.read_only = bool(read_only)
        self._mutex = threading.RLock()
        self._closed = True
        if self.path != ":memory:" and os.path.isfile(self.path) and (is_package(self.path) or self.path.endswith(".m3kb")):
            # a packed knowledge base (.m3kb): read-only, segments read in place (attach.py)
            from .attach import open_package
            open_package(self, spec=spec, config=config, codec=codec)
            self._closed = False
            return
        self._config = _check_config(config)
        self._tempdir = None
        if self.path == ":memory:":
            if read_only:
                raise InvalidInputError("a ':memory:' database cannot be read_only: it starts empty")
            # segments need files to mmap: a private temporary directory, removed on close
            self._tempdir = tempfile.mkdtemp(prefix="m3db-memory-")
            directory, created = self._tempdir, True
        else:
            directory = os.path.abspath(self.path)
            if os.path.exists(directory) and not os.path.isdir(directory):
                raise InvalidInputError(f"{self.path!r} is a file; an m3db database is a directory")
            if not os.path.exists(os.path.join(directory, CATALOG_FILE)):
                if read_only:
                    raise NotFoundError(f"no m3db database at {self.path!r}; create it with a writable connect(path)")
            created = not os.path.exists(directory)
            os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._lock = DatabaseLock(directory, read_only=self.read_only)
        try:
            self._open(spec, codec)
        except BaseException:
            self._lock.release()
            if getattr(self, "catalog", None) is not None:
                self.catalog.close()
            if created:  # a failed creation leaves nothing behind
                shutil.rmtree(directory, ignore_errors=True)
            raise
        self._closed = False

    # -- opening and recovery ----------------------------------------------------------------

    def _open(self, spec, codec):
        if isinstance(spec, dict):
            spec = MemorySpec.from_dict(spec)
        if spec is not None and not isinstance(spec, MemorySpec):
            raise InvalidInputError(f"spec must be a MemorySpec or a dict, got {type(spec).__name__}")
        new = self.path == ":memory:" or not os.path.exists(os.path.join(self.directory, CATALOG_FILE))
        if new and spec is None:
            # bound to a model: the spec comes from it (loading the bundled one if none is given)
            model, embedder = self._model_arg, self._embedder_arg
            if model is None or embedder is None:
                default_model, default_embedder = bundled(self._memory_mode)
                model, embedder = model or default_model, embedder or default_embedder
            spec = MemorySpec(**spec_fields(model, embedder, codec))
            self._model, self._embedder = model, embedder
        self.catalog = Catalog(os.path.join(self.directory, CATALOG_FILE), read_only=self.read_only)
        if self.catalog.is_new():
            if spec is None:
                raise InvalidInputError(f"{self.path!r} holds no m3db catalog; pass spec= or a model to create one")
            self.catalog.create(spec.to_json(), spec.embedding_dim)
        meta = self.catalog.meta()
        stored = MemorySpec.from_json(meta["spec"])
        if spec is not None:
            stored.require_same(spec)
        self.spec = stored
        # trained codecs (a later issue) keep their parameters in the catalog's `codecs` table
        codec_cls = codec_class(stored.codec)
        self.codec = codec_cls.from_params(self.catalog.codec_params(codec_cls.name, codec_cls.version))
        self._commit_seq = int(meta["commit_seq"])
        self.segments = SegmentStore(
            os.path.join(self.directory, SEGMENTS_DIR),
            segment_size=self._config.get("segment_size", DEFAULT_SEGMENT_SIZE),
            read_only=self.read_only,
        )
        self.locations = LocationTable(self.catalog.locations())
        if not self.read_only:
            self._recover_segments()
        self._next_id = max(int(meta["next_id"]), self.locations.max_id() + 1)
        self._next_doc_id = None
        self.index = VectorIndex(stored.embedding_dim, self.directory, read_only=self.read_only)
        self._catch_up_index()
        self._in_transaction = 0
        self._pending = None
        self.cache = MemoryCache(self._config.get("cache_bytes", DEFAULT_CACHE_BYTES))
        self._filter_cache = {}  # (where, params) -> sorted allowed ids, valid for one commit
        self._filter_cache_seq = self._commit_seq
        if self._model is None and (self._model_arg is not None or self._embedder_arg is not None or self._memory_mode is not None):
            self._bind_models(self._model_arg, self._embedder_arg)  # a mismatch fails at open, not later

    def _recover_segments(self):
        """Cut bytes past the last committed record; drop segments nothing points at."""
        ends = self.catalog.segment_ends()
        for number in self.segments.numbers():
            end = ends.get(number)
            if end is None:
                self.segments.remove(number)
            elif self.segments.size(number) > end:
                self.segments.truncate(number, end)
        for name in (INDEX_FILE + ".tmp", STATE_FILE + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, name))

    def _catch_up_index(self):
        self._unsaved = 0
        seq = self.index.load()
        if seq == self._commit_seq and len(self.index) == len(self.locations):
            return
        if 0 <= seq < self._commit_seq:
            # the fast path: apply the commits the saved index has not seen
            self.index.remove(self.catalog.forgotten_after(seq))
            ids, emb = self.catalog.embeddings(after_seq=seq)
            self.index.add(ids, emb)
        if seq < 0 or len(self.index) != len(self.locations) or seq > self._commit_seq:
            # no usable state: reconcile the whole key set against the catalog
            have = self.index.keys()
            extra = np.setdiff1d(have, self.locations.ids)
            self.index.remove(extra)
            missing = np.setdiff1d(self.locations.ids, have)
            ids, emb = self.catalog.embeddings(ids=missing)
            self.index.add(ids, emb)
        self._unsaved = len(self.index)
        if not self.read_only:
            self.index.save(self._commit_seq)
            self._unsaved = 0

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self):
        """Group adds and forgets into one atomic commit: all of them land, or none."""
        with self._mutex:
            self._require_open()
            self._require_writable()
            self._in_transaction += 1
            if self._in_transaction == 1:
                self._pending = self._new_pending()
            try:
                yield self
            except BaseException:
                if self._in_transaction == 1:
                    self._abort()
                raise
            else:
                if self._in_transaction == 1:
                    self._commit()
            finally:
                self._in_transaction -= 1
                if self._in_transaction == 0:
                    self._pending = None

    def _new_pending(self):
        return {"rows": [], "documents": [], "forget": [], "mark": self.segments.mark(), "ids": set()}

    @_guarded
    def add_memory(self, keys, values, positions, *, embedding, text, metadata=None, document=None,
                   ordinal=None, token_count=None, id=None):
        """Store one memory; return its id.

        keys, values: float32 (layers, kv_heads, n, head_dim), keys before RoPE;
        positions: integers (layers, kv_heads, n), each kept token's position in the reference;
        embedding: float32 (embedding_dim,), the retrieval vector; text: the reference text;
        metadata: {name: str|int|float|bool|None|list|dict}, stored as columns of `memories`;
        document: a document's source string (created on first use) or an existing document id.
        """
        item = dict(keys=keys, values=values, positions=positions, embedding=embedding, text=text,
                    metadata=metadata, document=document, ordinal=ordinal, token_count=token_count, id=id)
        return self.add_memories([item])[0]

    @_guarded
    def add_memories(self, memories):
        """Store many memories in one commit; return their ids. Each item is a dict of
        add_memory's arguments. Every item is checked before anything is written."""
        self._require_writable()
        if isinstance(memories, dict):
            raise InvalidInputError("add_memories takes a list of dicts; for one memory use add_memory()")
        items = list(memories)
        with self.transaction():
            checked = [self._check_item(i, item) for i, item in enumerate(items)]
            self._check_ids(checked)
            return self._stage_all(checked)

    def _check_item(self, position, item):
        where = f"memory #{position}"
        if not isinstance(item, dict):
            raise InvalidInputError(f"{where}: expected a dict of add_memory() arguments, got {type(item).__name__}")
        known = {"keys", "values", "positions", "embedding", "text", "metadata", "document", "ordinal", "token_count", "id",
                 "char_start", "char_end", "cold"}
        unknown = sorted(set(item) - known)
        if unknown:
            raise InvalidInputError(f"{where}: unknown fields {unknown}; known fields: {sorted(known)}")
        cold = item.get("cold", False)
        if not isinstance(cold, bool):
            raise InvalidInputError(f"{where}: cold must be True or False, got {cold!r}")
        arrays = ("keys", "values", "positions")
        if cold and any(item.get(k) is not None for k in arrays):
            raise InvalidInputError(f"{where}: a cold memory is stored as text only; drop keys, values and positions or cold=True")
        missing = [k for k in ("embedding", "text") + (() if cold else arrays) if item.get(k) is None]
        if missing:
            raise InvalidInputError(f"{where}: missing {missing}")
        try:
            keys = values = positions = None
            if not cold:
                keys, values, positions = self.spec.check_arrays(item["keys"], item["values"], item["positions"])
                self.codec.check(keys), self.codec.check(values)  # range checks (f16) before writing
            embedding = self.spec.check_embedding(item["embedding"])
        except InvalidInputError as e:
            raise InvalidInputError(f"{where}: {str(e).split('] ', 1)[-1]}") from None
        text = item["text"]
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"{where}: text must be a non-empty string (the reference the memory was made from)")
        metadata = item.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InvalidInputError(f"{where}: metadata must be a dict, got {type(metadata).__name__}")
        types = {}
        for key, value in metadata.items():
            check_metadata_key(key)
            types[key] = metadata_sql_type(key, value)
        mid = item.get("id")
        if mid is not None and (not isinstance(mid, (int, np.integer)) or isinstance(mid, bool) or mid < 0 or mid >= 2**63):
            raise InvalidInputError(f"{where}: id must be a non-negative integer, got {mid!r}")
        for name in ("ordinal", "token_count", "char_start", "char_end"):
            v = item.get(name)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < 2**31):
                raise InvalidInputError(f"{where}: {name} must be a non-negative 32-bit integer, got {v!r}")
        span = (item.get("char_start"), item.get("char_end"))
        if (span[0] is None) != (span[1] is None) or (span[0] is not None and span[0] > span[1]):
            raise InvalidInputError(f"{where}: char_start and char_end go together, with char_start <= char_end; got {span}")
        document = item.get("document")
        if isinstance(document, dict):
            _check_document(where, document)
        elif document is not None and (not isinstance(document, (str, int, np.integer)) or isinstance(document, bool)):
            raise InvalidInputError(f"{where}: document must be a source string, a dict or a document id, got {document!r}")
        if isinstance(document, (int, np.integer)) and not self._document_exists(int(document)):
            raise NotFoundError(f"{where}: no document with id {document}; pass its source string to create it")
        return dict(keys=keys, values=values, positions=positions, embedding=embedding, text=text,
                    metadata=metadata, types=types, document=document, id=None if mid is None else int(mid),
                    ordinal=item.get("ordinal"), token_count=item.get("token_count"),
                    char_start=span[0], char_end=span[1], cold=cold)

    def _check_ids(self, checked):
        explicit = [c["id"] for c in checked if c["id"] is not None]
        if len(set(explicit)) != len(explicit):
            raise DuplicateIdError(f"ids repeat within the batch: {sorted(i for i in set(explicit) if explicit.count(i) > 1)}")
        taken = [i for i in explicit if i in self.locations or i in self._pending["ids"]]
        if taken:
            raise DuplicateIdError(f"ids already in the database: {taken[:10]}; forget them first or omit id= to get new ones")
        columns = dict(self.catalog.columns())
        for r in self._pending["rows"]:  # earlier adds of this transaction fix their keys' types too
            for key, sql_type in r["types"].items():
                if sql_type and key not in columns:
                    columns[key] = sql_type
        for c in checked:
            for key, sql_type in c["types"].items():
                have = columns.get(key)
                if not have and sql_type:
                    columns[key] = sql_type
                    continue
                if have and sql_type and not _widens(sql_type, have) and not _widens(have, sql_type):
                    raise InvalidInputError(
                        f"metadata {key!r} is a {have} column; the value {c['metadata'][key]!r} is {sql_type}. "
                        "Use one type per metadata key"
                    )

    def _document_exists(self, document_id):
        pending = self._pending["documents"] if self._pending else []
        return any(d["id"] == document_id for d in pending) or self.catalog.has_document(document_id)

    def _document_id(self, document):
        """The id of `document` (an id, a source string, or a dict with `source` and optional
        title, uri, metadata), creating the document in this transaction on first use."""
        if document is None or isinstance(document, (int, np.integer)):
            return None if document is None else int(document)
        info = document if isinstance(document, dict) else {"source": document}
        source = info["source"]
        for doc in self._pending["documents"]:
            if doc["source"] == source:
                return doc["id"]
        existing = self.catalog.document_id(source)
        if existing is not None:
            return existing
        if self._next_doc_id is None:
            self._next_doc_id = self.catalog.con.execute("SELECT coalesce(max(id), 0) + 1 FROM documents").fetchone()[0]
        doc_id = self._next_doc_id
        self._next_doc_id += 1
        self._pending["documents"].append(dict(info, id=doc_id))
        return doc_id

    def _stage_all(self, checked):
        """Assign ids, encode every record, append. (Encoding in a thread pool was measured
        slower: a record is many small numpy calls that hold the GIL.)"""
        for c in checked:
            c["id"] = c["id"] if c["id"] is not None else self._allocate_id()
            self._next_id = max(self._next_id, c["id"] + 1)
            self._pending["ids"].add(c["id"])
            c["document_id"] = self._document_id(c["document"])

        def encode(c):
            return encode_record(c["id"], self.codec, c["keys"], c["values"], c["positions"], c["text"],
                                 c["metadata"], c["document_id"], c["ordinal"], c["token_count"])

        blobs = [encode(c) for c in checked]
        for c, blob in zip(checked, blobs):
            segment, offset = self.segments.append(blob)
            self._pending["rows"].append(dict(
                id=c["id"], document_id=c["document_id"], ordinal=c["ordinal"], text=c["text"],
                char_start=c["char_start"], char_end=c["char_end"], codec=COLD if c["cold"] else self.codec.name,
                token_count=c["token_count"], embedding=c["embedding"], segment=segment, offset=offset,
                length=len(blob), checksum=_payload_crc(blob), metadata=c["metadata"], types=c["types"],
            ))
        return [c["id"] for c in checked]

    def _allocate_id(self):
        while self._next_id in self.locations or self._next_id in self._pending["ids"]:
            self._next_id += 1
        mid = self._next_id
        self._next_id += 1
        return mid

    @_guarded
    def forget(self, memory_id):
        """Remove a memory (or an iterable of ids) from recall at once; compact() reclaims its bytes."""
        self._require_writable()
        ids = [memory_id] if isinstance(memory_id, (int, np.integer)) and not isinstance(memory_id, bool) else list(memory_id)
        for i in ids:
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
                raise InvalidInputError(f"memory ids are integers, got {i!r}")
        with self.transaction():
            pending_rows = {r["id"] for r in self._pending["rows"]}
            missing = [int(i) for i in ids if int(i) not in self.locations and int(i) not in pending_rows]
            if missing:
                raise NotFoundError(f"no memory with id {missing[0] if len(missing) == 1 else missing}")
            for i in ids:
                i = int(i)
                if i in pending_rows:  # added in this same transaction: simply do not commit it
                    self._pending["rows"] = [r for r in self._pending["rows"] if r["id"] != i]
                    self._pending["ids"].discard(i)
                else:
                    self._pending["forget"].append(i)

    def _commit(self):
        p = self._pending
        if not (p["rows"] or p["forget"]):
            self.segments.rollback_to(p["mark"])  # forgotten-in-transaction adds leave bytes
            return
        seq = self._commit_seq + 1
        try:
            self.segments.sync()
            self.catalog.begin()
            if p["documents"]:
                for doc in p["documents"]:
                    self.catalog.insert_document(doc)
            if p["rows"]:
                self._insert_rows(p["rows"], seq)
            if p["forget"]:
                self.catalog.delete_memories(p["forget"], seq)
            self.catalog.set_meta("commit_seq", seq)
            self.catalog.set_meta("next_id", self._next_id)
            self.catalog.commit()
        except BaseException as e:
            self._abort()
            if isinstance(e, M3DBError) or not isinstance(e, Exception):
                raise
            raise FormatError(f"commit failed and was rolled back, nothing was written: {e}") from e
        self._commit_seq = seq
        rows = p["rows"]
        if rows:
            ids = np.array([r["id"] for r in rows], dtype=np.int64)
            self.locations.insert(ids, [r["segment"] for r in rows], [r["offset"] for r in rows],
                                  [r["length"] for r in rows], [r["checksum"] for r in rows])
            self.index.add(ids, np.stack([r["embedding"] for r in rows]))
        if p["forget"]:
            self.locations.delete(p["forget"])
            self.cache.discard(p["forget"])
            self.index.remove(p["forget"])
        self._unsaved += len(rows) + len(p["forget"])
        every = self._config.get("index_save_every", INDEX_SAVE_EVERY)
        if self._unsaved >= max(every, len(self.index) // 4):
            self.index.save(self._commit_seq)
            self._unsaved = 0

    def _insert_rows(self, rows, seq):
        n = len(rows)
        columns = self.catalog.columns()
        for key in sorted({k for r in rows for k, t in r["types"].items() if t}):
            if key not in columns:
                sql_type = _widest([r["types"][key] for r in rows if r["types"].get(key)])
                self.catalog.add_metadata_column(key, sql_type)
        columns = self.catalog.columns()
        emb = np.empty(n, dtype=object)
        for i, r in enumerate(rows):
            emb[i] = r["embedding"]
        batch = {
            "id": np.array([r["id"] for r in rows], dtype=np.int64),
            "document_id": _nullable([r["document_id"] for r in rows]),
            "ordinal": _nullable([r["ordinal"] for r in rows]),
            "char_start": _nullable([r["char_start"] for r in rows]),
            "char_end": _nullable([r["char_end"] for r in rows]),
            "text": np.array([r["text"] for r in rows], dtype=object),
            "token_count": _nullable([r["token_count"] for r in rows]),
            "embedding": emb,
            "segment": np.array([r["segment"] for r in rows], dtype=np.int32),
            "offset": np.array([r["offset"] for r in rows], dtype=np.int64),
            "length": np.array([r["length"] for r in rows], dtype=np.int32),
            "checksum": np.array([r["checksum"] for r in rows], dtype=np.uint64),
            "codec": np.array([r["codec"] for r in rows], dtype=object),
            "commit_seq": np.full(n, seq, dtype=np.int64),
        }
        for key in sorted({k for r in rows for k in r["metadata"]}):
            values = [r["metadata"].get(key) for r in rows]
            if columns.get(key) == "JSON":
                values = [None if v is None else json.dumps(v) for v in values]
            batch[key] = _nullable(values, float if columns.get(key) == "DOUBLE" else None)
        self.catalog.insert_memories(batch)

    def _abort(self):
        self.catalog.rollback()
        self.segments.rollback_to(self._pending["mark"])
        self._next_doc_id = None
        self._pending = self._new_pending()

    # -- reading -----------------------------------------------------------------------------

    @_guarded
    def get(self, memory_id):
        """The memory with this id, decoded (a Memory; its arrays are read-only, shared with
        the RAM cache), or NotFoundError."""
        return self._read(memory_id)

    @_guarded
    def get_many(self, ids):
        """Memories for a list of ids, decoded, in the given order."""
        return self._read_many(list(ids))

    def _read(self, memory_id, arrays=True):
        return self._read_many([memory_id], arrays)[0]

    def _read_many(self, ids, arrays=True):
        """Memories for ids; with arrays, cold ones are encoded now, together (_warm)."""
        out = [self._read_one(i, arrays) for i in ids]
        cold = [m for m in out if m.cold] if arrays else []
        if cold:
            warm = self._warm(list({m.id: m for m in cold}.values()))
            out = [warm.get(m.id, m) if m.cold else m for m in out]
        return out

    def _read_one(self, memory_id, arrays=True):
        if not isinstance(memory_id, (int, np.integer)) or isinstance(memory_id, bool):
            raise InvalidInputError(f"memory ids are integers, got {memory_id!r}")
        loc = self.locations.find(int(memory_id))
        if loc is None:
            raise NotFoundError(f"no memory with id {memory_id}")
        cached = self.cache.get(int(memory_id))
        if cached is not None:
            return cached
        segment, offset, length, checksum = loc
        where = f"memory {memory_id} ({segment_name(segment)} @ {offset})"
        buf = self.segments.read(segment, offset, length)
        memory = decode_record(buf, where, expect_id=int(memory_id), expect_crc=checksum, arrays=arrays)
        if arrays and not memory.cold:
            self.cache.put(memory)
        return memory

    def _warm(self, memories, *, cache=True):
        """Encode cold memories (their first read) with the bound model; return {id: Memory}.

        A writable database keeps them: the full records are appended and fsynced, then one
        catalog transaction points the memories at them (a crash in between leaves bytes that
        recovery cuts). A read-only one (or one inside a transaction) keeps them in the RAM
        cache only."""
        try:
            model, _ = self._models()
        except SpecMismatchError as e:
            raise SpecMismatchError(
                f"memory {memories[0].id} is cold (stored as text, encoded on first read) and encoding it needs the "
                f"model that built this database: {e}"
            ) from e
        encoded = model.encode([m.text for m in memories])
        blobs, warm = [], {}
        for m, e in zip(memories, encoded):
            keys, values, positions = self.spec.check_arrays(e["keys"], e["values"], e["positions"])
            self.codec.check(keys), self.codec.check(values)
            token_count = m.token_count if m.token_count is not None else int(e["token_count"])
            blob = encode_record(m.id, self.codec, keys, values, positions, m.text, m.metadata, m.document_id,
                                 m.ordinal, token_count)
            blobs.append(blob)
            # read back what was stored, so a warmed memory equals every later read of it
            warm[m.id] = decode_record(blob, f"memory {m.id}")
        if not self.read_only and not self._in_transaction:
            self._keep_warm(list(warm), blobs)
        if cache:
            for memory in warm.values():
                self.cache.put(memory)
        return warm

    def _keep_warm(self, ids, blobs):
        mark = self.segments.mark()
        places = [self.segments.append(blob) for blob in blobs]
        try:
            self.segments.sync()
            self.catalog.begin()
            self.catalog.relocate_memories(ids, [p[0] for p in places], [p[1] for p in places],
                                           [len(b) for b in blobs], [_payload_crc(b) for b in blobs], self.codec.name)
            self.catalog.commit()
        except BaseException:
            self.catalog.rollback()
            self.segments.rollback_to(mark)
            raise
        self.locations.move(ids, [p[0] for p in places], [p[1] for p in places],
                            [len(b) for b in blobs], [_payload_crc(b) for b in blobs])

    @_guarded
    def warm_up(self, *, batch_size=16, progress=True):
        """Encode every cold memory now (say, before packing, so readers need not); return
        how many were encoded."""
        self._require_writable()
        if self._in_transaction:
            raise InvalidInputError("warm_up() cannot run inside a transaction; call it after the transaction")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        ids = self.catalog.cold_ids().tolist()
        bar = progress_bar(progress, "memories", total=len(ids))
        try:
            for start in range(0, len(ids), batch_size):
                batch = [self._read_one(i) for i in ids[start : start + batch_size]]
                self._warm(batch, cache=False)
                bar.update(len(batch))
        finally:
            bar.close()
        return len(ids)

    @_guarded
    def recall(self, vector, k=5, where=None, params=None, *, decode=False):
        """The k memories nearest `vector` (cosine), best first, as Matches. `vector` may be a
        query text, embedded by the database's embedder.

        where: a SQL boolean expression over the columns of `memories` (metadata keys are
        columns), e.g. "lang = 'en' AND year > ?", with `params` bound to its `?`s; or a dict
        {column: value} meaning column = value for each. decode=True also decodes each
        memory's arrays into `match.memory`.
        """
        if isinstance(vector, str):
            vector = self.embed_query(vector)
        v = np.asarray(vector)
        if v.dtype.kind != "f" or v.shape != (self.spec.embedding_dim,) or not np.isfinite(v).all() or not v.any():
            raise InvalidInputError(
                f"the query vector must be a finite, non-zero float array of shape ({self.spec.embedding_dim},), "
                f"got dtype {v.dtype} shape {v.shape}"
            )
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise InvalidInputError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
        allowed = None
        if where is not None:
            allowed = self._filter_ids(where, params)
        elif params is not None:
            raise InvalidInputError("params were given without a where= filter to bind them to")
        ids, scores, plan = recall_mod.plan_search(
            self.index, v.astype(np.float32), int(k), allowed, len(self.locations),
            exact_limit=self._config.get("exact_limit", recall_mod.EXACT_LIMIT),
        )
        out = []
        for mid, score, m in zip(ids.tolist(), scores.tolist(), self._read_many(ids.tolist(), arrays=decode)):
            out.append(recall_mod.Match(mid, float(score), m.text, m.metadata, m.document_id, m if decode else None))
        return recall_mod.Matches(out, plan)

    def _filter_ids(self, where, params):
        if isinstance(where, dict):
            if params is not None:
                raise InvalidInputError("a dict filter binds its own values; do not pass params with it")
            columns = self.catalog.columns()
            parts, params = [], []
            for key, value in where.items():
                if key not in columns:
                    raise QueryError(f"unknown column {key!r} in the filter; columns of `memories`: {', '.join(columns)}")
                if value is None:
                    parts.append(f'"{key}" IS NULL')
                else:
                    parts.append(f'"{key}" = ?')
                    params.append(value)
            where = " AND ".join(parts) or "TRUE"
            check = None  # built here from known columns
        elif not isinstance(where, str) or not where.strip():
            raise InvalidInputError(f"where must be a SQL expression string or a dict, got {where!r}")
        else:
            from .sql_check import checked_filter as check  # no files, network or side effects
        if params is not None and not isinstance(params, (list, tuple, dict)):
            raise InvalidInputError("params must be a list (for ?) or a dict (for $name)")
        # the allowed set of a filter only changes with a commit: cache it per commit, so a
        # filter repeated across queries (a tenant, a language) costs one catalog scan (and
        # one parse); a filter calling now() or random() is never cached
        try:
            key = (where, _freeze(params))
            hash(key)
        except TypeError:
            key = None
        if self._filter_cache_seq != self._commit_seq:
            self._filter_cache.clear()
            self._filter_cache_seq = self._commit_seq
        allowed = self._filter_cache.pop(key, None) if key is not None else None
        if allowed is None:
            sql, volatile = (where, False) if check is None else check(where)
            allowed = np.sort(self.catalog.ids_where(sql, params))
            allowed.flags.writeable = False
            if volatile or key is None:
                return allowed
        self._filter_cache[key] = allowed  # re-inserted: most recently used last
        while len(self._filter_cache) > FILTER_CACHE_SIZE:
            self._filter_cache.pop(next(iter(self._filter_cache)))
        return allowed

    @_guarded
    def sql(self, query, params=None):
        """Run one SQL statement; return Rows (tuples with .columns; .arrow(), .df(), .numpy()).

        DuckDB SQL over the catalog tables plus memory operations (docs/sql.md):
        `SELECT ... FROM recall('text' or ?, k => 5) r WHERE r.lang = 'en'`,
        `SELECT * FROM generate('prompt', max_tokens => 64)`, `INSERT INTO documents (text, ...)
        VALUES (...)`, `DELETE FROM memories WHERE ...`, and `EXPLAIN` of each. params: a list
        for `?`/`$1`, or a dict for `$name`; always bound, never spliced into the text.
        """
        from .query import run  # the SQL language module (it imports this one)

        return run(self, query, params)

    @_guarded
    def __len__(self):
        return len(self.locations)

    # -- maintenance -------------------------------------------------------------------------

    @_guarded
    def check(self):
        """Read and verify every memory's checksums and arrays, and the index against the
        catalog. Returns a CheckReport; nothing is changed."""
        problems = []
        cat = self.catalog.locations()
        ids = cat["id"]
        uniq, counts = np.unique(ids, return_counts=True)
        for dup in uniq[counts > 1][:20]:
            problems.append(f"memory id {dup} appears {counts[uniq == dup][0]} times in the catalog")
        for i in range(len(ids)):
            mid, seg, off, length, crc = (int(cat[c][i]) for c in ("id", "segment", "offset", "length", "checksum"))
            where = f"memory {mid} ({segment_name(seg)} @ {off})"
            try:
                decode_record(self.segments.read(seg, off, length), where, expect_id=mid, expect_crc=crc)
            except FormatError as e:
                problems.append(str(e))
        index_keys = np.sort(self.index.keys())
        if not np.array_equal(index_keys, uniq):
            missing = np.setdiff1d(uniq, index_keys)
            extra = np.setdiff1d(index_keys, uniq)
            problems.append(f"index differs from catalog: {len(missing)} ids missing from it, {len(extra)} extra")
        if not np.array_equal(self.locations.ids, uniq):
            problems.append("the in-memory location table differs from the catalog")
        return CheckReport(len(ids), problems)

    @_guarded
    def compact(self):
        """Rewrite live records into fresh segments and delete the old ones, reclaiming the
        bytes of forgotten memories. Returns {"bytes_before", "bytes_after"}."""
        self._require_writable()
        if self._in_transaction:
            raise InvalidInputError("compact() cannot run inside a transaction; call it after the transaction")
        old = self.segments.numbers()
        before = sum(self.segments.size(n) for n in old)
        mark = self.segments.mark()
        ids = self.locations.ids.copy()
        new_seg, new_off = np.zeros(len(ids), np.int32), np.zeros(len(ids), np.int64)
        self.segments.new_segment()
        for i, mid in enumerate(ids.tolist()):
            seg, off, length, _ = self.locations.find(mid)
            blob = self.segments.read(seg, off, length)
            new_seg[i], new_off[i] = self.segments.append(blob)
        self.segments.sync()
        try:
            self.catalog.begin()
            self.catalog.move_memories(ids, new_seg, new_off)
            self.catalog.commit()
        except BaseException:
            self.catalog.rollback()
            self.segments.rollback_to(mark)
            raise
        self.locations.move(ids, new_seg, new_off)
        for n in old:
            self.segments.remove(n)
        after = sum(self.segments.size(n) for n in self.segments.numbers())
        return {"bytes_before": before, "bytes_after": after}

    @_guarded
    def pack(self, path, *, name=None, description=None, version=None, license=None, attribution=None, overwrite=False,
             progress=False):
        """Write this knowledge base as one read-only package file (`.m3kb`); return its manifest.

        The strings name, description, version, license and attribution go into the manifest.
        Packing the same database twice gives byte-identical files. See docs/packaging.md.
        """
        from .package import pack

        return pack(self, path, name=name, description=description, version=version, license=license,
                    attribution=attribution, overwrite=overwrite, progress=progress)

    @_guarded
    def close(self):
        """Save the index and release the database. Uncommitted transactions are rolled back."""
        try:
            if not self.read_only and self._unsaved:
                self.index.save(self._commit_seq)
        finally:
            self._closed = True
            self.segments.close()
            self.catalog.close()
            self.index.close()
            self._lock.release()
            if self._tempdir:
                shutil.rmtree(self._tempdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._closed:
            self.close()

    def __repr__(self):
        state = "closed" if self._closed else ("read-only" if self.read_only else "open")
        return f"<m3db.Database {self.path!r} {state}>"

    def _require_open(self):
        if self._closed:
            raise ClosedError(f"the database {self.path!r} is closed; connect() again to use it")

    def _require_writable(self):
        self.catalog._writable()


def _check_config(config):
    config = dict(config or {})
    for key, value in config.items():
        if key not in CONFIG_KEYS:
            raise InvalidInputError(f"unknown config key {key!r}; known keys: {sorted(CONFIG_KEYS)}")
        if not isinstance(value, CONFIG_KEYS[key]) or isinstance(value, bool) or value < 1:
            raise InvalidInputError(f"config {key!r} must be a positive integer, got {value!r}")
    if config.get("segment_size", DEFAULT_SEGMENT_SIZE) < 4096:
        raise InvalidInputError("config 'segment_size' must be at least 4096 bytes")
    return config


def _check_document(where, doc):
    unknown = sorted(set(doc) - {"source", "title", "uri", "metadata"})
    if unknown:
        raise InvalidInputError(f"{where}: unknown document fields {unknown}; known: source, title, uri, metadata")
    if not isinstance(doc.get("source"), str) or not doc["source"]:
        raise InvalidInputError(f"{where}: a document needs a non-empty string 'source' (a unique name)")
    for key in ("title", "uri"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise InvalidInputError(f"{where}: document {key} must be a string")
    try:
        json.dumps(doc.get("metadata"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{where}: document metadata must be JSON values ({e})") from e


def _freeze(params):
    if params is None:
        return None
    if isinstance(params, dict):
        return tuple(sorted(params.items()))
    return tuple(params)


def _payload_crc(blob):
    return zlib.crc32(blob[HEADER_SIZE:])


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


def _widens(new, existing):
    """May a value of SQL type `new` go into a column of type `existing`?"""
    if new == existing:
        return True
    return new == "BIGINT" and existing == "DOUBLE"


def _widest(types):
    types = set(types)
    if len(types) == 1:
        return types.pop()
    if types == {"BIGINT", "DOUBLE"}:
        return "DOUBLE"
    raise InvalidInputError(f"one metadata key holds values of several types in one batch: {sorted(types)}")

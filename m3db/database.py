"""The database: `connect()` and the public verbs, each a few lines over the layers below.

A `Database` composes a store (m3db.storage.store: a directory's, or a package's, read-only),
a writer (m3db.storage.writer; absent when read-only), a filter cache and the search plan
(m3db.search), and the knowledge verbs (m3db.knowledge), which reach a model only through its
protocol. Every public verb runs under one mutex, so threads may share a database; one process
may open a database to write, many to read (docs/engine.md).
"""

import contextlib
import functools
import os
import shutil
import threading
import time
from collections.abc import Iterator

import numpy as np

from .errors import ClosedError, InvalidInputError, M3DBError, storage_error
from .knowledge import ingest, sync, warm
from .knowledge.answer import DEFAULT_MARGIN, Answer, AnswerPlan, check_generate_options, check_options
from .knowledge.bundled import bind, bind_embedder, check_memory_mode, check_precision
from .knowledge.protocols import require_protocols
from .opening import open_path
from .package.multi import open_packages
from .package.pack import pack
from .package_set import PackageSet
from .search.filters import FilterCache
from .search.plan import EXACT_LIMIT, MAX_K, plan_search
from .search.results import Match, Matches
from .sql.check import checked_filter
from .sql.rows import Rows
from .sql.run import run as run_sql
from .storage import maintenance
from .storage.catalog import CATALOG_ERRORS, check_text, damaged
from .storage.lock import DEFAULT_TIMEOUT
from .storage.maintenance import CheckReport
from .storage.record import Memory
from .storage.spec import MemorySpec
from .storage.validate import check_memory, check_path, check_timeout
from .storage.writer import Writer

# a model-bound database's codec: docs/quality.md measured int4 within noise of int8, f16 and
# f32 (-0.10 +- 0.06 nats per answer) at half int8's bytes
DEFAULT_CODEC = "int4"

__all__ = ["CheckReport", "Database", "attach", "connect"]


def connect(
    path,
    *,
    spec=None,
    read_only=False,
    config=None,
    model=None,
    embedder=None,
    codec=DEFAULT_CODEC,
    memory_mode=None,
    precision=None,
    timeout=DEFAULT_TIMEOUT,
) -> "Database | PackageSet":
    """Open (or create) the m3db database at `path` (a directory), or ":memory:".

    spec: a MemorySpec (or its dict) for a database of precomputed memories. Without it, a new
    database is bound to `model` and `embedder` (default: the bundled SmolLM2-135M-Instruct
    and all-MiniLM-L6-v2), which the text verbs (add, recall by text, generate) use; opening
    an existing database checks they match what built it.
    read_only: many processes may open a database read-only; only one may open it to write.
    config: {"segment_size": bytes, "exact_limit": ids, "index_save_every": changes,
    "cache_bytes": RAM for decoded memories (256 MiB by default), "expansion_search": HNSW
    candidates per unfiltered search (more: higher recall, slower; docs/engine.md)}.
    codec: how a new database bound to a model stores keys and values ('f32', 'f16', 'int8',
    'int4'; default int4: as good as int8 at half the bytes, docs/quality.md); a spec has its own.
    memory_mode: the bundled model's memory mode for a new database: "dense" (the default: every
    layer, 32 tokens per head) or "sparse" (8 tokens per head on half the layers, 15% of
    dense's bytes at the same codec, read through the bundled reader adapter; docs/adapter.md). An
    existing database opens with the mode it was built with; naming another is an error.
    precision: the bundled decoder's reading precision, "int4" (default: the GGUF's own 4-bit
    weights, 1.4-2.4x faster per token than fp32 on CPU), "int8" or "fp32"; memories are written
    in fp32 at every precision, so a database records none (docs/decoder.md).
    timeout: seconds to wait while another process holds the database (5, as sqlite3); a writer
    that waits goes before readers that arrive after it. 0 fails at once with LockedError.
    A package file (`.m3kb`, from db.pack()) opens read-only in place; a list of package
    files (or a dict {name: path}) attaches them together, returning a PackageSet.
    """
    if isinstance(path, (list, tuple, dict)):
        return attach(path, spec=spec, config=config, model=model, embedder=embedder, precision=precision)
    options = dict(spec=spec, read_only=read_only, config=config, model=model, embedder=embedder, codec=codec)
    return Database(path, **options, memory_mode=memory_mode, precision=precision, timeout=timeout)


def attach(paths, *, spec=None, config=None, model=None, embedder=None, precision=None) -> PackageSet:
    """Open packages read-only together; return a PackageSet.

    paths: a list of package files (each named by its file name without `.m3kb`), or a dict
    {name: path}. spec: the loaded model's MemorySpec; every package must match it, and each
    other: a mismatch is a SpecMismatchError naming both sides. model, embedder: as for
    connect(); each package is checked against them.
    """
    return PackageSet(
        open_packages(
            paths,
            lambda path: Database(path, spec=spec, config=config, model=model, embedder=embedder, precision=precision),
        )
    )


def _guarded(method):
    """Run a public method under the database mutex, refusing a closed database."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs) -> object:
        with self._mutex:
            self._require_open()
            try:
                return method(self, *args, **kwargs)
            except OSError as e:  # the I/O under any verb: an m3db error that keeps the errno
                if isinstance(e, M3DBError):
                    raise
                raise storage_error(e, f"{method.__name__}() on {self.path!r}") from e
            except CATALOG_ERRORS as e:  # m3db's own catalog queries failing: the file is damaged
                raise damaged(self.store.catalog.path, e) from e

    return wrapper


class Database:
    def __init__(
        self,
        path,
        *,
        spec=None,
        read_only=False,
        config=None,
        model=None,
        embedder=None,
        codec=DEFAULT_CODEC,
        memory_mode=None,
        precision=None,
        timeout=DEFAULT_TIMEOUT,
    ):
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(
                "path must be a string or path-like (a directory, a .m3kb file or ':memory:'), got "
                f"{type(path).__name__}"
            )
        if memory_mode is not None and (model is not None or spec is not None):
            raise InvalidInputError(
                "pass memory_mode= or model=/spec=, not both: a model or spec carries its own memory settings"
            )
        require_protocols(model, embedder)
        if memory_mode is not None:
            check_memory_mode(memory_mode)
        check_precision(precision)
        if not isinstance(read_only, bool):
            raise InvalidInputError(f"read_only must be True or False, got {read_only!r}")
        check_timeout(timeout)
        if isinstance(spec, dict):
            spec = MemorySpec.from_dict(spec)
        if spec is not None and not isinstance(spec, MemorySpec):
            raise InvalidInputError(f"spec must be a MemorySpec or a dict, got {type(spec).__name__}")
        self.path = check_path(path)
        self._model_arg, self._embedder_arg, self._memory_mode = model, embedder, memory_mode
        self._precision = precision
        self._mutex = threading.RLock()
        self._closed = True
        opened = open_path(
            self.path,
            spec=spec,
            read_only=read_only,
            config=config,
            codec=codec,
            model=model,
            embedder=embedder,
            memory_mode=memory_mode,
            precision=precision,
            timeout=timeout,
        )
        self.store, self.manifest, self._tempdir = opened.store, opened.manifest, opened.tempdir
        self._model, self._embedder = opened.model, opened.embedder  # None until the first text verb
        self.read_only = self.store.read_only
        self._config = self.store.config
        self.writer = None if self.read_only else Writer(self.store)
        self._filter_cache = FilterCache(self.store.catalog, checked_filter)
        self._closed = False

    # -- what the layers below hold ------------------------------------------------------------

    spec = property(lambda self: self.store.spec, doc="The memory spec every record is bound to.")
    codec = property(lambda self: self.store.codec, doc="The codec records are stored with.")
    catalog = property(lambda self: self.store.catalog, doc="The DuckDB catalog (m3db.storage.catalog).")
    segments = property(lambda self: self.store.segments, doc="The segment files (or a package's sections).")
    locations = property(lambda self: self.store.locations, doc="Where each memory's record lies (in RAM).")
    index = property(lambda self: self.store.index, doc="The vector index (USearch HNSW).")
    cache = property(lambda self: self.store.cache, doc="Decoded memories kept in RAM.")
    directory = property(lambda self: self.store.directory, doc="The directory the catalog and index are in.")
    commit_seq = property(lambda self: self.store.commit_seq, doc="The number of the last commit.")
    closed = property(lambda self: self._closed, doc="True once close() has run.")
    mutex = property(
        lambda self: self._mutex,
        doc="The lock every verb holds: the catalog's one DuckDB connection serves one call at a time. The "
        "knowledge verbs take it around their catalog reads, not around the model's work.",
    )

    # -- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator["Database"]:
        """Group adds and forgets into one atomic commit: all of them land, or none."""
        with self._mutex:
            self._require_open()
            self.require_writable()
            with self.writer.transaction():
                yield self

    @_guarded
    def add_memory(
        self,
        keys,
        values,
        positions,
        *,
        embedding,
        text,
        metadata=None,
        document=None,
        ordinal=None,
        token_count=None,
        id=None,
    ) -> int:
        """Store one memory; return its id.

        keys, values: float32 (layers, kv_heads, n, head_dim), keys before RoPE;
        positions: integers (layers, kv_heads, n), each kept token's position in the reference;
        embedding: float32 (embedding_dim,), the retrieval vector; text: the reference text;
        metadata: {name: str|int|float|bool|None|list|dict}, stored as columns of `memories`;
        document: a document's source string (created on first use) or an existing document id.
        """
        item = dict(
            keys=keys,
            values=values,
            positions=positions,
            embedding=embedding,
            text=text,
            metadata=metadata,
            document=document,
            ordinal=ordinal,
            token_count=token_count,
            id=id,
        )
        return self.add_memories([item])[0]

    @_guarded
    def add_memories(self, memories) -> list[int]:
        """Store many memories in one commit; return their ids. Each item is a dict of
        add_memory's arguments. Every item is checked before anything is written."""
        self.require_writable()
        if isinstance(memories, dict):
            raise InvalidInputError("add_memories takes a list of dicts; for one memory use add_memory()")
        items = list(memories)
        with self.writer.transaction():
            checked = [check_memory(i, item, self.spec, self.codec) for i, item in enumerate(items)]
            self.writer.check_ids(checked)
            return self.writer.stage(checked)

    @_guarded
    def forget(self, memory_id) -> None:
        """Remove a memory (or an iterable of ids) from recall at once; compact() reclaims its bytes."""
        self.require_writable()
        ids = (
            [memory_id]
            if isinstance(memory_id, (int, np.integer)) and not isinstance(memory_id, bool)
            else list(memory_id)
        )
        for i in ids:
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
                raise InvalidInputError(f"memory ids are integers, got {i!r}")
        with self.writer.transaction():
            self.writer.forget([int(i) for i in ids])

    def add(self, text, *, source=None, title=None, uri=None, cold=False, replace=False, **metadata) -> list[int]:
        """Chunk, embed, encode and commit one document; return its memory ids.

        source: a unique name for the document (default: a hash of the text, so adding the
        same text twice adds nothing the second time). The same source as stored is skipped
        (returns []); with other text, title, uri or metadata it is an error, unless replace=True,
        which forgets its memories and stores what was passed, row included, in one commit. Keyword
        arguments become metadata columns of its memories (`lang="en"` -> filter with
        where="lang = 'en'"). cold: see add_documents.
        """
        self._require_open()
        if isinstance(metadata.get("metadata"), dict):  # add(text, metadata={...}): what was meant
            extra = metadata.pop("metadata")
            both = sorted(set(extra) & set(metadata))
            if both:
                raise InvalidInputError(f"metadata {both} given both in metadata= and as keyword arguments")
            metadata.update(extra)
        doc = {"text": text, "source": source, "title": title, "uri": uri, "metadata": metadata}
        ids = []
        ingest.add_documents(self, [doc], progress=False, cold=cold, replace=replace, ids_out=ids)
        return ids

    def add_documents(
        self, documents, *, batch_size=16, progress=True, cold=False, replace=False
    ) -> ingest.IngestReport:
        """Add many documents (dicts with `text` and optional `source`, `title`, `uri`,
        `metadata`, or plain strings), committing every `batch_size` documents. A document
        whose source is already committed as given is skipped, so re-running after an
        interruption resumes where it stopped; with other text or document fields it is an error
        naming the source, unless replace=True (its old memories are forgotten and its row
        restated in the commit that adds the new ones). Returns an IngestReport.

        cold=False (warm start) encodes each memory now. cold=True (cold start, as in the
        paper) stores only the text and its embedding (ingest costs chunking and embedding,
        no decoder pass per reference); a memory is encoded the first time it is read (generate,
        recall(decode=True), get) and then kept, so later reads cost the same as warm ones.
        `db.warm_up()` encodes the rest.
        """
        self._require_open()
        return ingest.add_documents(
            self, documents, batch_size=batch_size, progress=progress, cold=cold, replace=replace
        )

    def sync(self, documents, *, dry_run=False, **options) -> sync.SyncReport:
        """Hold exactly `documents` (sources.files(folder)) in one commit: m3db.knowledge.sync.sync has the rules."""
        self._require_open()
        return sync.sync(self, documents, dry_run=dry_run, **options)

    @_guarded
    def warm_up(self, *, batch_size=16, progress=True) -> int:
        """Encode every cold memory now (say, before packing, so readers need not); return
        how many were encoded."""
        return warm.warm_up(self, batch_size=batch_size, progress=progress)

    # -- reading -------------------------------------------------------------------------------

    @_guarded
    def get(self, memory_id) -> Memory:
        """The memory with this id, decoded (a Memory; its arrays are read-only, shared with
        the RAM cache), or NotFoundError."""
        return self._read_many([memory_id])[0]

    @_guarded
    def get_many(self, ids) -> list[Memory]:
        """Memories for a list of ids, decoded, in the given order."""
        if isinstance(ids, (int, np.integer, str, bytes)):
            raise InvalidInputError(f"get_many takes a list of ids, got {ids!r}; for one memory use get(id)")
        return self._read_many(list(ids))

    def _read_many(self, ids, arrays=True):
        """Memories for ids; with arrays, cold ones are encoded now, together (knowledge/warm.py)."""
        out = [self.store.read(i, arrays=arrays) for i in ids]
        cold = [m for m in out if m.cold] if arrays else []
        if cold:
            warmed = warm.warm(self, list({m.id: m for m in cold}.values()))
            out = [warmed.get(m.id, m) if m.cold else m for m in out]
        # the cache shares these objects: a caller gets its own metadata and read-only arrays
        return [m.detached() for m in out]

    @_guarded
    def recall(self, vector, k=5, where=None, params=None, *, decode=False, margin=None) -> Matches:
        """The k memories nearest `vector` (cosine), best first, as Matches. `vector` may be a
        query text, embedded by the database's embedder.

        where: a SQL boolean expression over the columns of `memories` (metadata keys are
        columns), e.g. "lang = 'en' AND year > ?", with `params` bound to its `?`s; or a dict
        {column: value} meaning column = value for each. decode=True also decodes each
        memory's arrays into `match.memory`. margin: keep only matches scoring within it of the best.
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
            allowed = self._filter_cache.allowed(where, params, self.commit_seq)
        elif params is not None:
            raise InvalidInputError("params were given without a where= filter to bind them to")
        ids, scores, plan = plan_search(
            self.index,
            v.astype(np.float32),
            int(k),
            allowed,
            len(self.locations),
            exact_limit=self._config.get("exact_limit", EXACT_LIMIT),
            expansion=self._config.get("expansion_search"),
        )
        if check_options(margin=margin)["margin"] is not None and len(scores):  # before any is read
            ids, scores = ids[scores >= scores[0] - margin], scores[scores >= scores[0] - margin]
        started = time.perf_counter()
        memories = self._read_many(ids.tolist(), arrays=decode)
        return Matches(
            [
                Match(mid, float(score), m.text, m.metadata, m.document_id, m if decode else None)
                for mid, score, m in zip(ids.tolist(), scores.tolist(), memories)
            ],
            plan,
            read_seconds=time.perf_counter() - started,
        )

    def embed_query(self, text) -> np.ndarray:
        """The retrieval vector of a query text."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("a recall query must be a non-empty string (or a vector)")
        check_text("the recall query", text)
        if self._embedder is None:  # the embedder alone: recall by text never builds the decoder
            self._embedder = bind_embedder(self.spec, self._embedder_arg)
        return self._embedder.embed([text])[0]

    def generate(
        self,
        prompt,
        *,
        max_tokens=128,
        memory=True,
        k=None,
        where=None,
        params=None,
        temperature=0.0,
        top_p=1.0,
        stop_tokens=None,
        seed=0,
        raw=False,
        margin=DEFAULT_MARGIN,
    ) -> Answer:
        """Answer `prompt`: a question (a string, sent as the user's message under the model's
        chat template), or chat messages [{"role", "content"}]; raw=True sends a string as
        plain completion text instead.

        memory=True reads explicit memories, recalled per 64-token chunk as the paper does;
        memory="rag" puts the same recalled references' text in front of the prompt;
        memory=False uses no knowledge base. k: memories per chunk (default and most: the model's, 5);
        margin: of those, only the ones scoring within it of the best are read (0.1; None: all k);
        where/params: a recall filter. Sampling: max_tokens >= 1; temperature in [0, 100], 0
        greedy; top_p in (0, 1], nucleus sampling; seed in [0, 2**63 - 1]. stop_tokens: token
        ids, not strings, that end the answer: None (the default) is the model's end-of-turn and
        end-of-text tokens; [] stops only at max_tokens. Returns an Answer with the memories it
        used (its `sources`). Every surface (SQL's generate(), `m3db ask`, the server) answers
        through the same plan (m3db.knowledge.answer.AnswerPlan).
        """
        self._require_open()  # before the model loads: a closed database would fail only after decoding
        plan = AnswerPlan(self, self.models()[0], memory=memory, k=k, where=where, params=params, margin=margin)
        sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop_tokens=stop_tokens, seed=seed)
        return plan.generate(prompt, **sampling, raw=raw)

    # generate()'s options checked without decoding (SQL's generate(), its EXPLAIN too)
    check_generate_options = staticmethod(check_generate_options)

    @_guarded
    def documents_of(self, matches) -> list[tuple[str | None, str | None]]:
        """(source, title) of each match's document, in order ((None, None) where it has none):
        how an answer names its sources."""
        names = self.catalog.document_names([m.document_id for m in matches])
        return [names.get(m.document_id, (None, None)) for m in matches]

    @_guarded
    def sql(self, query, params=None, *, max_rows=None) -> Rows:
        """Run one SQL statement; return Rows (tuples with .columns; .arrow(), .df(), .numpy()).

        DuckDB SQL over the catalog tables plus memory operations (docs/sql.md):
        `SELECT ... FROM recall('text' or ?, k => 5) r WHERE r.lang = 'en'`,
        `SELECT * FROM generate('prompt', max_tokens => 64)`, `INSERT INTO documents (text, ...)
        VALUES (...)`, `DELETE FROM memories WHERE ...`, and `EXPLAIN` of each. params: a list
        for `?`/`$1`, or a dict for `$name`; always bound, never spliced into the text.
        max_rows: refuse a result (or the documents an INSERT ... SELECT adds) of more rows with
        TooManyRowsError, reading no further than one past it (a server's cap); None: no cap.
        """
        return run_sql(self, query, params, max_rows=max_rows)

    @_guarded
    def __len__(self):
        return len(self.locations)

    # -- maintenance ---------------------------------------------------------------------------

    @_guarded
    def check(self) -> CheckReport:
        """Read and verify every memory's checksums and arrays, and the index against the
        catalog. Returns a CheckReport; nothing is changed."""
        return maintenance.check(self.store)

    @_guarded
    def compact(self) -> dict:
        """Rewrite live records into fresh segments and delete the old ones, reclaiming the
        bytes of forgotten memories. Returns {"bytes_before", "bytes_after"}."""
        self.require_writable()
        if self.writer.depth:
            raise InvalidInputError("compact() cannot run inside a transaction; call it after the transaction")
        return maintenance.compact(self.store)

    @_guarded
    def train_codec(self, codec="pq", *, sample=None, m=8, seed=0, progress=False) -> dict:
        """Re-encode every memory into `codec` in one atomic swap; a trained codec ("pq", `m`
        bytes per head vector, or {"keys": m, "values": m'}) is first trained on `sample` random
        memories (docs/engine.md, "Codecs"). Returns {"bytes_before", "bytes_after", "memories",
        "codec", "error"}."""
        self.require_writable()
        if self.writer.depth:
            raise InvalidInputError("train_codec() cannot run inside a transaction; call it after the transaction")
        return maintenance.train_codec(self.store, codec, sample=sample, m=m, seed=seed, progress=progress)

    @_guarded
    def pack(
        self,
        path,
        *,
        name=None,
        description=None,
        version=None,
        license=None,
        attribution=None,
        overwrite=False,
        progress=False,
    ) -> dict:
        """Write this knowledge base as one read-only package file (`.m3kb`); return its manifest.

        The strings name, description, version, license and attribution go into the manifest.
        Packing the same database twice gives byte-identical files. See docs/packaging.md.
        """
        if self.writer is not None and self.writer.depth:
            raise InvalidInputError("pack() cannot run inside a transaction; call it after the transaction commits")
        return pack(
            self.store,
            path,
            source=self.path,
            name=name,
            description=description,
            version=version,
            license=license,
            attribution=attribution,
            overwrite=overwrite,
            progress=progress,
        )

    def close(self) -> None:
        """Save the index and release the database. Closing again does nothing."""
        with self._mutex:  # not under another thread's verb
            if self._closed:
                return
            if self.writer is not None and self.writer.depth:
                raise InvalidInputError(
                    "close() inside db.transaction(): leave the with block first (it commits), or raise to roll back"
                )
            try:
                self.store.close()
            except OSError as e:  # saving the index on a full disk, say: as _guarded words it
                if isinstance(e, M3DBError):
                    raise
                raise storage_error(e, f"close() on {self.path!r}") from e
            finally:
                self._closed = True
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

    def require_writable(self) -> None:
        """Raise ReadOnlyError unless this database may be written (its reason names the fix)."""
        self.store.catalog.require_writable()

    # -- the bound model -----------------------------------------------------------------------

    def _bind_models(self, model, embedder, *, spec=None):
        """Bind a model and embedder (the bundled ones for what is missing), checked against the
        stored spec (or a package's `spec`, before its store is open)."""
        self._model, self._embedder = bind(
            spec or self.spec, model, embedder, memory_mode=self._memory_mode, precision=self._precision
        )

    def models(self) -> tuple[object, object]:
        """(model, embedder) this database reads and writes with, bound and checked against its
        spec on first use (the bundled ones unless connect() named others). The knowledge
        layer calls this; an embedder bound alone for recall is checked again here."""
        if self._model is None:
            self._bind_models(self._model_arg, self._embedder_arg)
        return self._model, self._embedder

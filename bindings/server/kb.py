"""The knowledge base a server serves: one database (a directory or a package file), or several
packages attached together, behind one set of verbs.

`KnowledgeBase` owns what differs between the two: a package set's memory ids repeat across
packages, so a memory is named by (package, id) there; recall by text embeds once and recalls
every package; the model is the one every package was checked against. It also owns the
single-writer rule: writes run one at a time (`write`), reads alongside them, each verb under
the database's own mutex; and the ingests running (`Ingest`), which shutdown and a client that
leaves stop. Imports: the m3db facade and m3db.extend (the answer plan).
"""

import contextlib
import itertools
import threading

import numpy as np

import m3db
from m3db.errors import InvalidInputError, M3DBError, NotFoundError, ReadOnlyError
from m3db.extend import AnswerPlan, document_source

# the keyword arguments of Database.add: a metadata key by one of these names cannot be passed
ADD_KEYWORDS = frozenset(("text", "source", "title", "uri", "cold", "replace"))
# chunks embedded or encoded between two looks at whether an ingest was stopped (half the
# encoder's own batch of 16: a stop is reached within a fraction of a second on a CPU)
SLICE = 8


class KnowledgeBase:
    """A Database or a PackageSet, served. `name` is the model id clients send."""

    def __init__(self, db, *, name: str, writable: bool):
        self.db = db
        self.name = name
        self.packages = list(db.packages) if isinstance(db, m3db.PackageSet) else None
        self.primary = db.packages[self.packages[0]] if self.packages else db
        if writable and (self.packages or self.primary.read_only):
            raise InvalidInputError(
                "this knowledge base is read-only (a package, or opened read-only): serve a database "
                "directory opened for writing to accept writes"
            )
        self.writable = writable
        self.spec = db.spec
        self.write_lock = threading.Lock()  # one writer at a time; readers never wait for it
        self.ingests: set[Ingest] = set()  # the add_documents calls running, which shutdown stops
        self.stopping = False
        self._ingests_changed = threading.Condition()
        self._bind_lock = threading.Lock()
        self._bind_error = None

    # -- the model ---------------------------------------------------------------------------

    def databases(self) -> list:
        """The databases served: the one, or each attached package's."""
        return [self.db.packages[name] for name in self.packages] if self.packages else [self.db]

    def model(self):
        """The bound decoder (loaded and checked against the spec on first use; a failure to
        bind is kept, so a server without a usable model does not retry the load per request)."""
        return self.models()[0]

    def models(self) -> tuple:
        with self._bind_lock:
            if self._bind_error is not None:
                raise self._bind_error
            try:
                return self.primary.models()
            except M3DBError as e:
                self._bind_error = e
                raise

    def embedding_tokens(self, texts: list[str]) -> int:
        """Tokens the embedder read for texts (its tokenizer's count, special tokens and
        truncation included), or 0 for an embedder without a tokenizer or without a model."""
        try:
            embedder = self.models()[1]
        except M3DBError:
            return 0
        tokenizer = getattr(embedder, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "encode_batch"):
            return 0
        return sum(len(e.ids) for e in tokenizer.encode_batch(list(texts)))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Retrieval vectors (n, dim) of texts, by the knowledge base's embedder."""
        return np.stack([self.primary.embed_query(t) for t in texts]).astype(np.float32)

    # -- reading -----------------------------------------------------------------------------

    def recall(self, query, *, k: int, where=None, params=None, decode: bool = False):
        """The k nearest memories (a query text or a vector), best first, as Matches (with the
        plan that found them); a package set's matches name their `package`."""
        if isinstance(query, list):
            query = np.asarray(query, dtype=np.float32)
        return self.db.recall(query, k, where, params, decode=decode)

    def check_filter(self, where, params) -> None:
        """Run a recall filter once, so a bad one is a 400 before generation starts (the filter
        cache keeps its result for the recalls that follow)."""
        if where is None and params is None:
            return
        probe = np.full(self.spec.embedding_dim, 1.0, np.float32)
        self.db.recall(probe, 1, where, params)

    def database(self, package):
        """The database holding a package's memories (the served one when not a package set)."""
        if not self.packages:
            if package is not None:
                raise InvalidInputError("package= names a package of a package set; this server serves one database")
            return self.db
        if package is None:
            raise InvalidInputError(
                f"this server serves several packages ({', '.join(self.packages)}): name one with package="
            )
        if package not in self.packages:
            raise NotFoundError(f"no package named {package!r} is served; served: {', '.join(self.packages)}")
        return self.db.packages[package]

    def get(self, memory_id: int, package=None):
        return self.database(package).get(memory_id)

    def sql(self, query: str, params=None, package=None):
        return self.database(package).sql(query, params)

    def plan(self, *, memory, k, where, params, **gate):
        """The engine's answer plan for requests asked alike (mode, k, filter, `margin` in gate):
        the checks, the retriever and the sources every surface shares (m3db.extend.AnswerPlan)."""
        return AnswerPlan(self.db, self.model(), memory=memory, k=k, where=where, params=params, **gate)

    # -- writing (one writer) ----------------------------------------------------------------

    def require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError(
                "this server is read-only: restart it with `m3db serve PATH --write` to add or forget memories"
            )

    def add_documents(self, documents: list, *, cold: bool, replace: bool, ingest=None) -> list[list[int]]:
        """Add documents, one commit each; returns each document's new memory ids ([] for one
        already stored with the same text). A document that fails raises DocumentFailed: its
        index, its error, and the documents stored before it (they stay). `ingest` (an Ingest)
        may stop the call: at the next document, or inside one at its next stop point
        (`stop_points`); that document fails with IngestStopped and nothing of it is stored."""
        ingest = ingest or Ingest()
        self.require_writable()
        for i, doc in enumerate(documents):
            taken = sorted(set(doc.get("metadata", {})) & ADD_KEYWORDS)
            if taken:  # db.add(text, source=..., **metadata) would take it as its own argument
                raise InvalidInputError(
                    f"documents[{i}]: metadata key {taken[0]!r} is a field of the document, not metadata; "
                    f"send it as the document's own field, or rename the metadata key"
                )
        ids = []
        with self.running(ingest):
            try:  # another write holds the writer: a stopped ingest does not wait for it
                while not self.write_lock.acquire(timeout=0.1):
                    ingest.check()
            except IngestStopped as e:
                raise DocumentFailed(0, e, documents, ids) from e
            try:
                with self.stop_points(ingest):
                    for i, doc in enumerate(documents):
                        try:
                            ingest.check()
                            added = self.db.add(
                                doc["text"],
                                source=doc.get("source"),
                                title=doc.get("title"),
                                uri=doc.get("uri"),
                                cold=cold,
                                replace=replace,
                                **doc.get("metadata", {}),
                            )
                        except Exception as e:
                            raise DocumentFailed(i, e, documents, ids) from e
                        ids.append(added)
            finally:
                self.write_lock.release()
        return ids

    @contextlib.contextmanager
    def running(self, ingest):
        """`ingest` among the running ones while the block runs (stopped at once when the server
        is already stopping)."""
        with self._ingests_changed:
            if self.stopping:
                ingest.stop("shutting_down")
            self.ingests.add(ingest)
        try:
            yield
        finally:
            with self._ingests_changed:
                self.ingests.discard(ingest)
                self._ingests_changed.notify_all()

    def stop_ingests(self, timeout: float = 0.0) -> bool:
        """Shutdown: refuse new ingests, stop the running ones, and wait up to `timeout` seconds
        for them to end (each ends at its next stop point: the database is then no longer
        written). Whether none is left running."""
        with self._ingests_changed:
            self.stopping = True
            for ingest in self.ingests:
                ingest.stop("shutting_down")
            return self._ingests_changed.wait_for(lambda: not self.ingests, timeout)

    @contextlib.contextmanager
    def stop_points(self, ingest):
        """Stop points inside a document, while this thread runs the block: m3db's ingest has no
        stop of its own, and one long document is minutes of chunking, embedding and encoding
        before its one commit. So the bound model's `count_tokens` (called while chunking), its
        `encode` and the embedder's `embed` look at `ingest` first, and the last two take SLICE
        chunks at a time (each chunk's memory and embedding are its own: slices give what one
        call gives, but for float noise of another padding); stopped, the document ends before
        its commit. Calls from other threads (a cold memory encoded for a reader) pass through."""
        try:
            model, embedder = self.models()
        except M3DBError:  # the first document fails with the same error, as it would without this
            yield
            return
        owner, active = threading.get_ident(), [True]

        def mine() -> bool:  # a wrapper left in place (another server's overlapping ingest) passes through
            return active[0] and threading.get_ident() == owner

        installed = []
        for obj, name, sliced in ((model, "count_tokens", False), (model, "encode", True), (embedder, "embed", True)):
            call = getattr(obj, name, None)
            own = getattr(obj, "__dict__", {}).get(name, MISSING)
            if call is None:
                continue
            try:
                setattr(obj, name, stop_point(call, ingest, sliced, mine))
            except (AttributeError, TypeError):  # an object that takes no attribute: stops between documents only
                continue
            installed.append((obj, name, own))
        try:
            yield
        finally:
            active[0] = False
            for obj, name, own in reversed(installed):
                if own is MISSING:
                    delattr(obj, name)
                else:
                    setattr(obj, name, own)

    def forget(self, memory_id: int) -> None:
        self.require_writable()
        with self.write_lock:
            self.db.forget(memory_id)

    def close(self) -> None:
        self.db.close()


MISSING = object()


def stop_point(call, ingest, sliced: bool, mine):
    """`call` (count_tokens, encode or embed) looking at `ingest` first when `mine()` (the
    ingesting thread), and when `sliced`, going SLICE texts at a time with a look before each."""

    def checked(texts, *args, **kwargs):
        if not mine():
            return call(texts, *args, **kwargs)
        ingest.check()
        if not sliced or isinstance(texts, str) or len(texts) <= SLICE:
            return call(texts, *args, **kwargs)
        parts = []
        for start in range(0, len(texts), SLICE):
            ingest.check()
            parts.append(call(texts[start : start + SLICE], *args, **kwargs))
        if isinstance(parts[0], np.ndarray):  # embed: (n, dim)
            return np.concatenate(parts)
        return list(itertools.chain.from_iterable(parts))  # encode: one memory per text

    return checked


class IngestStopped(Exception):
    """An ingest was stopped (`reason`: "shutting_down" or "client_closed") before the document
    it was on was committed."""

    def __init__(self, reason: str):
        why = {"shutting_down": "the server is shutting down", "client_closed": "the client closed the connection"}
        super().__init__(f"{why.get(reason, reason)}: the ingest was stopped before this document's commit")
        self.reason = reason


class Ingest:
    """One request's add_documents, and whether it was stopped: the client left, or the server
    is shutting down. Looked at before each document and at the stop points inside one."""

    def __init__(self):
        self.reason = None

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        if self.reason is not None:
            raise IngestStopped(self.reason)


def stored_source(doc: dict) -> str | None:
    """The source a request's document is (or would be) stored under: its own, or its text's hash."""
    text = doc.get("text")
    return document_source(text, doc.get("source")) if isinstance(text, str) else doc.get("source")


class DocumentFailed(Exception):
    """Document `index` of a batch failed with `error`; `stored` are the documents committed
    before it ({index, source, memory_ids, added}), which stay stored."""

    def __init__(self, index: int, error: Exception, documents: list, ids: list):
        super().__init__(f"documents[{index}]: {error}")
        self.index, self.error = index, error
        self.source = stored_source(documents[index])
        self.stored = [
            {"index": i, "source": stored_source(d), "memory_ids": list(m), "added": bool(m)}
            for i, (d, m) in enumerate(zip(documents, ids))
        ]
        self.untried = len(documents) - index - 1

"""The knowledge base a server serves: one database (a directory or a package file), or several
packages attached together, behind one set of verbs.

`KnowledgeBase` owns what differs between the two: a package set's memory ids repeat across
packages, so a memory is named by (package, id) there; recall by text embeds once and recalls
every package; the model is the one every package was checked against. It also owns the
single-writer rule: writes run one at a time (`write`), reads alongside them, each verb under
the database's own mutex. Imports: the m3db facade and m3db.extend (the answer plan).
"""

import threading

import numpy as np

import m3db
from m3db.errors import InvalidInputError, M3DBError, NotFoundError, ReadOnlyError
from m3db.extend import AnswerPlan

# the keyword arguments of Database.add: a metadata key by one of these names cannot be passed
ADD_KEYWORDS = frozenset(("text", "source", "title", "uri", "cold", "replace"))


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
        self._bind_lock = threading.Lock()
        self._bind_error = None

    # -- the model ---------------------------------------------------------------------------

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

    def plan(self, *, memory, k, where, params):
        """The engine's answer plan for requests asked alike (mode, k, filter): the checks, the
        retriever and the sources every surface shares (m3db.extend.AnswerPlan)."""
        return AnswerPlan(self.db, self.model(), memory=memory, k=k, where=where, params=params)

    # -- writing (one writer) ----------------------------------------------------------------

    def require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError(
                "this server is read-only: restart it with `m3db serve PATH --write` to add or forget memories"
            )

    def add_documents(self, documents: list, *, cold: bool, replace: bool) -> list[list[int]]:
        """Add documents, one commit each; returns each document's new memory ids ([] for one
        already stored with the same text). A document that fails raises DocumentFailed: its
        index, its error, and the documents stored before it (they stay)."""
        self.require_writable()
        for i, doc in enumerate(documents):
            taken = sorted(set(doc.get("metadata", {})) & ADD_KEYWORDS)
            if taken:  # db.add(text, source=..., **metadata) would take it as its own argument
                raise InvalidInputError(
                    f"documents[{i}]: metadata key {taken[0]!r} is a field of the document, not metadata; "
                    f"send it as the document's own field, or rename the metadata key"
                )
        with self.write_lock:
            ids = []
            for i, doc in enumerate(documents):
                try:
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
            return ids

    def forget(self, memory_id: int) -> None:
        self.require_writable()
        with self.write_lock:
            self.db.forget(memory_id)

    def close(self) -> None:
        self.db.close()


class DocumentFailed(Exception):
    """Document `index` of a batch failed with `error`; `stored` are the documents committed
    before it ({index, source, memory_ids, added}), which stay stored."""

    def __init__(self, index: int, error: Exception, documents: list, ids: list):
        super().__init__(f"documents[{index}]: {error}")
        self.index, self.error = index, error
        self.source = documents[index].get("source")
        self.stored = [
            {"index": i, "source": d.get("source"), "memory_ids": list(m), "added": bool(m)}
            for i, (d, m) in enumerate(zip(documents, ids))
        ]
        self.untried = len(documents) - index - 1

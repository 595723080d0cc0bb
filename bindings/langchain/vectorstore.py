"""`M3DBVectorStore`: a LangChain `VectorStore` over an m3db database.

A LangChain Document is an m3db document: its id is the document's `source` (unique in the
catalog), its text is chunked into memories of at most the model's reference length (128
tokens), each embedded and stored, its metadata becomes the memories' metadata columns
(metadata.py). A search returns one Document per memory found, carrying its document's id.
Memories are added cold by default: adding costs tokenizing and embedding only, and the
decoder encodes a memory the first time an answer reads it (a vector search never does).

LangChain verb -> m3db verb: add_texts/add_documents -> db.add_documents(source=id,
replace=True); similarity_search[_with_score|_by_vector] -> db.recall(vector, k, where);
delete -> db.forget(the ids of the documents' memories); get_by_ids -> db.sql over `memories`
and `documents`; max_marginal_relevance_search -> db.recall(fetch_k) and the stored
embeddings. Answers are the chat model's (chat_model.py), through db.generate.

Imports: m3db's public API, langchain_core and this room's embedder and metadata.
"""

import json
import os
import uuid
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

import m3db
from m3db.errors import InvalidInputError, SpecMismatchError

from .embedder import LangChainEmbedder
from .metadata import columns_of, metadata_of, metadata_of_row, where_of

# a document's memories, with what a Document is rebuilt from; `to_json(m)` keeps each
# metadata column's type (JSON columns included), which plain rows would give as text
DOCUMENT_MEMORIES = (
    "SELECT d.source, m.char_start, m.char_end, m.text, to_json(m) FROM memories m JOIN documents d "
    "ON d.id = m.document_id WHERE d.source IN (SELECT UNNEST(?)) ORDER BY d.source, m.ordinal, m.id"
)
MEMORY_IDS = "SELECT m.id FROM memories m JOIN documents d ON d.id = m.document_id WHERE d.source IN (SELECT UNNEST(?))"


class M3DBVectorStore(VectorStore):
    """A LangChain vector store over an m3db database.

    db: an open `m3db.Database`, or a path (a directory, or ":memory:") connected here with
    `embedding` as the database's embedder and `connect` (m3db.connect's keywords: model=,
    codec=, config=, read_only=, ...). A new database is bound to a model (the bundled one
    unless model= names another), which encodes its memories for answers.
    embedding: a LangChain Embeddings (wrapped as LangChainEmbedder; `embedding_name` names
    the model in the database's fingerprint), or an m3db Embedder (m3db.testing.HashEmbedder,
    the bundled MiniLM); None: the database's own embedder. Queries are embedded with the
    Embeddings' embed_query.
    cold: add memories as text and embedding only, encoded on first read (the default; fast
    adds); False encodes them with the model as they are added.
    """

    def __init__(self, db=":memory:", *, embedding=None, embedding_name=None, cold=True, **connect):
        if not isinstance(cold, bool):
            raise InvalidInputError(f"cold must be True or False, got {cold!r}")
        if isinstance(embedding, Embeddings):
            embedding = LangChainEmbedder(embedding, name=embedding_name)
        elif embedding_name is not None:
            raise InvalidInputError("embedding_name names a LangChain Embeddings; pass one as embedding=")
        elif embedding is not None and not all(hasattr(embedding, a) for a in ("dim", "fingerprint", "embed")):
            raise InvalidInputError(
                f"embedding must be a LangChain Embeddings or an m3db Embedder (dim, fingerprint, embed), got "
                f"{type(embedding).__name__}"
            )
        self._embedder = embedding
        self.cold = cold
        if isinstance(db, m3db.Database):
            if connect:
                raise InvalidInputError(
                    f"{', '.join(sorted(connect))} are m3db.connect() options; this database is open already: pass "
                    "them to m3db.connect(), or pass a path here"
                )
            self.db, self._owned = db, False
            if embedding is not None:
                found = {"embedder_fingerprint": embedding.fingerprint, "embedding_dim": embedding.dim}
                stored = {"embedder_fingerprint": db.spec.embedder_fingerprint, "embedding_dim": db.spec.embedding_dim}
                if found != stored:
                    raise SpecMismatchError(
                        f"this database was built with the embedder {stored}; the embedding given is {found}. "
                        "Pass the embedding it was built with"
                    )
        elif isinstance(db, (str, os.PathLike)):
            self.db, self._owned = m3db.connect(db, embedder=embedding, **connect), True
        else:
            raise InvalidInputError(f"db must be an m3db.Database or a path, got {type(db).__name__}")

    @property
    def embeddings(self) -> Embeddings | None:
        """The LangChain Embeddings this store embeds with (None for an m3db embedder)."""
        return self._embedder.embeddings if isinstance(self._embedder, LangChainEmbedder) else None

    def close(self) -> None:
        """Close the database if this store opened it (from a path)."""
        if self._owned:
            self.db.close()

    # -- writing ---------------------------------------------------------------------------

    def add_texts(
        self, texts: Iterable[str], metadatas: list[dict] | None = None, *, ids: list[str] | None = None, **kwargs
    ) -> list[str]:
        """Add (or replace, by id) texts with their metadata; return their ids (new ones are
        uuid4 hex strings). A text is chunked into memories; an id already stored is replaced."""
        _no_options("add_texts", kwargs)
        texts = list(texts)
        metadatas = [{}] * len(texts) if metadatas is None else list(metadatas)
        ids = [None] * len(texts) if ids is None else list(ids)
        if not len(texts) == len(metadatas) == len(ids):
            raise InvalidInputError(
                f"{len(texts)} texts, {len(metadatas)} metadatas and {len(ids)} ids: give one of each per text"
            )
        ids = [uuid.uuid4().hex if i is None else i for i in ids]
        documents = {}  # id -> document; an id given twice keeps its last text
        for position, (text, metadata, id_) in enumerate(zip(texts, metadatas, ids)):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"text #{position} is {text!r}: a memory needs text")
            _check_id(id_)
            documents[id_] = {"text": text, "source": id_, "metadata": columns_of(metadata)}
        if not documents:
            return []
        try:
            self.db.add_documents(list(documents.values()), cold=self.cold, replace=True, progress=False)
        except SpecMismatchError as e:
            raise SpecMismatchError(
                "add_texts chunks text with the database's model and embeds it with its embedder, and a memory is "
                "encoded by that model (now, or on first read when cold): connect the database with the model= and "
                f"embedder= that built it (a database of precomputed memories, spec=, has none). {e.args[0]}"
            ) from e
        return ids

    def delete(self, ids: list[str] | None = None, **kwargs) -> bool:
        """Forget the documents with these ids (ids not stored are ignored); True."""
        _no_options("delete", kwargs)
        if ids is None:
            raise InvalidInputError(
                "delete() needs the ids of the documents to delete; m3db does not delete everything by omission"
            )
        for i in ids:
            _check_id(i)
        memories = [row[0] for row in self.db.sql(MEMORY_IDS, [list(ids)])] if ids else []
        if memories:
            self.db.forget(memories)
        return True

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        db=":memory:",
        **kwargs,
    ) -> "M3DBVectorStore":
        """A store over `db` (default: a new database in RAM) holding `texts`; kwargs are the
        constructor's (embedding_name=, cold=, model=, ...)."""
        store = cls(db, embedding=embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    # -- reading ---------------------------------------------------------------------------

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents with these ids, in the order asked (missing ids left out). A
        text chunked into several memories comes back as its memories' text joined by one
        space where the text had whitespace between them."""
        found = self._documents(list(ids))
        return [found[i] for i in dict.fromkeys(ids) if i in found]

    def similarity_search(self, query: str, k: int = 4, filter=None, *, params=None, **kwargs) -> list[Document]:
        """The k memories nearest `query`, best first, as Documents (see similarity_search_with_score)."""
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter, params=params, **kwargs)]

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter=None, *, params=None, **kwargs
    ) -> list[tuple[Document, float]]:
        """(Document, cosine similarity) of the k memories nearest `query`, best first.

        filter: {metadata key: value} (each equal; None: absent or None), or a SQL condition
        over the columns of `memories` (metadata keys are columns: "page > ? AND lang = 'en'")
        with `params` bound to its ?s."""
        _no_options("similarity_search", kwargs)
        return self._search(self._query(query), k, filter, params)

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter=None, *, params=None, **kwargs
    ) -> list[Document]:
        """The k memories nearest an embedding vector, as Documents."""
        _no_options("similarity_search_by_vector", kwargs)
        return [doc for doc, _ in self._search(_vector(embedding), k, filter, params)]

    def max_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, filter=None, *, params=None, **kw
    ) -> list[Document]:
        """k of the fetch_k memories nearest `query`, chosen for relevance and diversity (MMR)."""
        _no_options("max_marginal_relevance_search", kw)
        query = self._query(query)
        vector = query if not isinstance(query, str) else self.db.embed_query(query)
        return self.max_marginal_relevance_search_by_vector(vector, k, fetch_k, lambda_mult, filter, params=params)

    def max_marginal_relevance_search_by_vector(
        self, embedding, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, filter=None, *, params=None, **kw
    ) -> list[Document]:
        """MMR from an embedding vector: see max_marginal_relevance_search."""
        _no_options("max_marginal_relevance_search_by_vector", kw)
        vector = _vector(embedding)
        matches, documents = self._matches(vector, fetch_k, filter, params)
        if not matches:
            return []
        stored = dict(self.db.sql("SELECT id, embedding FROM memories WHERE id IN (SELECT UNNEST(?))", [matches.ids]))
        chosen = maximal_marginal_relevance(vector, [stored[i] for i in matches.ids], lambda_mult=lambda_mult, k=k)
        return [documents[i] for i in chosen]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        # m3db scores are cosine similarities; LangChain's cosine relevance takes the distance
        return lambda similarity: self._cosine_relevance_score_fn(1.0 - similarity)

    # -- helpers ---------------------------------------------------------------------------

    def _query(self, query):
        """The query as recall takes it: its vector by the Embeddings' embed_query or the m3db
        embedder given, else the text (embedded by the database's own embedder)."""
        if not isinstance(query, str):
            raise InvalidInputError(f"a query is a string, got {type(query).__name__}")
        if isinstance(self._embedder, LangChainEmbedder):
            return self._embedder.embed_query(query)
        return query if self._embedder is None else self._embedder.embed([query])[0]

    def _where(self, filter, params):
        if filter is None:
            if params is not None:
                raise InvalidInputError("params bind the ?s of a SQL filter; pass filter= with them")
            return None, None
        if isinstance(filter, str):
            return filter, params
        if params is not None:
            raise InvalidInputError("a filter dict binds its own values; params go with a SQL filter")
        return where_of(filter, self.db.sql("SELECT * FROM memories LIMIT 0").columns)

    def _matches(self, vector, k, filter, params):
        """(Matches, [Document]) of the k memories nearest `vector` passing the filter."""
        where, params = self._where(filter, params)
        matches = self.db.recall(vector, k, where, params)
        names = self.db.documents_of(matches) if matches else []
        return matches, [
            Document(id=source, page_content=m.text, metadata=metadata_of(m.metadata))
            for m, (source, _) in zip(matches, names)
        ]

    def _search(self, vector, k, filter, params) -> list[tuple[Document, float]]:
        matches, documents = self._matches(vector, k, filter, params)
        return [(doc, m.score) for doc, m in zip(documents, matches)]

    def _documents(self, ids) -> dict[str, Document]:
        """{id: Document} of the stored documents among `ids`, rebuilt from their memories."""
        for i in ids:
            _check_id(i)
        if not ids:
            return {}
        parts = {}
        for source, start, end, text, row in self.db.sql(DOCUMENT_MEMORIES, [ids]):
            parts.setdefault(source, []).append((start, end, text, row))
        found = {}
        for source, memories in parts.items():
            text, last = "", None
            for start, end, piece, _ in memories:
                gap = last is not None and (start is None or last is None or start > last)
                text, last = text + (" " if gap else "") + piece, end
            found[source] = Document(id=source, page_content=text, metadata=metadata_of_row(json.loads(memories[0][3])))
        return found


def _vector(embedding) -> np.ndarray:
    return np.asarray(embedding, dtype=np.float32)


def _check_id(i) -> None:
    if not isinstance(i, str) or not i:
        raise InvalidInputError(f"a document id is a non-empty string, got {i!r}")


def _no_options(verb, kwargs) -> None:
    if kwargs:
        raise InvalidInputError(f"{verb}() takes no option {', '.join(map(repr, sorted(kwargs)))} (docs/langchain.md)")

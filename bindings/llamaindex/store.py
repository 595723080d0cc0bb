"""`M3DBVectorStore`: an m3db database as a LlamaIndex vector store.

Owns the store's verbs over the database's public ones: `add(nodes)` (each node one memory, or
its parts when longer than a reference: nodes.py), `delete(ref_doc_id)` (the document's
memories are forgotten), `delete_nodes`, `clear`, and `query` (`db.recall` with the filters as
its `where`: filters.py). Queries are embedded by the database's own embedder
(`is_embedding_query = False`: LlamaIndex hands over the query text, and m3db embeds it as
`db.recall(text)` and `db.generate` do), so retrieval here and the memories an answer reads
agree. A node's own vector is stored only when it is the database's embedder's (checked on the
first node of every commit, refused otherwise: embedding.py says why); a node without one is
embedded by the database. Memories are encoded when added, or on first read with `cold=True`.

Imports: collections, numpy, m3db, m3db.errors, llama_index.core and this room's filters, nodes, embedding.
"""

import collections

import numpy as np
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)

import m3db
from m3db.errors import InvalidInputError, SpecMismatchError

from .embedding import M3DBEmbedding
from .filters import filter_sql
from .nodes import node_ids_sql, node_of, parts_of

# a node vector whose cosine to the database's own vector for its text is below this came from
# another embedder (the same embedder differs only by float rounding: batching, padding)
SAME_EMBEDDER = 0.99
FIX = (
    "m3db recalls by the database's own embedder (db.generate recalls every 64-token chunk by it), so a node's "
    "vector must be that embedder's: build the index with embed_model=store.embed_model (an M3DBEmbedding), build "
    "the database with your embed model (m3db.connect(path, embedder=LlamaIndexEmbedder(embed_model))), or add "
    "nodes without embeddings and the store embeds them"
)


class M3DBVectorStore(BasePydanticVectorStore):
    """A LlamaIndex vector store over `db`, an m3db Database opened with the model and embedder
    that built it (or that will build it).

    cold: keep new memories as text and vector only, encoded by the model on first read (adding
    costs no decoder pass; docs/knowledge.md). batch_size: nodes per commit when adding.
    """

    stores_text: bool = True
    is_embedding_query: bool = False  # the database embeds query texts itself
    flat_metadata: bool = False  # m3db keeps lists and dicts as JSON columns
    cold: bool = False
    batch_size: int = 16

    def __init__(self, db, *, cold=False, batch_size=16, **kwargs):
        if not isinstance(db, m3db.Database):
            raise InvalidInputError(
                f"M3DBVectorStore takes an m3db Database (m3db.connect(path)), got {type(db).__name__}", option="db"
            )
        if not isinstance(cold, bool):
            raise InvalidInputError(f"cold must be True or False, got {cold!r}", option="cold")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}", option="batch_size")
        super().__init__(cold=cold, batch_size=batch_size, **kwargs)
        self._db = db

    @classmethod
    def class_name(cls) -> str:
        return "M3DBVectorStore"

    @property
    def client(self) -> m3db.Database:
        """The m3db Database."""
        return self._db

    @property
    def embed_model(self) -> M3DBEmbedding:
        """The database's embedder as a LlamaIndex embed model: the one to index with."""
        return M3DBEmbedding(self._db)

    # -- writing -------------------------------------------------------------------------------

    def add(self, nodes, **add_kwargs) -> list[str]:
        """Store `nodes` as memories (a node already stored under the same id is replaced in the
        same commit); return their ids. Commits every `batch_size` nodes."""
        nodes = list(nodes)
        ids = [node.node_id for node in nodes]
        twice = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
        if twice:
            raise InvalidInputError(f"the nodes {twice} appear more than once in one add()", option="nodes")
        if not nodes:
            return []
        model, embedder = self._db.models()
        for start in range(0, len(nodes), self.batch_size):
            batch = nodes[start : start + self.batch_size]
            # the first node vector of each commit is checked against the database's own
            items = self._items(batch, model, embedder, check=True)
            if self.cold:
                for item in items:
                    item["cold"] = True
            else:
                for item, encoded in zip(items, model.encode([item["text"] for item in items])):
                    item.update(keys=encoded["keys"], values=encoded["values"], positions=encoded["positions"])
            self._commit([node.node_id for node in batch], items)
        return ids

    def _items(self, nodes, model, embedder, *, check) -> list[dict]:
        """add_memories items (without arrays) for `nodes`: the node's vector where it is one
        memory and has one, else the database embedder's, computed here in one batch."""
        items, texts = [], []  # texts: what to embed for each item, None where the node's vector serves
        for node in nodes:
            parts = parts_of(node, model.count_tokens, self._db.spec.reference_length)
            own = len(parts) == 1 and node.embedding is not None
            if own and check:
                self._check_vector(node, parts[0].embed_text, embedder)
                check = False
            for part in parts:
                items.append(
                    dict(
                        embedding=node.embedding if own else None,
                        text=part.text,
                        metadata=part.metadata,
                        document=part.document,
                        token_count=part.tokens,
                    )
                )
                texts.append(None if own else part.embed_text)
        todo = [i for i, text in enumerate(texts) if text is not None]
        for i, vector in zip(todo, embedder.embed([texts[i] for i in todo]) if todo else []):
            items[i]["embedding"] = vector
        for item in items:
            item["embedding"] = np.asarray(item["embedding"], dtype=np.float32)
        return items

    def _commit(self, node_ids, items):
        """Forget the memories stored under `node_ids` and add `items`, in one commit."""
        with self._db.transaction():
            where, params = node_ids_sql(node_ids, self._columns())
            stale = [row[0] for row in self._db.sql(f"SELECT id FROM memories WHERE {where}", params)]
            if stale:
                self._db.forget(stale)
            self._db.add_memories(items)

    def _check_vector(self, node, embed_text, embedder):
        """SpecMismatchError unless `node.embedding` is the database's embedder's vector of its text."""
        vector = np.asarray(node.embedding, dtype=np.float32)
        own = embedder.embed([embed_text])[0]
        fingerprint = self._db.spec.embedder_fingerprint
        if vector.shape != own.shape:
            raise SpecMismatchError(
                f"node {node.node_id!r} has a vector of shape {vector.shape}; this database's embedder "
                f"({fingerprint}) gives {own.shape}. {FIX}"
            )
        cosine = float(vector @ own) / float(np.linalg.norm(vector) * np.linalg.norm(own) or 1.0)
        if cosine < SAME_EMBEDDER:
            raise SpecMismatchError(
                f"node {node.node_id!r}'s vector is not from this database's embedder ({fingerprint}): its cosine to "
                f"that embedder's vector of the node's text is {cosine:.3f}. {FIX}"
            )

    def delete(self, ref_doc_id: str, **delete_kwargs) -> None:
        """Forget every memory of the document `ref_doc_id` (the m3db document of that source)."""
        if not isinstance(ref_doc_id, str):
            raise InvalidInputError(f"ref_doc_id must be a string, got {ref_doc_id!r}", option="ref_doc_id")
        self._db.sql(
            "DELETE FROM memories m USING documents d WHERE d.id = m.document_id AND d.source = ?", [ref_doc_id]
        )

    def delete_nodes(self, node_ids=None, filters=None, **delete_kwargs) -> None:
        """Forget the memories of `node_ids` that pass `filters` (either may be left out, not both:
        clear() forgets everything)."""
        if node_ids is None and filters is None:
            raise InvalidInputError("delete_nodes() needs node_ids or filters; clear() forgets every memory")
        where, params = self.where(filters, node_ids=node_ids)
        self._db.sql(f"DELETE FROM memories WHERE {where}", params)

    def clear(self) -> None:
        """Forget every memory of the database."""
        self._db.sql("DELETE FROM memories")

    # -- reading -------------------------------------------------------------------------------

    def query(self, query: VectorStoreQuery, **kwargs) -> VectorStoreQueryResult:
        """The `similarity_top_k` memories nearest the query that pass its filters, as nodes with
        their cosine similarities. The query text is embedded by the database; a query with a
        vector and no text recalls by that vector. node_ids and doc_ids restrict it when not empty."""
        if query.mode != VectorStoreQueryMode.DEFAULT:
            raise InvalidInputError(
                f"the query mode {getattr(query.mode, 'value', query.mode)!r} is not m3db's: it recalls by one dense "
                "vector (mode 'default'); sparse, hybrid, text search, MMR and the learners are not supported",
                option="mode",
            )
        target = query.query_str if isinstance(query.query_str, str) and query.query_str.strip() else None
        if target is None and query.query_embedding is None:
            raise InvalidInputError("a query needs query_str or query_embedding", option="query")
        if target is None:
            target = np.asarray(query.query_embedding, dtype=np.float32)
        # an empty list restricts nothing: VectorStoreIndex passes node_ids=[] when the store keeps the text
        where, params = self.where(query.filters, node_ids=query.node_ids or None, doc_ids=query.doc_ids or None)
        matches = self._db.recall(target, k=query.similarity_top_k, where=where, params=params)
        nodes = self.nodes_of(matches)
        return VectorStoreQueryResult(
            nodes=nodes, similarities=[m.score for m in matches], ids=[node.node_id for node in nodes]
        )

    def nodes_of(self, matches) -> list:
        """Recalled memories (m3db Matches) as TextNodes, their documents as SOURCE relationships."""
        documents = self._db.documents_of(matches) if matches else []
        return [node_of(m, source) for m, (source, _) in zip(matches, documents)]

    def where(self, filters=None, *, node_ids=None, doc_ids=None) -> tuple[str | None, list | None]:
        """(where, params) for db.recall, db.generate or a DELETE: LlamaIndex `filters`
        (MetadataFilters), node ids and document ids, all of which must hold; (None, None) for none."""
        columns = self._columns()
        conditions = []
        if filters is not None:
            if not isinstance(filters, MetadataFilters):
                raise InvalidInputError(
                    f"filters must be LlamaIndex MetadataFilters, got {type(filters).__name__}", option="filters"
                )
            conditions.append(filter_sql(filters, columns))
        if node_ids is not None:
            conditions.append(node_ids_sql(node_ids, columns))
        if doc_ids is not None:
            documents = MetadataFilter(key="ref_doc_id", operator=FilterOperator.IN, value=list(doc_ids))
            conditions.append(filter_sql(MetadataFilters(filters=[documents]), columns))
        if not conditions:
            return None, None
        return " AND ".join(sql for sql, _ in conditions), [p for _, values in conditions for p in values]

    def _columns(self) -> dict:
        """{lower-case name: (name, DuckDB type)} of the columns of `memories`, metadata included."""
        rows = self._db.sql(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'memories'"
        )
        return {name.lower(): (name, sql_type) for name, sql_type in rows}

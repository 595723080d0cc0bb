"""m3db.bindings.llamaindex: an m3db knowledge base in LlamaIndex (`pip install 'm3db[llamaindex]'`;
docs/llamaindex.md).

    import m3db
    from llama_index.core import VectorStoreIndex
    from m3db.bindings.llamaindex import M3DBQueryEngine, M3DBVectorStore

    db = m3db.connect("kb.m3db")
    store = M3DBVectorStore(db)
    index = VectorStoreIndex.from_vector_store(store, embed_model=store.embed_model)
    nodes = index.as_retriever(similarity_top_k=3).retrieve("capital of France")
    print(M3DBQueryEngine(vector_store=store).query("What is the capital of France?"))

The rooms: `store` (`M3DBVectorStore`: add, delete, delete_nodes, clear, query), `nodes` (a node
as memories, a memory as a node), `filters` (MetadataFilters as m3db's `where`), `embedding`
(`M3DBEmbedding`: the database's embedder as an embed model; `LlamaIndexEmbedder`: an embed
model as the database's embedder), `query_engine` (`M3DBQueryEngine`:
answers through `db.generate`, the engine's one answer road).

Imports: this package re-exports only, once llama-index-core is importable.
"""

from m3db.errors import DependencyError

try:  # the extra's one dependency; every module of this room builds on it
    import llama_index.core  # noqa: F401
except ImportError as e:
    raise DependencyError(
        f"m3db.bindings.llamaindex needs the llamaindex extra ({e}): pip install 'm3db[llamaindex]'"
    ) from e

from .embedding import LlamaIndexEmbedder, M3DBEmbedding  # noqa: E402
from .filters import filter_sql  # noqa: E402
from .query_engine import M3DBQueryEngine  # noqa: E402
from .store import M3DBVectorStore  # noqa: E402

__all__ = ["LlamaIndexEmbedder", "M3DBEmbedding", "M3DBQueryEngine", "M3DBVectorStore", "filter_sql"]

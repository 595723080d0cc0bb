"""m3db.bindings.langchain: an m3db knowledge base in LangChain (`pip install 'm3db[langchain]'`;
docs/langchain.md).

    from m3db.bindings.langchain import ChatM3DB, M3DBVectorStore
    store = M3DBVectorStore("kb.m3db", embedding=OpenAIEmbeddings(model="text-embedding-3-small"))
    store.add_texts(["Paris is the capital of France."], [{"lang": "en"}])
    store.as_retriever(search_kwargs={"k": 3, "filter": {"lang": "en"}}).invoke("capital of France?")
    ChatM3DB(db=store.db).invoke("What is the capital of France?").response_metadata["sources"]

The rooms: `vectorstore.py` (`M3DBVectorStore`, a LangChain VectorStore over a database),
`chat_model.py` (`ChatM3DB`, a chat model answering through db.generate), `embedder.py`
(`LangChainEmbedder`, a LangChain Embeddings as m3db's embedder), `metadata.py` (a
Document's metadata as columns, and filters), `dependency.py` (langchain-core, or a
DependencyError naming the extra).

Imports: this package re-exports only (dependency first: without LangChain, importing this
package is a DependencyError).
"""

from .dependency import INSTALL  # isort: split

from .chat_model import ChatM3DB
from .embedder import LangChainEmbedder
from .vectorstore import M3DBVectorStore

__all__ = ["ChatM3DB", "INSTALL", "LangChainEmbedder", "M3DBVectorStore"]

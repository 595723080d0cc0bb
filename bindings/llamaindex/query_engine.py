"""`M3DBQueryEngine`: a LlamaIndex query engine whose answer is `db.generate`'s.

The decoder reads the knowledge base itself (explicit memories recalled per 64-token chunk, or
their text with memory="rag"), so there is no retrieve-then-synthesize step and no LLM to
configure: the question goes to `db.generate`, the engine's one answer road, and the response is
its text, with its sources (every memory the answer read, in order of first use) as source
nodes. A LlamaIndex app therefore gets the answer and the sources that `db.generate`, SQL's
generate(), `m3db ask` and the server give for the same question. A source node's score is its
cosine similarity to the question (the decoder recalled by its chunks, which have no one score).

Imports: llama_index.core, pydantic (LlamaIndex's own) and this room's store; the database is the store's.
"""

from typing import Optional, Union

from llama_index.core.base.response.schema import Response
from llama_index.core.bridge.pydantic import Field, StrictInt, StrictStr
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore
from llama_index.core.vector_stores.types import MetadataFilters
from pydantic import StrictBool

from .store import M3DBVectorStore


class M3DBQueryEngine(CustomQueryEngine):
    """Answers questions over `vector_store`'s database through `db.generate`.

    memory: True/"memory" (read explicit memories), "rag" (their text in the prompt) or
    False/"none". k: memories per chunk (None: the model's). filters: LlamaIndex MetadataFilters,
    the recall filter. max_tokens and generate_kwargs (temperature, top_p, seed, stop_tokens):
    as db.generate takes them. Response.metadata holds "finish_reason", "mode" and "sources"
    (m3db Sources: id, text, document, title).
    """

    vector_store: M3DBVectorStore
    memory: Union[StrictBool, StrictStr] = True
    k: Optional[StrictInt] = None
    filters: Optional[MetadataFilters] = None
    max_tokens: StrictInt = 128
    generate_kwargs: dict = Field(default_factory=dict)

    def custom_query(self, query_str: str) -> Response:
        store = self.vector_store
        db = store.client
        where, params = store.where(self.filters)
        answer = db.generate(
            query_str,
            memory=self.memory,
            k=self.k,
            where=where,
            params=params,
            max_tokens=self.max_tokens,
            **self.generate_kwargs,
        )
        nodes = []
        if answer.sources:
            ids = [s.id for s in answer.sources]
            # the same memories again, by id, for their metadata and their similarity to the question
            matches = db.recall(query_str, k=len(ids), where=f"id IN ({', '.join('?' * len(ids))})", params=ids)
            found = {m.id: (m, node) for m, node in zip(matches, store.nodes_of(matches))}
            nodes = [NodeWithScore(node=found[i][1], score=found[i][0].score) for i in ids if i in found]
        return Response(
            response=answer.text,
            source_nodes=nodes,
            metadata={"finish_reason": answer.finish_reason, "mode": answer.mode, "sources": answer.sources},
        )

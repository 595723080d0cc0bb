"""Embedders across the boundary, both ways: `M3DBEmbedding` (a database's embedder as a LlamaIndex
embed model) and `LlamaIndexEmbedder` (a LlamaIndex embed model as m3db's embedder).

m3db recalls by one embedder, the database's (fixed when it was built: `db.spec`'s
`embedder_fingerprint`); `db.generate` recalls every 64-token chunk by it. A node's vector is
only worth storing when it comes from that embedder. So either the index embeds with the
database's (`VectorStoreIndex.from_vector_store(store, embed_model=store.embed_model)`), or the
database is built with the app's embed model (`m3db.connect(path,
embedder=LlamaIndexEmbedder(embed_model))`) and the index keeps using it. m3db's embedders are
symmetric: a query is embedded as a text is (`get_text_embedding`).

Imports: numpy, m3db.errors, llama_index.core; the database arrives as an argument.
"""

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import PrivateAttr

from m3db.errors import InvalidInputError


class M3DBEmbedding(BaseEmbedding):
    """The embedder of `db` (an m3db Database) as a LlamaIndex embed model; its `model_name` is
    the embedder's fingerprint."""

    _db: object = PrivateAttr()

    def __init__(self, db, **kwargs):
        super().__init__(model_name=db.spec.embedder_fingerprint, **kwargs)
        self._db = db

    @classmethod
    def class_name(cls) -> str:
        return "M3DBEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._db.embed_query(query).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._db.embed_query(text).tolist()


class LlamaIndexEmbedder:
    """`embed_model` (a LlamaIndex BaseEmbedding) as an m3db Embedder (`dim`, `fingerprint`,
    `embed`), for `m3db.connect(path, embedder=...)`. The fingerprint, which a database records
    and checks on every open, is `llamaindex:<module>.<class>:<model_name>`; `dim`, unless
    given, is measured from one embedding here, since connect() reads it at once."""

    def __init__(self, embed_model, *, dim=None):
        if not isinstance(embed_model, BaseEmbedding):
            raise InvalidInputError(
                f"embed_model must be a LlamaIndex BaseEmbedding, got {type(embed_model).__name__}", option="embedder"
            )
        cls = type(embed_model)
        self.embed_model = embed_model
        self.fingerprint = f"llamaindex:{cls.__module__}.{cls.__qualname__}:{embed_model.model_name}"
        self.dim = (
            len(embed_model.get_text_embedding("How many dimensions has this embedding?")) if dim is None else dim
        )
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise InvalidInputError(f"dim must be a positive integer, got {self.dim!r}", option="dim")

    def embed(self, texts) -> np.ndarray:
        """(len(texts), dim) float32: the texts' vectors (`get_text_embedding_batch`)."""
        texts = list(texts)
        vectors = np.asarray(self.embed_model.get_text_embedding_batch(texts), dtype=np.float32)
        if vectors.shape == (len(texts), self.dim):
            return vectors
        raise InvalidInputError(
            f"{type(self.embed_model).__name__} gave vectors of shape {vectors.shape} for {len(texts)} texts of "
            f"{self.dim} dimensions"
        )

    def __repr__(self):
        return f"<LlamaIndexEmbedder {self.fingerprint!r}>"

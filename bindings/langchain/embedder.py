"""A LangChain `Embeddings` as m3db's embedder: the `Embedder` protocol (`dim`, `fingerprint`,
`embed(texts)`, m3db.extend.Embedder) over `embed_documents`, plus `embed_query` for the
vector store's queries (models such as E5 embed a query unlike a passage).

A database records its embedder's fingerprint and dimension and refuses another one on open,
so the fingerprint must name the embedding model, not only its class: it is
`langchain:<module>.<class>:<name>`, where `name` is the caller's stable identifier, by default
the Embeddings' `model` / `model_name` / `model_id` attribute (what OpenAIEmbeddings,
HuggingFaceEmbeddings, OllamaEmbeddings and BedrockEmbeddings call the model).

Imports: numpy, m3db.errors and langchain_core.
"""

import numpy as np
from langchain_core.embeddings import Embeddings

from m3db.errors import InvalidInputError

# the attributes LangChain's Embeddings classes name their model by, in the order tried
MODEL_ATTRIBUTES = ("model", "model_name", "model_id")


class LangChainEmbedder:
    """`embeddings` (a LangChain Embeddings) as an m3db Embedder.

    name: a stable identifier of the embedding model, recorded in the database's fingerprint
    (default: the Embeddings' model attribute, else none: only the class is recorded, so two
    models of one class without a model attribute would pass for each other; name them).
    dim: the vector size; by default measured from one embedding, on first use.
    """

    def __init__(self, embeddings: Embeddings, *, name: str | None = None, dim: int | None = None):
        if not isinstance(embeddings, Embeddings):
            raise InvalidInputError(
                f"embedding must be a LangChain Embeddings (langchain_core.embeddings.Embeddings), got "
                f"{type(embeddings).__name__}"
            )
        if name is None:
            name = next((v for v in (getattr(embeddings, a, None) for a in MODEL_ATTRIBUTES) if isinstance(v, str)), "")
        if not isinstance(name, str):
            raise InvalidInputError(f"name must be a string identifying the embedding model, got {name!r}")
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
            raise InvalidInputError(f"dim must be a positive integer, got {dim!r}")
        self.embeddings = embeddings
        cls = type(embeddings)
        self.fingerprint = f"langchain:{cls.__module__}.{cls.__qualname__}:{name}"
        self._dim = dim

    @property
    def dim(self) -> int:
        """The vector size: given, or measured from one embedding (once)."""
        if self._dim is None:
            self._dim = len(self.embeddings.embed_query("How many dimensions has this embedding?"))
        return self._dim

    def embed(self, texts) -> np.ndarray:
        """(len(texts), dim) float32: the passages' vectors (`embed_documents`)."""
        return self._checked(self.embeddings.embed_documents(list(texts)), len(texts), "embed_documents")

    def embed_query(self, text: str) -> np.ndarray:
        """(dim,) float32: a query's vector (`embed_query`)."""
        return self._checked([self.embeddings.embed_query(text)], 1, "embed_query")[0]

    def _checked(self, vectors, n, verb) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.shape != (n, self.dim):
            raise InvalidInputError(
                f"{type(self.embeddings).__name__}.{verb} returned vectors of shape {v.shape}; "
                f"expected ({n}, {self.dim})"
            )
        return v

    def __repr__(self):
        return f"<LangChainEmbedder {self.fingerprint!r}>"

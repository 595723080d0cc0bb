"""The two interfaces through which the engine reaches a model, so `import m3db` never imports torch.

- a `MemoryModel` (m3db.model.MemoryModel is the bundled one): `memory_spec_fields()`,
  `count_tokens(text)`, `encode(texts) -> [{positions, keys, values, token_count}]`,
  `generate(prompt, retriever=..., mode=..., **sampling)`;
- an `Embedder` (m3db.model.embedder.Embedder): `dim`, `fingerprint`, `embed(texts)`.
Imports nothing of m3db.
"""

from typing import Protocol

import numpy as np


class MemoryModel(Protocol):
    def memory_spec_fields(self) -> dict: ...
    def count_tokens(self, text: str) -> int: ...
    def encode(self, texts: list) -> list: ...
    def generate(self, prompt, *, retriever=None, mode="memory", **sampling) -> object: ...


class Embedder(Protocol):
    dim: int
    fingerprint: str

    def embed(self, texts: list) -> np.ndarray: ...


def spec_fields(model: MemoryModel, embedder: Embedder, codec: str) -> dict:
    """The memory spec (as MemorySpec's fields) of a database bound to `model` and `embedder`."""
    return dict(
        model.memory_spec_fields(), embedding_dim=embedder.dim, embedder_fingerprint=embedder.fingerprint, codec=codec
    )

"""Helpers for tests of code built on m3db: a model-free embedder and small memories.

`HashEmbedder` is a real, deterministic Embedder (feature hashing of words and word bigrams),
far weaker than a sentence embedder but needing no weights; `small_spec()` and
`random_memory()` make a database of precomputed memories without any model:

    from m3db.testing import HashEmbedder, random_memory, small_spec
    db = m3db.connect(":memory:", spec=small_spec())
    db.add_memory(**random_memory(db.spec, "Paris is the capital of France."))

Imports: the storage layer's MemorySpec only.
"""

import hashlib
import re

import numpy as np

from .storage.spec import MemorySpec

DIM = 256


def hashed_embedding(text, dim=DIM) -> np.ndarray:
    """Feature hashing of lowercase words and word bigrams (signed), L2-normalised."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    v = np.zeros(dim, np.float32)
    for g in grams:
        h = int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
        v[h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    n = np.linalg.norm(v)
    return v / n if n else np.full(dim, 1 / np.sqrt(dim), np.float32)


class HashEmbedder:
    """`hashed_embedding` as an Embedder (m3db.knowledge.protocols): no model, for tests and demos."""

    dim, fingerprint = DIM, f"feature-hashing-{DIM}"

    def embed(self, texts) -> np.ndarray:
        return np.stack([hashed_embedding(t) for t in texts])


def small_spec(*, codec="int8") -> MemorySpec:
    """A memory spec of SmolLM2's shape in the sparse mode (15 layers, 3 KV heads of 64, 8 tokens
    per head) with HashEmbedder's vectors, for databases of precomputed memories."""
    return MemorySpec(
        model_fingerprint="test-random-kv",
        memory_layers=range(15),
        kv_heads=3,
        head_dim=64,
        tokens_per_head=8,
        embedding_dim=DIM,
        embedder_fingerprint=HashEmbedder.fingerprint,
        codec=codec,
    )


def random_memory(spec, text, *, seed=0, **fields) -> dict[str, object]:
    """add_memory()'s arguments for `text`: random keys and values of the spec's shape, positions
    0..n-1, and the text's hashed embedding; `fields` (metadata=, document=, ...) pass through."""
    rng = np.random.default_rng(seed)
    shape = (spec.layers, spec.kv_heads, spec.tokens_per_head, spec.head_dim)
    positions = np.tile(np.arange(spec.tokens_per_head, dtype=np.uint8), (spec.layers, spec.kv_heads, 1))
    return dict(
        keys=rng.standard_normal(shape).astype(np.float32),
        values=rng.standard_normal(shape).astype(np.float32),
        positions=positions,
        embedding=hashed_embedding(text, spec.embedding_dim),
        text=text,
        **fields,
    )

"""The engine demo: build a small database, recall from it with and without a filter, check it.

    python -m m3db.demo [PATH]

What is real here: the storage engine end to end (records, codec, segments, DuckDB catalog,
USearch index, commit, recall planning, check). What is not yet: the memories' keys and
values are random arrays of the SmolLM2 memory shape, because the bundled decoder that
encodes real memories is not joined to the engine yet, and the retrieval vectors come from
a feature-hashing bag-of-words embedder defined below (real, deterministic, but far weaker
than a sentence embedder). Both are said again in the output.
"""

import hashlib
import os
import re
import sys
import tempfile
import time

import numpy as np

from .database import connect
from .spec import MemorySpec

FACTS = [
    ("Paris is the capital and largest city of France, on the river Seine.", "geography", "Europe"),
    ("Tokyo is the capital of Japan and one of the most populous cities in the world.", "geography", "Asia"),
    ("Canberra is the capital city of Australia, chosen as a compromise between Sydney and Melbourne.", "geography", "Oceania"),
    ("Nairobi is the capital of Kenya and a centre of East African business.", "geography", "Africa"),
    ("Ottawa is the capital of Canada, in the province of Ontario.", "geography", "Americas"),
    ("Brasilia became the capital of Brazil in 1960, replacing Rio de Janeiro.", "geography", "Americas"),
    ("The Danube flows through ten countries, more than any other river in the world.", "geography", "Europe"),
    ("Water boils at 100 degrees Celsius at sea level.", "science", None),
    ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.", "science", None),
    ("The speed of light in vacuum is about 299,792 kilometres per second.", "science", None),
    ("DNA carries genetic information as a sequence of four bases.", "science", None),
    ("The Great Wall of China was built over many centuries to protect northern borders.", "history", "Asia"),
    ("The printing press was developed by Johannes Gutenberg around 1440.", "history", "Europe"),
    ("The Roman Empire was divided into eastern and western halves in 395.", "history", "Europe"),
]
QUESTION = "What is the capital city of Japan?"
DIM = 256


def hashed_embedding(text, dim=DIM):
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
    """`hashed_embedding` as an Embedder (m3db.knowledge): no model, for tests and demos."""

    dim, fingerprint = DIM, f"feature-hashing-{DIM}"

    def embed(self, texts):
        return np.stack([hashed_embedding(t) for t in texts])


def demo_spec():
    return MemorySpec(
        model_fingerprint="demo-random-kv", memory_layers=range(15), kv_heads=3, head_dim=64,
        tokens_per_head=8, embedding_dim=DIM, embedder_fingerprint="feature-hashing-256", codec="int8",
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.path.join(tempfile.mkdtemp(prefix="m3db-demo-"), "demo.m3db")
    print(f"m3db engine demo: building {path}")
    print("  (memories hold random KV of SmolLM2's memory shape, and vectors come from a feature-hashing")
    print("   embedder: the decoder and the sentence embedder are not joined to the engine yet)")
    spec = demo_spec()
    rng = np.random.default_rng(0)
    shape = (spec.layers, spec.kv_heads, spec.tokens_per_head, spec.head_dim)
    t = time.perf_counter()
    with connect(path, spec=spec) as db:
        if len(db) == 0:
            items = []
            for i, (text, topic, region) in enumerate(FACTS):
                items.append(dict(
                    keys=rng.standard_normal(shape).astype(np.float32),
                    values=rng.standard_normal(shape).astype(np.float32),
                    positions=np.tile(np.arange(spec.tokens_per_head, dtype=np.uint8), (spec.layers, spec.kv_heads, 1)),
                    embedding=hashed_embedding(text), text=text, document=f"demo/{topic}", ordinal=i,
                    metadata={"topic": topic, "region": region},
                ))
            db.add_memories(items)
        print(f"  {len(db)} memories committed in {time.perf_counter() - t:.2f} s")
        print(f"\nrecall: {QUESTION!r}")
        for m in db.recall(hashed_embedding(QUESTION), k=3):
            print(f"  {m.score:.3f}  #{m.id}  {m.text}")
        where = "topic = 'history' AND region = 'Europe'"
        print(f"\nrecall with a filter: {where}")
        matches = db.recall(hashed_embedding("When was the printing press invented?"), k=2, where=where, decode=True)
        for m in matches:
            print(f"  {m.score:.3f}  #{m.id}  {m.text}  keys {m.memory.keys.shape} {m.memory.keys.dtype}")
        print(f"  plan: {matches.plan}")
        print("\nSQL: SELECT topic, count(*) FROM memories GROUP BY topic")
        for row in db.sql("SELECT topic, count(*) FROM memories GROUP BY topic ORDER BY topic"):
            print(f"  {row[0]:<10} {row[1]}")
        report = db.check()
        print(f"\ncheck: ok={report.ok}, {report.checked} memories verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The texts a pq codebook is trained on when bench/heldout.py or bench/train_reader.py train one
away from the memories they read (`--pq-train other`, `--codec pq:K/V`).

Half invented entries of the reading-practice families (`model/train_entries.py`: 14 families,
none of bench/heldout.py's six, other syllables), half the first chunk of Wikipedia summaries
(ingest's chunker, at most `max_tokens` tokens), in a seeded order: what a knowledge base of
short encyclopedic references holds, and nothing of the held-out bench's entries, so a codebook
trained on it meets the bench's memories as it meets a new document.
"""

from __future__ import annotations

import random

from m3db.knowledge import sources
from m3db.knowledge.chunk import chunk_text
from m3db.model import train_entries


def codec_sample(n: int, count_tokens, *, seed: int = 0, max_tokens: int = 128) -> list[str]:
    """`n` reference texts (seeded): n // 2 invented entries, the rest Wikipedia chunks."""
    rng = random.Random(seed)
    families = sorted(train_entries.FAMILIES)
    texts = [train_entries.entry(families[i % len(families)], rng)[1] for i in range(n // 2)]
    wiki = sources.wikipedia()
    rng.shuffle(wiki)
    for doc in wiki:
        if len(texts) >= n:
            break
        chunks = chunk_text(doc["text"], count_tokens, max_tokens)
        if chunks and chunks[0].text not in texts:
            texts.append(chunks[0].text)
    return texts

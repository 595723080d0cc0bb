"""Chunking: token limits hold, cuts fall at sentence boundaries, spans are exact substrings."""

import random

import pytest

from m3db.knowledge.chunk import chunk_text, split_sentences


def words(text):
    """A stand-in token counter with BPE-like behaviour: a token per 4 characters of a word."""
    return sum((len(w) + 3) // 4 for w in text.split()) + text.count(" ") // 8


def check(text, chunks, limit, count=words):
    assert chunks, "non-empty text gives at least one chunk"
    for c in chunks:
        assert text[c.start : c.end] == c.text and c.text == c.text.strip() and c.text
        assert c.tokens == count(c.text) <= limit
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    starts = [c.start for c in chunks]
    assert starts == sorted(starts)
    # nothing is dropped: every non-space character is in some chunk
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_sentences_kept_whole_when_they_fit():
    text = "Paris is in France. Berlin is in Germany! Is Rome in Italy? Yes.\nMadrid is in Spain."
    chunks = chunk_text(text, words, max_tokens=12)
    check(text, chunks, 12)
    for c in chunks:  # every cut is at a sentence end
        assert c.text[-1] in ".!?" or c.end == len(text)


def test_long_sentence_splits_at_whitespace():
    text = " ".join(f"word{i}" for i in range(200)) + "."
    chunks = chunk_text(text, words, max_tokens=20)
    check(text, chunks, 20)
    assert len(chunks) > 5 and all(not c.text[0].isspace() for c in chunks)


def test_text_without_spaces_splits_inside():
    text = "東京は日本の首都です" * 50
    count = lambda t: len(t)  # noqa: E731  one token per character
    chunks = chunk_text(text, count, max_tokens=30)
    check(text, chunks, 30, count)


def test_cjk_sentence_ends():
    assert len(split_sentences("東京は首都です。大阪は都市です。")) == 2


@pytest.mark.parametrize("seed", range(20))
def test_random_documents(seed):
    rng = random.Random(seed)
    vocab = ["a", "the", "memory", "supercalifragilistic", "x" * 50, "日本語", "end.", "why?", "\n", "  "]
    text = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 400)))
    if not text.strip():
        assert chunk_text(text, words) == []
        return
    limit = rng.choice([3, 8, 32, 128])
    check(text, chunk_text(text, words, max_tokens=limit), limit)


def test_empty_and_bad_input():
    assert chunk_text("", words) == [] and chunk_text("  \n ", words) == []
    with pytest.raises(TypeError):
        chunk_text(b"bytes", words)

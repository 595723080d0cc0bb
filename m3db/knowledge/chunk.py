"""Chunking: a document becomes references of at most `max_tokens` decoder tokens.

Cuts fall at sentence boundaries where possible, else at whitespace, else inside a word
(text without spaces, such as Chinese or Japanese, or one enormous token run). Each chunk is
an exact substring of the document, with its character span, so a user can see where a
memory came from. Token counts come from the caller's tokenizer (`count_tokens`), and every
chunk is counted as a whole (BPE merges across a boundary can change the sum of the parts).
The engine knows nothing about the tokenizer beyond that callable.
"""

import dataclasses
import re

# a sentence ends at . ! ? (or their CJK forms, or a line break), followed by space or the end
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])[\"')\]»”’]*\s+|(?<=[。！？])|\n\s*")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One reference: `text` is document[start:end]; `tokens` its decoder token count."""

    text: str
    start: int
    end: int
    tokens: int
    ordinal: int


def split_sentences(text) -> list[tuple[int, int]]:
    """[(start, end)] spans of sentences (trailing whitespace excluded)."""
    spans, pos = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > pos:
            spans.append((pos, m.start() if m.start() > pos else m.end()))
            pos = m.end()
    if pos < len(text):
        spans.append((pos, len(text)))
    return [(a, b) for a, b in (_strip(text, a, b) for a, b in spans) if b > a]


def chunk_text(text, count_tokens, max_tokens=128) -> list[Chunk]:
    """Split `text` into Chunks of at most `max_tokens` tokens each."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    pieces = []
    for a, b in split_sentences(text):
        pieces.extend(_fit(text, a, b, count_tokens, max_tokens))
    chunks, cur = [], None
    for a, b in pieces:
        if cur is not None:
            merged = _strip(text, cur[0], b)
            n = count_tokens(text[merged[0] : merged[1]])
            if n <= max_tokens:
                cur = (merged[0], merged[1], n)
                continue
            chunks.append(cur)
        cur = (a, b, count_tokens(text[a:b]))
    if cur is not None:
        chunks.append(cur)
    return [Chunk(text[a:b], a, b, n, i) for i, (a, b, n) in enumerate(chunks)]


def _fit(text, a, b, count_tokens, max_tokens):
    """Split the span [a, b) into spans of <= max_tokens: at whitespace, else by characters."""
    if count_tokens(text[a:b]) <= max_tokens:
        return [(a, b)]
    words = [(m.start() + a, m.end() + a) for m in re.finditer(r"\S+", text[a:b])]
    if len(words) > 1:
        out, cur = [], None
        for wa, wb in words:
            for pa, pb in (
                _fit(text, wa, wb, count_tokens, max_tokens) if count_tokens(text[wa:wb]) > max_tokens else [(wa, wb)]
            ):
                if cur is not None and count_tokens(text[cur[0] : pb]) <= max_tokens:
                    cur = (cur[0], pb)
                else:
                    if cur is not None:
                        out.append(cur)
                    cur = (pa, pb)
        out.append(cur)
        return out
    # one run without whitespace: the longest prefix that fits, by binary search
    out = []
    while a < b:
        lo, hi = a + 1, b
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(text[a:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append((a, lo))
        a = lo
    return out


def _strip(text, a, b):
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b

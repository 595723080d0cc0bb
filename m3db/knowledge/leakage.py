"""The leakage filter: drop a retrieved reference that mostly repeats the question.

Memory³'s evaluation hygiene: a retrieved reference whose longest common subsequence with
the question covers more than 2/3 of the reference is dropped, so that a benchmark question
that sits in the knowledge base (or a reference that is little more than the question) cannot
be answered by copying it back.

    overlap(question, reference) = LCS(question words, reference words) / reference words

Units are **words**: maximal runs of Unicode letters, digits and underscores (`\\w+`),
casefolded. Not decoder tokens, because the filter belongs to the engine, which does not know
the model's tokenizer, and a word count gives the same answer for every model reading the
same knowledge base; the paper's own tokenizer is not ours anyway. Punctuation and spacing
are not words, so reformatting a sentence does not change its overlap. A reference with no
words overlaps nothing (0.0): there is nothing in it to leak.

Pure Python. The LCS length is computed with the bit-parallel algorithm (Allison and Dix
1986; Hyyrö 2004), one big-integer step per reference word, so a pair of a 40-word question
and a 128-word reference costs microseconds, and thousands of pairs cost milliseconds.
Must not import the model or the database.
"""

import re

LIMIT = 2 / 3  # the paper's threshold
_WORD = re.compile(r"\w+")


def words(text) -> list[str]:
    """The words the filter compares: `\\w+` runs, casefolded (so "Straße" meets "STRASSE")."""
    return _WORD.findall(text.casefold())


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of sequences a and b (any hashable items).

    Bit-parallel: bit i of `s` is 0 where the LCS of a[:i+1] and the prefix of b read so far
    grows; each item of b updates all of a's positions at once with big-integer arithmetic.
    """
    if not a or not b:
        return 0
    masks = {}
    for i, item in enumerate(a):
        masks[item] = masks.get(item, 0) | (1 << i)
    full = (1 << len(a)) - 1
    s = full
    for item in b:
        m = masks.get(item)
        if m is None:
            continue
        u = s & m
        s = ((s + u) | (s - u)) & full
    return len(a) - bin(s).count("1")


def overlap(question, reference) -> float:
    """LCS(question, reference) / len(reference), counted in words (see the module docstring).

    0.0 when the reference has no words; at most 1.0.
    """
    ref = words(reference)
    if not ref:
        return 0.0
    return lcs_length(words(question), ref) / len(ref)


def leaks(question, reference, limit=LIMIT) -> bool:
    """True when the reference overlaps the question by more than `limit` (paper: 2/3)."""
    return overlap(question, reference) > limit

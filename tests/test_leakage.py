"""The leakage filter: LCS over words / reference words, dropped above 2/3."""

import random
import time

import pytest

from m3db.knowledge.leakage import LIMIT, lcs_length, leaks, overlap, words


def lcs_dp(a, b):
    """Textbook O(len(a) * len(b)) dynamic programme: the oracle for the bit-parallel LCS."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@pytest.mark.parametrize(
    "a, b, n",
    [
        ("ABCBDAB", "BDCABA", 4),  # the CLRS example (BCBA)
        ("AGGTAB", "GXTXAYB", 4),  # GTAB
        ("abc", "abc", 3),
        ("abc", "cba", 1),
        ("abc", "xyz", 0),
        ("aaaa", "aa", 2),
        ("", "abc", 0),
        ("abc", "", 0),
    ],
)
def test_lcs_hand_computed(a, b, n):
    assert lcs_length(list(a), list(b)) == n
    assert lcs_length(list(b), list(a)) == n


def test_lcs_matches_dynamic_programme():
    rng = random.Random(7)
    for _ in range(500):
        alphabet = "abcd"[: rng.randint(1, 4)]  # small alphabets: many repeats, many ties
        a = [rng.choice(alphabet) for _ in range(rng.randint(0, 70))]
        b = [rng.choice(alphabet) for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == lcs_dp(a, b), (a, b)


def test_words_are_casefolded_word_runs():
    assert words("The cat, the HAT!") == ["the", "cat", "the", "hat"]
    assert words("Straße") == words("STRASSE") == ["strasse"]
    assert words("Ça va? Привет, мир 42") == ["ça", "va", "привет", "мир", "42"]
    assert words("東京は日本の首都") == ["東京は日本の首都"]  # no spaces: one \w run
    assert words("  ...  ") == []


def test_overlap_hand_computed():
    # reference words: paris is the capital of france (6); common subsequence with the
    # question "what is the capital of france": is the capital of france (5)
    assert overlap("What is the capital of France?", "Paris is the capital of France.") == pytest.approx(5 / 6)
    # the denominator is the reference, not the question: a long reference dilutes it
    ref = "Paris is the capital of France. " + "It lies on the Seine and has many museums. " * 3
    assert overlap("What is the capital of France?", ref) == pytest.approx(5 / len(words(ref)))
    # order matters (a subsequence, not a bag of words)
    assert overlap("france of capital the", "the capital of france") == pytest.approx(1 / 4)
    # punctuation and case do not count
    assert overlap("THE CAPITAL -- OF FRANCE", "the capital of france") == 1.0


def test_leaks_threshold_is_strictly_more_than_two_thirds():
    ref = "one two three"
    assert overlap("one two", ref) == pytest.approx(2 / 3)
    assert not leaks("one two", ref)  # exactly 2/3 is kept
    assert leaks("one two three", ref)
    assert not leaks("one", ref)
    assert leaks("one two", ref, limit=0.5)
    assert LIMIT == pytest.approx(2 / 3)


def test_unicode():
    assert overlap("Wo liegt die Straße?", "Die STRASSE liegt") == pytest.approx(2 / 3)  # die ... strasse
    assert overlap("Где столица России?", "Москва — столица России") == pytest.approx(2 / 3)
    assert leaks("Где столица России?", "столица России")
    assert overlap("emoji 🙂 only", "🙂") == 0.0  # an emoji is not a word: the reference has none


def test_empty_strings():
    assert overlap("", "") == 0.0
    assert overlap("", "Paris is the capital of France.") == 0.0
    assert overlap("What is the capital of France?", "") == 0.0
    assert overlap("anything", "!!! ...") == 0.0
    assert not leaks("", "")


def test_fast_enough_for_thousands_of_pairs():
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(300)]
    pairs = [(" ".join(rng.choices(vocab, k=40)), " ".join(rng.choices(vocab, k=128))) for _ in range(3000)]
    t = time.perf_counter()
    for q, r in pairs:
        overlap(q, r)
    # measured 0.1 s here (the textbook DP above: 2.5 s); the bound leaves 10x for a loaded
    # machine and still catches a slide back into a quadratic Python loop
    assert time.perf_counter() - t < 1.0

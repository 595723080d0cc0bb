"""Answer.timings: where a generation's time went (recall and its parts, prefill, the first
token, decode), measured inside the one generation path, adding up to the wall time."""

import time

import pytest

import m3db
from m3db.model.memory_model import MemoryModel
from m3db.testing import HashEmbedder

QUESTION = "What colour is thing 3? " * 6


@pytest.fixture(scope="module")
def db():
    with m3db.connect(":memory:", model=MemoryModel.tiny(seed=0, std=0.3), embedder=HashEmbedder()) as db:
        db.add_documents(
            [{"text": f"Fact {i}: the thing {i} is blue. " * 5, "source": f"s{i}"} for i in range(12)], progress=False
        )
        db.generate(QUESTION, max_tokens=4)  # the first call's one-time costs stay out of the sums below
        yield db


@pytest.mark.parametrize("memory", ["memory", "rag", "none"])
def test_the_parts_add_up_to_the_wall_time(db, memory):
    started = time.perf_counter()
    answer = db.generate(QUESTION, memory=memory, max_tokens=70)  # past one 64-token chunk: a second recall
    wall = (time.perf_counter() - started) * 1000
    t = answer.timings
    assert all(v >= 0 for v in t.values()), t
    decoding = t["recall"] + t["prefill"] + t["decode"]
    assert t["total"] <= wall and decoding <= t["total"] * 1.001
    assert decoding >= 0.9 * wall, (t, wall)  # the bar: within 10% of the measured time
    assert t["first_token"] <= decoding * 1.001
    if memory == "none":
        assert t["recall"] == 0 and not {"embed", "search", "read"} & set(t)
    else:
        parts = t["embed"] + t["search"] + t["read"]
        assert 0 < parts <= t["recall"] * 1.001, t  # recall's own parts, inside it


def test_memory_mode_reads_memories_and_rag_reads_text(db):
    memory = db.generate(QUESTION, memory="memory", max_tokens=2).timings
    rag = db.generate(QUESTION, memory="rag", max_tokens=2).timings
    # memory mode decodes the recalled memories' arrays; rag reads only their text
    assert memory["read"] > 0 and rag["read"] >= 0
    assert set(memory) == set(rag)


def test_a_package_set_times_its_recall_too(tmp_path):
    model, embedder = MemoryModel.tiny(seed=0, std=0.3), HashEmbedder()
    paths = []
    for name in ("a", "b"):
        with m3db.connect(tmp_path / name, model=model, embedder=embedder) as db:
            db.add(f"Package {name} says the sky is {name}-blue.", source=f"{name}.txt")
            paths.append(db.pack(tmp_path / f"{name}.m3kb") and tmp_path / f"{name}.m3kb")
    with m3db.attach(paths, model=model, embedder=embedder) as kbs:
        t = kbs.generate("What colour is the sky?", max_tokens=3).timings
    assert t["read"] > 0 and t["recall"] >= t["embed"] + t["search"] + t["read"] - 0.01

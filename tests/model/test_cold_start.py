"""Cold start: memories stored as text and embedding, encoded on first read, then kept.

Every cold memory, once read, must equal the same memory ingested warm (same model, same
codec, up to batch-dependent float noise), whether it was kept on disk, held in RAM by a
read-only reader, or packed cold."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("torch")
from test_knowledge import DOCS, HashEmbedder  # noqa: E402

import m3db  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402

LONG = {"text": "Paris is the capital of France. " * 12 + "The Seine flows through it.", "source": "wiki/Paris-long"}
WARMER = os.path.join(os.path.dirname(__file__), "cold_warmer.py")


class CountingModel:
    """The tiny model, counting how many references it encodes."""

    def __init__(self, model):
        self.model, self.encoded = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, texts, **kw):
        self.encoded += len(texts)
        return self.model.encode(texts, **kw)


@pytest.fixture(scope="module")
def tiny():
    return MemoryModel.tiny()


@pytest.fixture(scope="module")
def warm_arrays(tiny, tmp_path_factory):
    """{text: (keys, values, positions)} of every reference, ingested warm."""
    with m3db.connect(tmp_path_factory.mktemp("warm") / "kb", model=tiny, embedder=HashEmbedder(), codec="int8") as db:
        db.add_documents(DOCS + [LONG], progress=False)
        return {m.text: (m.keys, m.values, m.positions) for m in db.get_many(db.locations.ids.tolist())}


def build_cold(path, tiny):
    with m3db.connect(path, model=tiny, embedder=HashEmbedder(), codec="int8") as db:
        report = db.add_documents(DOCS + [LONG], cold=True, progress=False)
        assert report.memories_added == len(db)
        return report.memories_added


def codecs(db):
    return dict(db.sql("SELECT id, codec FROM memories"))


def same_as_warm(memory, warm_arrays):
    """Equal up to two int8 steps: a reference encoded alone and the same reference encoded
    in a padded batch differ by ~1e-7 in fp32, which can move a value across a rounding edge."""
    keys, values, positions = warm_arrays[memory.text]
    return (
        np.array_equal(memory.positions, positions)
        and np.abs(memory.keys - keys).max() <= 2 * np.abs(keys).max() / 127
        and np.abs(memory.values - values).max() <= 2 * np.abs(values).max() / 127
    )


def test_cold_ingest_stores_text_spans_and_no_arrays(tiny, tmp_path):
    n = build_cold(tmp_path / "kb", tiny)
    with m3db.connect(tmp_path / "kb", model=tiny, embedder=HashEmbedder(), codec="int8") as db:
        assert set(codecs(db).values()) == {"cold"} and n > len(DOCS)
        rows = db.sql(
            "SELECT m.text, m.char_start, m.char_end, m.token_count, d.source FROM memories m "
            "JOIN documents d ON d.id = m.document_id"
        )
        texts = {d["source"]: d["text"] for d in DOCS + [LONG]}
        for text, start, end, tokens, source in rows:
            assert texts[source][start:end] == text and tokens == tiny.count_tokens(text)
        # recall without arrays reads the cold record and encodes nothing
        hit = db.recall("Tokyo is the capital of Japan", k=1)[0]
        assert hit.text.startswith("Tokyo") and set(codecs(db).values()) == {"cold"}
        assert db.check().ok


def test_first_read_encodes_and_keeps_the_memory(tiny, tmp_path, warm_arrays):
    build_cold(tmp_path / "kb", tiny)
    model = CountingModel(tiny)
    with m3db.connect(tmp_path / "kb", model=model, embedder=HashEmbedder(), codec="int8") as db:
        hits = db.recall("Tokyo is the capital of Japan", k=2, decode=True)
        assert model.encoded == 2
        assert all(same_as_warm(h.memory, warm_arrays) for h in hits)
        assert [codecs(db)[h.id] for h in hits] == ["int8", "int8"]
        # served by the RAM cache: the caller's copy views the cached arrays
        assert np.shares_memory(db.get(hits[0].id).keys, hits[0].memory.keys)
        assert model.encoded == 2 and db.check().ok
    model = CountingModel(tiny)
    with m3db.connect(tmp_path / "kb", model=model, embedder=HashEmbedder(), codec="int8") as db:
        again = db.get_many([h.id for h in hits])  # kept on disk: a plain read now
        assert model.encoded == 0 and all(same_as_warm(m, warm_arrays) for m in again)


def test_generate_on_a_cold_base_equals_a_warm_one(tiny, tmp_path):
    with m3db.connect(tmp_path / "warm", model=tiny, embedder=HashEmbedder(), codec="int8") as warm:
        warm.add_documents(DOCS + [LONG], progress=False)
        want = warm.generate("Tell me about Paris and the Seine.", max_tokens=10)
    build_cold(tmp_path / "cold", tiny)
    with m3db.connect(tmp_path / "cold", model=tiny, embedder=HashEmbedder(), codec="int8") as cold:
        got = cold.generate("Tell me about Paris and the Seine.", max_tokens=10)
        # the same memories are read (their arrays equal warm ones up to an int8 step, tested
        # above); not necessarily in the same order (HNSW orders equal scores arbitrarily), and
        # the greedy text may differ (the tiny random model has near-tied logits)
        assert sorted(s.text for s in got.sources) == sorted(s.text for s in want.sources)
        used = {s.id for s in got.sources}
        assert {i for i, c in codecs(cold).items() if c != "cold"} == used


def test_read_only_and_transactions_encode_in_ram_only(tiny, tmp_path, warm_arrays):
    build_cold(tmp_path / "kb", tiny)
    before = sorted(os.listdir(tmp_path / "kb" / "segments")), os.path.getsize(tmp_path / "kb" / "catalog.duckdb")
    model = CountingModel(tiny)
    with m3db.connect(tmp_path / "kb", read_only=True, model=model, embedder=HashEmbedder(), codec="int8") as db:
        m = db.get(0)
        assert same_as_warm(m, warm_arrays) and model.encoded == 1
        assert np.shares_memory(db.get(0).keys, m.keys) and model.encoded == 1  # the RAM cache holds it
        assert set(codecs(db).values()) == {"cold"}
        with pytest.raises(m3db.ReadOnlyError):
            db.warm_up()
    assert (
        sorted(os.listdir(tmp_path / "kb" / "segments")),
        os.path.getsize(tmp_path / "kb" / "catalog.duckdb"),
    ) == before
    with m3db.connect(tmp_path / "kb", model=tiny, embedder=HashEmbedder(), codec="int8") as db:
        with db.transaction():
            assert same_as_warm(db.get(1), warm_arrays)
            with pytest.raises(m3db.InvalidInputError, match="inside a transaction"):
                db.warm_up()
        assert codecs(db)[1] == "cold"


def test_warm_up_then_compact_and_pack(tiny, tmp_path, warm_arrays):
    n = build_cold(tmp_path / "kb", tiny)
    with m3db.connect(tmp_path / "kb", model=tiny, embedder=HashEmbedder(), codec="int8") as db:
        db.pack(tmp_path / "cold.m3kb")  # a package may hold cold memories: readers encode them
        assert db.warm_up(batch_size=2, progress=False) == n
        assert db.warm_up(progress=False) == 0
        assert set(codecs(db).values()) == {"int8"}
        sizes = db.compact()
        assert sizes["bytes_after"] < sizes["bytes_before"]  # the cold records are garbage now
        assert db.check().ok and all(same_as_warm(m, warm_arrays) for m in db.get_many(range(n)))
    with m3db.connect(tmp_path / "cold.m3kb", model=tiny, embedder=HashEmbedder(), codec="int8") as pkg:
        assert set(codecs(pkg).values()) == {"cold"}
        assert all(same_as_warm(m, warm_arrays) for m in pkg.get_many(range(n)))
        assert pkg.generate("Paris?", max_tokens=3).sources


def test_bad_cold_items_are_refused(tiny, tmp_path):
    with m3db.connect(tmp_path / "kb", model=tiny, embedder=HashEmbedder(), codec="int8") as db:
        emb = np.ones(256, np.float32)
        with pytest.raises(m3db.InvalidInputError, match="text only"):
            db.add_memories([dict(cold=True, text="x", embedding=emb, keys=np.zeros(3))])
        with pytest.raises(m3db.InvalidInputError, match="cold must be"):
            db.add_memories([dict(cold="yes", text="x", embedding=emb)])
        with pytest.raises(m3db.InvalidInputError, match="char_start and char_end"):
            db.add_memories([dict(cold=True, text="x", embedding=emb, char_start=5, char_end=2)])
        with pytest.raises(m3db.InvalidInputError, match="cold must be"):
            db.add("text", cold=1)
        assert len(db) == 0


def test_a_cold_memory_without_its_model_says_what_it_needs(tiny, tmp_path):
    build_cold(tmp_path / "kb", tiny)
    with m3db.connect(tmp_path / "kb", read_only=True) as db:  # would bind the bundled model
        db._bind_models = lambda *a: (_ for _ in ()).throw(m3db.SpecMismatchError("built by another model"))
        with pytest.raises(m3db.SpecMismatchError, match="is cold"):
            db.get(0)


def test_sigkill_while_warming_loses_nothing(tiny, tmp_path, warm_arrays):
    n = build_cold(tmp_path / "kb", tiny)
    warmed = set()
    for delay in (0.3, 0.6, 1.2):
        proc = subprocess.Popen([sys.executable, WARMER, str(tmp_path / "kb")], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        warmed |= {int(line.split()[1]) for line in out.splitlines() if line.startswith("warmed")}
        with m3db.connect(tmp_path / "kb", model=tiny, embedder=HashEmbedder(), codec="int8") as db:
            kinds = codecs(db)
            assert all(kinds[i] == "int8" for i in warmed) and len(kinds) == n
            assert db.check().ok
            assert all(same_as_warm(m, warm_arrays) for m in db.get_many(range(n)))
            warmed = {i for i, c in codecs(db).items() if c == "int8"}

"""m3db.reencode / `m3db reencode`: a knowledge base rebuilt from its stored text for another
model, memory mode or codec, on the tiny random decoder and the feature-hashing embedder. Each
re-encoded record is compared with a fresh build under the new model (bit-exact: the encoder is
deterministic); an interruption resumes; a SIGKILL at any step leaves the old or the new state."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
import m3db  # noqa: E402
from m3db.cli.main import main as cli  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402
from m3db.storage.staging import STAGING_DIR  # noqa: E402
from m3db.testing import DIM, HashEmbedder, hashed_embedding  # noqa: E402

DOCS = [
    {
        "text": "Tokyo is the capital of Japan. It is very large. " * 4,
        "source": "wiki/Tokyo",
        "metadata": {"lang": "en"},
    },
    {"text": "Paris is the capital of France.", "source": "wiki/Paris", "title": "Paris", "metadata": {"lang": "en"}},
    {"text": "Berlin ist die Hauptstadt Deutschlands.", "source": "wiki/Berlin", "metadata": {"lang": "de"}},
    {"text": "Rome is the capital of Italy. " * 6, "source": "wiki/Rome", "uri": "https://x/rome"},
]
ROWS = "SELECT id, document_id, ordinal, char_start, char_end, text, lang FROM memories ORDER BY id"


@pytest.fixture(scope="module")
def model_a():
    return MemoryModel.tiny(seed=0)


@pytest.fixture(scope="module")
def model_b():
    return MemoryModel.tiny(seed=1)


def build(path, model, docs=DOCS, *, codec="int4", embedder=None, cold=False):
    with m3db.connect(path, model=model, embedder=embedder or HashEmbedder(), codec=codec) as db:
        db.add_documents(docs, batch_size=2, progress=False, cold=cold)
        return db.spec


def snapshot(path, model=None, embedder=None):
    """Rows, spec and every record's arrays (None when cold) of the database at `path`; the
    index's vectors are checked against the catalog's embeddings on the way."""
    with m3db.connect(path, model=model, embedder=embedder or HashEmbedder()) as db:
        ids, emb = db.catalog.embeddings()
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        assert np.allclose(db.index.vectors(ids), unit, atol=2e-3)  # f16 in the index
        rows = [tuple(r) for r in db.sql(ROWS)]
        docs = [tuple(r) for r in db.sql("SELECT id, source, title, uri, metadata FROM documents ORDER BY id")]
        records = {}
        for mid in [r[0] for r in rows]:
            m = db.store.read(mid)  # as stored: a cold one is not encoded by this read
            arrays = None if m.cold else (m.keys.copy(), m.values.copy(), m.positions.copy())
            records[mid] = (arrays, m.token_count, m.text)
        return rows, docs, db.spec, records


def same_records(a, b, *, exact=True):
    """Equal records. exact=False, against a fresh build that batched the texts otherwise: the
    positions, token counts and texts are equal, the arrays within 1e-6 (a batch's padding moves
    float sums by ~1e-7: the encoder ranks tokens on rounded scores so that positions do not move)."""
    assert a.keys() == b.keys()
    for mid in a:
        (arr_a, tc_a, text_a), (arr_b, tc_b, text_b) = a[mid], b[mid]
        assert (tc_a, text_a) == (tc_b, text_b), mid
        assert (arr_a is None) == (arr_b is None), mid
        if arr_a is not None:
            assert np.array_equal(arr_a[2], arr_b[2]), mid
            for x, y in zip(arr_a[:2], arr_b[:2]):
                assert np.array_equal(x, y) if exact else np.allclose(x, y, rtol=0, atol=1e-6), mid


def test_another_model_keeps_everything_and_equals_a_fresh_build(tmp_path, model_a, model_b):
    spec_a = build(tmp_path / "kb", model_a)
    spec_b = build(tmp_path / "fresh", model_b)
    assert spec_a.model_fingerprint != spec_b.model_fingerprint
    rows, docs, _, _ = snapshot(tmp_path / "kb", model_a)
    report = m3db.reencode(tmp_path / "kb", model=model_b, progress=False)
    assert report["changed"] == ["model_fingerprint"] and not report["reembedded"]
    assert report["encoded"] == len(rows) and report["resumed"] == 0
    new_rows, new_docs, new_spec, records = snapshot(tmp_path / "kb", model_b)
    assert (new_rows, new_docs, new_spec) == (rows, docs, spec_b)
    fresh_rows, _, _, fresh = snapshot(tmp_path / "fresh", model_b)
    assert [r[1:] for r in fresh_rows] == [r[1:] for r in rows]  # the same chunks, in the same order
    same_records(records, fresh, exact=False)
    assert not os.path.exists(tmp_path / "kb" / STAGING_DIR)
    with pytest.raises(m3db.SpecMismatchError, match="model_fingerprint"):
        m3db.connect(tmp_path / "kb", model=model_a, embedder=HashEmbedder())
    with m3db.connect(tmp_path / "kb", model=model_b, embedder=HashEmbedder()) as db:
        assert db.check().ok
        answer = db.generate("What is the capital of France?", max_tokens=6, k=2)
        assert answer.sources and {s.document for s in answer.sources} <= {d["source"] for d in DOCS}
        assert db.recall("capital of France", k=1)[0].text.startswith("Paris")


def test_same_spec_does_nothing(tmp_path, model_a):
    build(tmp_path / "kb", model_a)
    before = snapshot(tmp_path / "kb", model_a)
    report = m3db.reencode(tmp_path / "kb", model=model_a, progress=False)
    assert report["changed"] == [] and "nothing to do" in report["message"]
    same_records(before[3], snapshot(tmp_path / "kb", model_a)[3])


def test_dense_to_sparse_and_codec_change(tmp_path, model_a):
    build(tmp_path / "kb", model_a)
    n_layer = model_a.decoder.cfg.n_layer
    sparse = model_a.with_settings(MemorySettings.sparse(n_layer), adapter=None)
    build(tmp_path / "fresh", sparse, codec="int8")
    report = m3db.reencode(tmp_path / "kb", model=sparse, codec="int8", progress=False)
    assert {"memory_layers", "tokens_per_head", "codec"} <= set(report["changed"])
    assert report["bytes_after"] < report["bytes_before"]  # fewer layers and tokens, though twice the bits
    _, _, spec, records = snapshot(tmp_path / "kb", sparse)
    _, _, fresh_spec, fresh = snapshot(tmp_path / "fresh", sparse)
    assert spec == fresh_spec and spec.codec == "int8" and spec.tokens_per_head == 8
    same_records(records, fresh, exact=False)
    # the codec alone: the same model, so the same arrays as a fresh f16 build
    m3db.reencode(tmp_path / "kb", model=sparse, codec="f16", progress=False)
    build(tmp_path / "fresh16", sparse, codec="f16")
    same_records(snapshot(tmp_path / "kb", sparse)[3], snapshot(tmp_path / "fresh16", sparse)[3], exact=False)
    with m3db.connect(tmp_path / "kb", model=sparse, embedder=HashEmbedder()) as db:
        assert db.check().ok and db.generate("Where is Rome?", max_tokens=4).sources


class SaltedEmbedder:
    """A real embedder of HashEmbedder's dimension giving other vectors: hashing with salt words."""

    dim, fingerprint = DIM, "feature-hashing-salted"

    def embed(self, texts):
        return np.stack([hashed_embedding("salt pepper " + t) for t in texts])


def test_cold_memories_stay_cold_and_a_new_embedder_reembeds(tmp_path, model_a, model_b):
    OtherEmbedder = SaltedEmbedder

    build(tmp_path / "kb", model_a, DOCS[:2], cold=True)
    build(tmp_path / "kb", model_a, DOCS[2:])  # the same database: two cold documents, two warm
    report = m3db.reencode(tmp_path / "kb", model=model_b, embedder=OtherEmbedder(), progress=False)
    assert report["reembedded"] and report["cold"] > 0 and report["encoded"] > 0
    with m3db.connect(tmp_path / "kb", model=model_b, embedder=OtherEmbedder()) as db:
        assert db.spec.embedder_fingerprint == "feature-hashing-salted"
        cold = db.catalog.cold_ids().tolist()
        assert len(cold) == report["cold"]
        ids, emb = db.catalog.embeddings()
        text = {r[0]: r[1] for r in db.sql("SELECT id, text FROM memories")}
        for mid, e in zip(ids.tolist(), emb):
            assert np.allclose(e, OtherEmbedder().embed([text[mid]])[0], atol=1e-6)
        hit = db.recall("capital of France", k=1)[0]
        assert hit.text.startswith("Paris")  # the rebuilt index holds the new vectors
        m = db.get(cold[0])  # a cold memory is encoded on first read, by the new model
        fresh = model_b.encode([m.text])[0]
        assert np.allclose(m.keys, fresh["keys"], atol=0.05)
        assert db.check().ok
    with pytest.raises(m3db.InvalidInputError, match="dimension|dim"):

        class Wide(OtherEmbedder):
            dim, fingerprint = 8, "eight"

        m3db.reencode(tmp_path / "kb", model=model_a, embedder=Wide(), progress=False)


def test_an_interrupted_reencode_resumes(tmp_path, model_a, model_b):
    build(tmp_path / "kb", model_a)
    build(tmp_path / "fresh", model_b)
    n = len(snapshot(tmp_path / "kb", model_a)[0])

    class Interrupting:  # model B, interrupted (as by Ctrl-C) after its second batch
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(model_b, name)

        def encode(self, texts):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return model_b.encode(texts)

    with pytest.raises(KeyboardInterrupt):
        m3db.reencode(tmp_path / "kb", model=Interrupting(), batch_size=2, progress=False)
    with m3db.connect(tmp_path / "kb", model=model_a, embedder=HashEmbedder()) as db:  # still the old state
        assert db.spec.model_fingerprint == model_a.fingerprint and db.check().ok
    report = m3db.reencode(tmp_path / "kb", model=model_b, batch_size=2, progress=False)
    assert report["resumed"] == 4 and report["encoded"] == n - 4
    same_records(snapshot(tmp_path / "kb", model_b)[3], snapshot(tmp_path / "fresh", model_b)[3], exact=False)


def test_errors_name_the_fix(tmp_path, model_a, model_b):
    with pytest.raises(m3db.NotFoundError, match="no m3db database"):
        m3db.reencode(tmp_path / "missing", model=model_b)
    build(tmp_path / "kb", model_a)
    with m3db.connect(tmp_path / "kb", model=model_a, embedder=HashEmbedder()) as db:
        db.pack(tmp_path / "kb.m3kb")
    with pytest.raises(m3db.ReadOnlyError, match="pack it again"):
        m3db.reencode(tmp_path / "kb.m3kb", model=model_b)
    with pytest.raises(m3db.InvalidInputError, match="memory_mode='tiny'"):
        m3db.reencode(tmp_path / "kb", memory_mode="tiny")
    with pytest.raises(m3db.InvalidInputError, match="not both"):
        m3db.reencode(tmp_path / "kb", model=model_b, memory_mode="sparse")
    with pytest.raises(m3db.InvalidInputError, match="unknown codec 'int3'"):
        m3db.reencode(tmp_path / "kb", model=model_b, codec="int3")
    with pytest.raises(m3db.InvalidInputError, match="recompress PATH --codec pq"):
        m3db.reencode(tmp_path / "kb", model=model_b, codec="pq")
    with pytest.raises(m3db.InvalidInputError, match="batch_size"):
        m3db.reencode(tmp_path / "kb", model=model_b, batch_size=0)
    short = model_b.with_settings(MemorySettings(reference_length=8, tokens_per_head=4), adapter=None)
    with pytest.raises(m3db.InvalidInputError, match="m3db build"):
        m3db.reencode(tmp_path / "kb", model=short, progress=False)
    with m3db.connect(tmp_path / "kb", model=model_a, embedder=HashEmbedder()) as db:
        assert db.spec.model_fingerprint == model_a.fingerprint and db.check().ok  # nothing changed
        with pytest.raises(m3db.LockedError):
            m3db.reencode(tmp_path / "kb", model=model_b)


def test_cli_errors(tmp_path, model_a, capsys):
    build(tmp_path / "kb", model_a)
    cases = [
        ([str(tmp_path / "missing")], "no database"),
        ([str(tmp_path / "kb"), "--memory-mode", "tiny"], "memory_mode='tiny'"),
        ([str(tmp_path / "kb"), "--codec", "int3"], "unknown codec"),
        ([str(tmp_path / "kb"), "--codec", "pq"], "recompress"),
        ([str(tmp_path / "kb"), "--model", str(tmp_path / "no-such-model")], "no model at"),
    ]
    for argv, message in cases:
        assert cli(["reencode", *argv]) == 1, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after "loading ..." for --model
        assert last.startswith("error: ") and message in last, (argv, last)


# the worker: re-encode into model B with every durable step trapped, killing itself at call K
WORKER = r"""
import os, signal, sys
import m3db
from m3db.model.memory_model import MemoryModel
from m3db.storage import staging
from m3db.storage.catalog import Catalog
from m3db.storage.segment import SegmentStore
from m3db.testing import HashEmbedder

path, kill_at, when, reembed = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "reembed"
sys.path.insert(0, sys.argv[5])
from kill_points import arm, calls, trap
from test_reencode import SaltedEmbedder
arm(kill_at, when)

for owner, name in [(SegmentStore, "append"), (SegmentStore, "sync"), (SegmentStore, "new_segment"),
                    (SegmentStore, "remove"), (Catalog, "begin"), (Catalog, "rewrite_memories"),
                    (Catalog, "set_meta"), (Catalog, "commit"), (staging, "replace_file"),
                    (staging, "fsync_path"), (staging.Staging, "discard")]:
    trap(owner, name)
embedder = SaltedEmbedder() if reembed else None
m3db.reencode(path, model=MemoryModel.tiny(seed=1), embedder=embedder, batch_size=3, progress=False)
print(" ".join(calls), flush=True)
"""


def run_worker(path, kill_at, when, reembed):
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, "-c", WORKER, str(path), str(kill_at), when, "reembed" if reembed else "keep", here]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout.split()


@pytest.mark.parametrize("reembed", [False, True], ids=["same-embedder", "new-embedder"])
def test_sigkill_during_reencode_leaves_the_old_or_the_new_state(tmp_path, model_a, model_b, reembed):
    import shutil

    embedders = {model_a.fingerprint: HashEmbedder(), model_b.fingerprint: SaltedEmbedder() if reembed else None}
    pristine = tmp_path / "pristine"
    build(pristine, model_a)
    old = snapshot(pristine, model_a)
    clean = tmp_path / "clean"
    shutil.copytree(pristine, clean)
    rc, calls = run_worker(clean, 0, "never", reembed)
    assert rc == 0 and "commit" in calls, calls
    new = snapshot(clean, model_b, embedders[model_b.fingerprint])
    assert new[2].model_fingerprint == model_b.fingerprint
    rng = np.random.default_rng(18)
    commit = calls.index("commit") + 1
    writes = [i + 1 for i, c in enumerate(calls) if c == "replace_file"]
    appends = [i + 1 for i, c in enumerate(calls) if c == "append"]
    if os.environ.get("M3DB_SLOW") == "1":
        points = [i + 1 for i, c in enumerate(calls) if c != "append"] + [int(rng.choice(appends))]
    else:
        # a staged batch, a record append, the fsync of the new segments (and the index files'
        # removal, when re-embedded), the catalog's last steps, and the cleanup after
        steps = [calls.index(c) + 1 for c in ("sync", "fsync_path") if c in calls]
        points = sorted({writes[1], int(rng.choice(appends)), *steps, commit - 1, commit, commit + 1, len(calls)})
    seen = set()
    for k in points:
        for when in ("before", "after"):
            trial = tmp_path / f"trial-{k}-{when}"
            shutil.copytree(pristine, trial)
            rc, _ = run_worker(trial, k, when, reembed)
            assert rc == -signal.SIGKILL, (k, when, rc)
            with m3db.connect(trial) as db:
                state = db.spec.model_fingerprint
                report = db.check()
                assert report.ok, (k, when, report.problems)
            want, model = (old, model_a) if state == model_a.fingerprint else (new, model_b)
            assert state in (model_a.fingerprint, model_b.fingerprint)
            seen.add(state)
            got = snapshot(trial, model, embedders[state])
            assert got[:3] == want[:3], (k, when)
            same_records(got[3], want[3])
            # and a rerun completes from there, into exactly the new state
            m3db.reencode(trial, model=model_b, embedder=embedders[model_b.fingerprint], batch_size=3, progress=False)
            done = snapshot(trial, model_b, embedders[model_b.fingerprint])
            assert done[:3] == new[:3]
            same_records(done[3], new[3])
            assert not os.path.exists(trial / STAGING_DIR)
            shutil.rmtree(trial)
    assert seen == {model_a.fingerprint, model_b.fingerprint}  # the points straddle the commit

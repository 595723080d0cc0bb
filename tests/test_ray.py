"""The Ray build (m3db.bindings.ray) on a real local Ray cluster of 2 CPUs, with the tiny decoder
and the hashing embedder: the local build, the Ray single-writer build and the sharded build
(merged, and served as packages) give the same knowledge base, record bytes and catalog rows;
a killed actor and a killed driver lose and duplicate nothing; bad documents are reported one by
one and their batches still commit; a worker that cannot start or cannot be placed is a clear
error, at once; GPU workers run your own transformers model on CUDA (on a machine with a GPU)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
import m3db  # noqa: E402
from m3db.bindings.ray import TinyModels, TransformersModels, build, build_shards  # noqa: E402
from m3db.cli import main  # noqa: E402
from m3db.knowledge.ingest import MAX_DOCUMENT_CHARS  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.storage.record import read_payload  # noqa: E402
from m3db.testing import HashEmbedder  # noqa: E402

# this module's model recipes travel to Ray's workers by value (they cannot import tests/)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

BATCH = 8
DOCS = [
    {
        "text": f"Document {i} is about topic {i % 7}. " * (1 + i % 6)
        + ("A longer tail sentence follows. " * 9) * (i % 3),
        "source": f"doc-{i:03d}",
        "title": f"Title {i}",
        "metadata": {"topic": i % 7, "lang": "en" if i % 2 else "fr"},
    }
    for i in range(48)
]


@pytest.fixture(scope="module")
def cluster():
    # one GPU in Ray's accounting, real or not: without CUDA the GPU path runs up to torch
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The reference: add_documents on one process."""
    path = tmp_path_factory.mktemp("local") / "kb.m3db"
    with m3db.connect(path, model=MemoryModel.tiny(), embedder=HashEmbedder()) as db:
        db.add_documents(DOCS, batch_size=BATCH, progress=False)
    return dump(path)


def dump(path):
    """Every record's bytes (in id order) and every catalog row but the creation times."""
    with m3db.connect(path, read_only=True) as db:
        loc = db.locations
        records = {
            int(mid): bytes(db.segments.read(*(int(loc.cols[c][i]) for c in ("segment", "offset", "length"))))
            for i, mid in enumerate(loc.ids.tolist())
        }
        memories = [tuple(map(str, r)) for r in db.sql("SELECT * EXCLUDE (created_at) FROM memories ORDER BY id")]
        documents = [tuple(map(str, r)) for r in db.sql("SELECT * EXCLUDE (created_at) FROM documents ORDER BY id")]
        return {"records": dict(sorted(records.items())), "memories": memories, "documents": documents}


def test_three_build_modes_give_the_same_knowledge_base(cluster, local, tmp_path):
    report = build(tmp_path / "ray.m3db", DOCS, models=TinyModels(), workers=2, batch_size=BATCH, progress=False)
    assert (report.documents_added, report.documents_failed, report.errors) == (len(DOCS), 0, [])
    assert dump(tmp_path / "ray.m3db") == local

    shards = build_shards(tmp_path / "shards", DOCS, shards=2, models=TinyModels(), batch_size=BATCH, progress=False)
    assert [os.path.basename(p) for p in shards.packages] == ["part-000.m3kb", "part-001.m3kb"]
    assert all(m3db.verify(p).ok for p in shards.packages)
    assert shards.memories_added == len(local["records"])
    # each shard's records are the local build's but for the ids (per package, as documented)
    local_payloads = [_content(b) for b in local["records"].values()]
    shard_payloads = []
    for p in shards.packages:
        with m3db.connect(p) as kb:
            shard_payloads += [_content(kb.segments.read(*loc)) for loc in _locations(kb)]
    assert shard_payloads == local_payloads
    # served as one knowledge base: the same nearest texts as the local database
    with m3db.connect(shards.packages) as shelf, m3db.connect(tmp_path / "ray.m3db", read_only=True) as db:
        query = HashEmbedder().embed(["Document 7 is about topic 0"])[0]
        assert [m.text for m in shelf.recall(query, k=5)] == [m.text for m in db.recall(query, k=5)]
    # merged in order: the local build, id for id and byte for byte
    assert main(["merge", str(tmp_path / "merged.m3db"), "--from", *shards.packages]) == 0
    assert dump(tmp_path / "merged.m3db") == local
    assert main(["merge", str(tmp_path / "merged.m3db"), "--from", *shards.packages, "--json"]) == 0  # resumes
    assert dump(tmp_path / "merged.m3db") == local
    again = build_shards(tmp_path / "shards", DOCS, shards=2, models=TinyModels(), batch_size=BATCH, progress=False)
    assert again.kept == shards.packages  # complete packages are kept on a rerun


def _content(blob):
    """A record's payload without what a package numbers itself (ids, document id, commit)."""
    d = read_payload(bytes(blob), "test")
    return {k: v for k, v in d.items() if k not in ("id", "document_id", "seq")}


def _locations(kb):
    loc = kb.locations
    order = np.argsort(loc.ids)
    return [tuple(int(loc.cols[c][i]) for c in ("segment", "offset", "length")) for i in order]


def test_a_rerun_and_a_dataset_resume_to_the_same_knowledge_base(cluster, local, tmp_path):
    path = tmp_path / "kb.m3db"
    first = build(path, DOCS[:24], models=TinyModels(), workers=1, batch_size=BATCH, progress=False)
    assert first.documents_added == 24
    # the rest from a user's Dataset, whose rows are batched as the local build batches them
    report = build(path, ray.data.from_items(DOCS), models=TinyModels(), workers=2, batch_size=BATCH, progress=False)
    assert (report.documents_skipped, report.documents_added) == (24, 24)
    assert dump(path) == local


def test_bad_documents_are_reported_and_their_batches_commit(cluster, tmp_path):
    docs = [dict(d) for d in DOCS[:16]]
    docs[1] = {"text": b"\xff\xfe not UTF-8", "source": "bytes"}
    docs[2] = {"text": "   ", "source": "blank"}
    docs[3] = 42
    docs[9] = {"text": "x" * (MAX_DOCUMENT_CHARS + 1), "source": "huge"}
    docs[10] = {"text": "Other text under a source used before.", "source": docs[8]["source"]}
    report = build(tmp_path / "kb.m3db", docs, models=TinyModels(), workers=2, batch_size=BATCH, progress=False)
    errors = {e["document"]: e for e in report.errors}
    assert sorted(errors) == [1, 3, 9, 10] and report.documents_empty == 1
    assert "decode bytes first" in errors[1]["error"] and errors[1]["source"] == "bytes"
    assert "dict with 'text'" in errors[3]["error"]
    assert "over the 20,000,000 limit" in errors[9]["error"] and errors[9]["source"] == "huge"
    assert "already twice in this call with other text" in errors[10]["error"]
    with m3db.connect(tmp_path / "kb.m3db", read_only=True) as db:
        sources = {r[0] for r in db.sql("SELECT source FROM documents")}
    good = {d["source"] for i, d in enumerate(docs) if i not in (1, 2, 3, 9, 10)}
    assert sources == good and report.documents_added == len(good)  # both batches committed
    # the same documents locally: the same message for each, raised at the first
    with m3db.connect(tmp_path / "local.m3db", model=MemoryModel.tiny(), embedder=HashEmbedder()) as db:
        with pytest.raises(m3db.InvalidInputError, match="decode bytes first"):
            db.add_documents(docs, batch_size=BATCH, progress=False)


class SlowTiny:
    """The tiny model, each encode taking `delay` seconds longer and leaving a file PID-N in
    `folder`: a build slow enough to kill a worker or the driver in the middle of it."""

    def __init__(self, folder, delay):
        self.folder, self.delay = str(folder), delay

    def __call__(self, spec=None):
        model, embedder = TinyModels()(spec)
        folder, delay, encode = self.folder, self.delay, model.encode

        def slow(texts, **kw):
            open(os.path.join(folder, f"{os.getpid()}-{time.monotonic_ns()}"), "w").close()
            time.sleep(delay)
            return encode(texts, **kw)

        model.encode = slow
        return model, embedder


def test_a_killed_actor_loses_and_duplicates_nothing(cluster, local, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    out = {}

    def run():
        out["report"] = build(
            tmp_path / "kb.m3db", DOCS, models=SlowTiny(pids, 0.4), workers=2, batch_size=BATCH, progress=False
        )

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 120
    while not os.listdir(pids) and time.time() < deadline:
        time.sleep(0.05)
    victim = int(os.listdir(pids)[0].split("-")[0])
    os.kill(victim, signal.SIGKILL)  # a Ray worker process this test's build started
    t.join(timeout=300)
    assert not t.is_alive() and out["report"].documents_added == len(DOCS)
    assert len({f.split("-")[0] for f in os.listdir(pids)}) >= 2  # another process took the killed one's batches
    assert dump(tmp_path / "kb.m3db") == local


DRIVER = textwrap.dedent(
    """
    import sys, time, os, json, ray
    sys.path.insert(0, {here!r})
    from m3db.bindings.ray import build
    from test_ray import DOCS, SlowTiny, BATCH
    ray.init(address={address!r}, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules["test_ray"])
    build({path!r}, DOCS, models=SlowTiny({pids!r}, 0.3), workers=2, batch_size=BATCH, progress=False)
    """
)


def test_a_killed_driver_resumes_on_rerun(cluster, local, tmp_path):
    path, pids = tmp_path / "kb.m3db", tmp_path / "pids"
    pids.mkdir()
    script = DRIVER.format(here=os.path.dirname(__file__), address=cluster, path=str(path), pids=str(pids))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(os.listdir(pids)) < 4:  # 4 of 6 batches encoded
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    with m3db.connect(path, read_only=True) as db:
        assert len(db) < len(local["records"])  # killed in the middle
    report = build(path, DOCS, models=TinyModels(), workers=2, batch_size=BATCH, progress=False)
    assert report.documents_skipped + report.documents_added == len(DOCS)
    assert dump(path) == local


def test_wrong_arguments_are_clear_errors(cluster, tmp_path):
    with pytest.raises(m3db.InvalidInputError, match="workers must be a positive integer"):
        build(tmp_path / "kb", DOCS, models=TinyModels(), workers=0)
    with pytest.raises(m3db.InvalidInputError, match="iterable of documents or a ray.data.Dataset"):
        build(tmp_path / "kb", "just one string", models=TinyModels())
    with pytest.raises(m3db.SpecMismatchError, match="model_fingerprint"):
        build(tmp_path / "kb1", DOCS[:8], models=TinyModels(), batch_size=BATCH, progress=False)
        build(tmp_path / "kb1", DOCS, models=TinyModels(seed=1), batch_size=BATCH, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(m3db.InvalidInputError, match="is a file"):
        build_shards(tmp_path / "file", DOCS, shards=2, models=TinyModels())
    assert main(["build", str(tmp_path / "x"), "--from", "wikipedia", "--shards", "2"]) == 1


class CannotStart:
    """Models that load for the spec task but not on a worker (as a model missing on a node)."""

    def __call__(self, spec=None):
        if spec is not None:
            raise FileNotFoundError("no model at '/models/x' on this node")
        return TinyModels()()


def test_a_worker_that_cannot_start_or_be_placed_is_a_clear_error(cluster, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"a worker on .* did not start: no model at '/models/x'"):
        build(tmp_path / "kb1", DOCS[:8], models=CannotStart(), workers=1, batch_size=BATCH, progress=False)
    # a task's error arrives as itself, not as Ray's wrapper with a remote traceback
    with pytest.raises(FileNotFoundError, match="^no model at '/no/such/model'") as raised:
        build(tmp_path / "kb2", DOCS[:8], models=TransformersModels("/no/such/model"), progress=False)
    assert "ray::" not in str(raised.value)
    # a worker no node can hold: Ray would wait forever; refused before anything starts
    for cpus, gpus in ((3, 0), (1, 2)):
        with pytest.raises(m3db.InvalidInputError, match="no node of the Ray cluster can hold a worker"):
            build(tmp_path / "kb3", DOCS, models=TinyModels(), cpus_per_worker=cpus, gpus_per_worker=gpus)
        with pytest.raises(m3db.InvalidInputError, match="no node of the Ray cluster can hold a worker"):
            build_shards(tmp_path / "shards", DOCS, shards=2, models=TinyModels(), gpus_per_worker=gpus or 2)
    assert not (tmp_path / "kb3").exists() and not (tmp_path / "shards").exists()
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("One short document.")
    assert main(["build", str(tmp_path / "kb4"), "--from", str(folder), "--ray", "--gpus-per-worker", "2"]) == 1


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random llama saved as a transformers checkpoint: your own model, as workers load it."""
    from hf_tiny import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("hf") / "llama"
    tok = tiny_tokenizer()
    tiny_model("llama", seed=3, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs where torch sees no CUDA GPU")
def test_gpu_workers_without_cuda_say_so(cluster, hf_folder, tmp_path):
    with pytest.raises(m3db.DependencyError, match=r"Ray gave this worker GPU \[0\].* sees no CUDA GPU"):
        build(tmp_path / "kb", DOCS[:8], models=TransformersModels(hf_folder), gpus_per_worker=1, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_workers_encode_on_the_gpu(cluster, hf_folder, tmp_path):
    docs, model = DOCS[:16], TransformersModels(hf_folder)
    gpu = build(tmp_path / "gpu", docs, models=model, workers=1, gpus_per_worker=1, batch_size=BATCH, progress=False)
    cpu = build(tmp_path / "cpu", docs, models=model, workers=1, batch_size=BATCH, progress=False)
    assert (gpu.documents_added, gpu.errors) == (len(docs), []) and gpu.memories_added == cpu.memories_added
    with m3db.connect(tmp_path / "gpu", read_only=True) as g, m3db.connect(tmp_path / "cpu", read_only=True) as c:
        ids = [r[0] for r in c.sql("SELECT id FROM memories ORDER BY id")]
        assert ids == [r[0] for r in g.sql("SELECT id FROM memories ORDER BY id")]
        for a, b in zip(g.get_many(ids), c.get_many(ids)):
            assert a.text == b.text and a.keys.shape == b.keys.shape
            # bfloat16 on the GPU against float32 on the CPU, both through int4: close, not equal
            scale = np.abs(b.keys).mean() + 1e-6
            assert np.abs(a.keys - b.keys).mean() / scale < 0.15
            assert np.abs(a.values - b.values).mean() / (np.abs(b.values).mean() + 1e-6) < 0.15

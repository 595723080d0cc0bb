"""The trained product-quantization codec (storage/pq.py) and re-encoding a database into it
(Database.train_codec, maintenance.recompress): round trips within the stated error, damaged or
mismatched codebooks, too small a sample, reopen / repair / package of a pq database."""

import os
import shutil

import msgpack
import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.errors import FormatError, InvalidInputError
from m3db.storage.codec import codec_class, load_codec, stored_codec
from m3db.storage.pq import MIN_TRAIN_VECTORS, PQCodec, params_crc, train_pq
from m3db.storage.record import decode_record, encode_record

GOLDEN_V1 = os.path.join(os.path.dirname(__file__), "golden", "record_pq_v1.bin")

# two memory layers of one KV head at SmolLM2's head width: 4 codebooks, so training is quick
PQ_SPEC = dict(
    model_fingerprint="test-model",
    memory_layers=[0, 1],
    kv_heads=1,
    head_dim=64,
    tokens_per_head=8,
    embedding_dim=16,
    embedder_fingerprint="test-embedder",
)


def kv_like(rng, layers, heads, n, dim=64, rank=6):
    """Arrays shaped like real keys/values (L, H, n, D): a per-head offset, a few dominant
    directions with uneven per-dimension scales (real K/V have outlier dimensions), and noise;
    the structure is fixed by `rng`'s first draws, so one seed gives one distribution."""
    structure = np.random.default_rng(99)
    mean = structure.standard_normal((layers, heads, 1, dim)) * 2
    basis = structure.standard_normal((layers, heads, rank, dim)) * np.linspace(3, 0.3, dim)
    coef = rng.standard_normal((layers, heads, n, rank))
    return (mean + coef @ basis + 0.2 * rng.standard_normal((layers, heads, n, dim))).astype(np.float32)


def relative_error(x, y):
    return float(np.sqrt(np.square(x - y, dtype=np.float64).sum() / np.square(x, dtype=np.float64).sum()))


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    return train_pq(kv_like(rng, 2, 1, 2048), kv_like(rng, 2, 1, 2048) * 0.5, m=8)


def pq_memory(seed, spec, **extra):
    rng = np.random.default_rng(seed)
    n = spec.tokens_per_head
    positions = np.stack([np.stack([rng.choice(128, n, replace=False)]) for _ in range(spec.layers)])
    item = dict(
        keys=kv_like(rng, spec.layers, spec.kv_heads, n),
        values=kv_like(rng, spec.layers, spec.kv_heads, n) * 0.5,
        positions=positions.astype(np.uint8),
        embedding=rng.standard_normal(spec.embedding_dim).astype(np.float32),
        text=f"reference text number {seed}",
        id=seed,
    )
    item.update(extra)
    return item


def make_db(path, n=160, codec="int4"):
    spec = m3db.MemorySpec(**PQ_SPEC, codec=codec)
    db = m3db.connect(path, spec=spec)
    db.add_memories([pq_memory(i, spec) for i in range(n)])
    return db


# -- the codec ---------------------------------------------------------------------------------


def test_round_trip_within_the_stated_error(trained):
    rng = np.random.default_rng(5)  # held out: not the training sample
    for part, scale in (("keys", 1.0), ("values", 0.5)):
        x = kv_like(rng, 2, 1, 8) * scale
        data = trained.encode(x, part=part)
        assert len(data) == trained.encoded_size(x.shape) == 4 + 2 * 1 * 8 * 8  # crc32 + codes
        y = trained.decode(data, x.shape, part=part)
        assert y.dtype == np.float32 and y.shape == x.shape
        stated = trained.error[part]
        assert 0 < stated < 0.4  # structured arrays compress (i.i.d. Gaussian ones: about 0.5 at m=8)
        assert relative_error(x, y) <= stated * 1.25 + 0.01, (part, relative_error(x, y), stated)


def test_keys_and_values_may_take_different_bytes():
    rng = np.random.default_rng(11)
    codec = train_pq(kv_like(rng, 2, 1, 1024), kv_like(rng, 2, 1, 1024), m={"keys": 4, "values": 16})
    x = kv_like(rng, 2, 1, 64)
    assert len(codec.encode(x, part="keys")) == 4 + 2 * 64 * 4
    assert len(codec.encode(x, part="values")) == 4 + 2 * 64 * 16
    for part in ("keys", "values"):
        y = codec.decode(codec.encode(x, part=part), x.shape, part=part)
        assert relative_error(x, y) <= codec.error[part] * 1.25 + 0.01
    assert codec.error["values"] < codec.error["keys"]  # more bytes, less error on the same distribution
    again = load_codec("pq", msgpack.packb(codec.params(), use_bin_type=True))
    assert again.m == {"keys": 4, "values": 16} and again.crc == codec.crc


def test_stated_error_holds_for_any_token_count(trained):
    rng = np.random.default_rng(6)
    x = kv_like(rng, 2, 1, 200)
    for n in (1, 3, 8, 200):
        y = trained.decode(trained.encode(x[:, :, :n]), x[:, :, :n].shape)
        assert relative_error(x[:, :, :n], y) <= trained.error["keys"] * 1.6 + 0.02


def test_params_round_trip_without_pickle(trained):
    raw = msgpack.packb(trained.params(), use_bin_type=True)
    again = load_codec("pq", raw)
    x = kv_like(np.random.default_rng(7), 2, 1, 8)
    assert np.array_equal(again.decode(trained.encode(x), x.shape), trained.decode(trained.encode(x), x.shape))
    assert (again.codebook, again.crc, again.error) == (trained.codebook, trained.crc, trained.error)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.update(keys=p["keys"][:-1] + bytes([p["keys"][-1] ^ 1])),
        lambda p: p.update(crc32=p["crc32"] ^ 1),
        lambda p: p.update(values=p["values"][:-4]),
        lambda p: p.pop("error"),
        lambda p: p.update(vectors=p["vectors"] + 1),
        lambda p: p.update(shape={"keys": [2, 1, 8, 255, 8], "values": [2, 1, 8, 256, 8]}),
    ],
)
def test_a_damaged_codebook_is_a_format_error(trained, damage):
    params = trained.params()
    damage(params)
    with pytest.raises(FormatError, match="codebook"):
        PQCodec.from_params(params)
    with pytest.raises(FormatError, match="no codebook"):
        PQCodec.from_params({})


def test_a_blob_of_another_codebook_is_a_format_error(trained):
    x = kv_like(np.random.default_rng(8), 2, 1, 8)
    other = PQCodec(trained.centroids, codebook=trained.codebook + 1)
    for part in ("keys", "values"):  # each blob names its codebook: by its crc32 (v2)
        with pytest.raises(FormatError, match=f"another codebook \\(crc32 {trained.crc:08x}\\).*holds codebook 2"):
            other.decode(trained.encode(x, part=part), x.shape, part=part)
    old, other_old = (PQCodec(c.centroids, codebook=c.codebook, version=1) for c in (trained, other))
    with pytest.raises(FormatError, match="encoded with codebook 1"):  # by its number and crc32 (v1)
        other_old.decode(old.encode(x), x.shape)
    with pytest.raises(FormatError, match="corrupt"):  # a blob of the other version: its size is wrong
        old.decode(trained.encode(x), x.shape)
    params = trained.params()
    params["keys"] = (np.frombuffer(params["keys"], "<f4") + 1).astype("<f4").tobytes()
    described = {k: v for k, v in params.items() if k not in ("keys", "values", "crc32")}
    params["crc32"] = params_crc(described, params["keys"], params["values"])
    with pytest.raises(FormatError, match="crc32"):  # same number, other centroids
        PQCodec.from_params(params).decode(trained.encode(x), x.shape)


def golden_pq(version):
    """A small codec (2 layers, 1 head, 8 dims; keys 2 bytes, values 4) and a memory, from a seed:
    what tests/golden/record_pq_v1.bin was written from, by the m3db before blob version 2."""
    rng = np.random.default_rng(18)
    centroids = {
        "keys": rng.standard_normal((2, 1, 2, 256, 4)).astype("<f4"),
        "values": rng.standard_normal((2, 1, 4, 256, 2)).astype("<f4"),
    }
    codec = PQCodec(centroids, codebook=3, error={"keys": 0.25, "values": 0.5}, vectors=2048, version=version)
    keys = rng.standard_normal((2, 1, 3, 8)).astype(np.float32)
    values = rng.standard_normal((2, 1, 3, 8)).astype(np.float32)
    positions = np.arange(6, dtype=np.uint8).reshape(2, 1, 3) * 5
    record = encode_record(7, codec, keys, values, positions, "Paris is the capital of France.", {"lang": "en"}, 3, 0)
    return codec, record


def test_golden_record_of_blob_version_1_decodes_as_version_2_does():
    """Bytes written before blob version 2 stay readable, to the same arrays bit for bit."""
    old, new = golden_pq(1), golden_pq(2)
    with open(GOLDEN_V1, "rb") as f:
        golden = f.read()
    assert golden == old[1]  # version 1 is still written as it was
    assert len(golden) - len(new[1]) == 8  # 4 bytes of header fewer in each of keys and values
    a, b = decode_record(golden, "golden", codec=old[0]), decode_record(new[1], "new", codec=new[0])
    for field in ("keys", "values", "positions"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert (a.text, a.metadata, a.document_id) == ("Paris is the capital of France.", {"lang": "en"}, 3)
    with pytest.raises(FormatError, match="not the database's"):  # a record never meets the other version
        decode_record(golden, "golden", codec=new[0])
    with pytest.raises(FormatError, match="not the database's"):
        decode_record(new[1], "new", codec=old[0])


def test_the_sparse_400x_point_fits_its_target():
    """The issue's 400x: <= 4,834 bytes of K/V, positions and framing per memory in the sparse
    mode (15 layers x 3 KV heads x 8 tokens, head dim 64; keys 4 bytes, values 8 per vector)."""
    rng = np.random.default_rng(19)
    L, H, n, D = 15, 3, 8, 64
    centroids = {
        "keys": rng.standard_normal((L, H, 4, 256, D // 4)).astype("<f4"),
        "values": rng.standard_normal((L, H, 8, 256, D // 8)).astype("<f4"),
    }
    codec = PQCodec(centroids)
    keys, values = (rng.standard_normal((L, H, n, D)).astype(np.float32) for _ in range(2))
    positions = np.sort(rng.choice(128, (L, H, n)), axis=-1).astype(np.uint8)
    record = encode_record(1, codec, keys, values, positions, "", {}, None, None)
    assert len(record) == 4830 <= 4834  # 1,933,424 / 4,830 = 400.3x
    old = PQCodec(centroids, version=1)
    assert len(encode_record(1, old, keys, values, positions, "", {}, None, None)) == 4838


def test_too_few_vectors_is_refused_with_the_number_needed():
    x = kv_like(np.random.default_rng(9), 2, 1, MIN_TRAIN_VECTORS - 1)
    with pytest.raises(InvalidInputError, match=f"at least {MIN_TRAIN_VECTORS}"):
        train_pq(x, x, m=8)
    with pytest.raises(InvalidInputError, match="dividing the head dim"):
        train_pq(x, x, m=7)


def test_pq_is_registered_but_needs_its_codebook():
    assert codec_class("pq") is PQCodec and PQCodec.trained
    with pytest.raises(FormatError, match="no codebook"):
        load_codec("pq", None)


def test_a_codebook_row_is_loaded_at_its_version(trained):
    raw = msgpack.packb(trained.params(), use_bin_type=True)
    assert stored_codec("pq", [["pq", 1, raw]]).version == 1
    assert stored_codec("pq", [["int4", 1, None], ["pq", 1, raw], ["pq", 2, raw]]).version == 2  # the newest
    with pytest.raises(FormatError, match="pq version 3 is not readable.*upgrade m3db"):  # a newer m3db wrote it
        stored_codec("pq", [["pq", 3, raw]])
    with pytest.raises(FormatError, match="no codebook"):
        stored_codec("pq", [])
    assert stored_codec("int4", [["pq", 2, raw]]).name == "int4"


# -- a database re-encoded into pq ---------------------------------------------------------------


def test_recompress_then_reopen(tmp_path):
    path = tmp_path / "kb"
    db = make_db(path)
    before = {i: db.get(i) for i in range(160)}
    queries = [np.random.default_rng(100 + q).standard_normal(16).astype(np.float32) for q in range(5)]
    recalled = [db.recall(q, k=5).ids for q in queries]
    report = db.train_codec("pq", sample=160, m=8)
    assert report["codec"] == "pq" and report["memories"] == 160
    assert report["bytes_after"] < report["bytes_before"]
    assert db.spec.codec == "pq" and db.codec.codebook == 1
    assert [db.recall(q, k=5).ids for q in queries] == recalled
    db.add_memories([pq_memory(500, db.spec)])  # new adds go in with the codebook
    db.close()
    with m3db.connect(path) as db:
        assert db.spec.codec == "pq"
        assert db.check().ok, db.check().problems
        assert {r[0] for r in db.sql("SELECT DISTINCT codec FROM memories")} == {"pq"}
        for i, old in before.items():
            new = db.get(i)
            assert np.array_equal(new.positions, old.positions) and new.text == old.text
            assert relative_error(old.keys, new.keys) <= db.codec.error["keys"] * 1.25 + 0.01
            assert relative_error(old.values, new.values) <= db.codec.error["values"] * 1.25 + 0.01
        assert [[i for i in db.recall(q, k=6).ids if i != 500][:5] for q in queries] == recalled
        with open(path / "spec.json") as f:
            assert m3db.MemorySpec.from_json(f.read()).codec == "pq"
        assert os.path.exists(path / "codebook.msgpack")
        again = db.train_codec("pq", sample=161, m=4)  # trained again: the next codebook
        assert (
            db.codec.codebook == 2
            and db.codec.m == {"keys": 4, "values": 4}
            and again["bytes_after"] < report["bytes_after"]
        )
        back = db.train_codec("int4")  # and out of pq
        assert back["codec"] == "int4" and db.check().ok
    with m3db.connect(path) as db:
        assert db.spec.codec == "int4" and db.check().ok and len(db) == 161


def test_a_sample_too_small_is_refused_with_the_number_needed(tmp_path):
    db = make_db(tmp_path / "kb", n=40)
    with pytest.raises(InvalidInputError, match="at least 128 memories"):
        db.train_codec("pq", sample=40)
    with pytest.raises(InvalidInputError, match="add memories first"):
        db.train_codec("pq", sample=200)
    with pytest.raises(InvalidInputError, match="pass sample="):
        db.train_codec("pq")
    assert db.spec.codec == "int4" and db.check().ok  # nothing changed
    db.close()


def test_a_sample_is_read_up_to_what_training_uses(tmp_path, monkeypatch):
    """Under the cap, train() trains on every sampled memory, joined in id order; a larger sample
    is read only up to READ_VECTORS vectors per (layer, head) (a 100k sample would not fit in RAM)."""
    from m3db.storage import maintenance

    db = make_db(tmp_path / "kb", n=300)
    ids = np.sort(np.random.default_rng(0).choice(db.store.locations.ids, 200, replace=False))
    joined = [np.concatenate([getattr(db.get(int(i)), part) for i in ids], axis=2) for part in ("keys", "values")]
    want = train_pq(*joined, m=8)  # what train() trained on before the cap existed
    got = maintenance.train(db.store, "pq", sample=200)
    assert got.vectors == want.vectors == 1400 and got.error == want.error
    assert all(np.array_equal(got.centroids[p], want.centroids[p]) for p in ("keys", "values"))

    monkeypatch.setattr(maintenance, "READ_VECTORS", 1280)  # 160 memories of 8 vectors
    reads = []
    monkeypatch.setattr(db.store, "read", lambda mid, _read=db.store.read: reads.append(mid) or _read(mid))
    capped = maintenance.train(db.store, "pq", sample=300)
    assert len(reads) == len(set(reads)) == 160 and capped.vectors == 1280 - 1280 // 8
    db.close()


def test_a_record_of_another_codebook_is_a_format_error(tmp_path):
    path = tmp_path / "kb"
    db = make_db(path)
    db.train_codec("pq", sample=160)
    db.close()
    with m3db.connect(path) as db:  # swap the catalog's codebook for another: records no longer match
        other = PQCodec(db.codec.centroids, codebook=7)
        db.catalog.begin()
        db.catalog.replace_codec("pq", db.codec.version, msgpack.packb(other.params(), use_bin_type=True))
        db.catalog.commit()
    with m3db.connect(path, read_only=True) as db:
        with pytest.raises(FormatError, match="codebook"):
            db.get(3)
        assert not db.check().ok


def test_repair_rebuilds_a_pq_database_from_its_codebook_file(tmp_path):
    path = tmp_path / "kb"
    db = make_db(path)
    db.train_codec("pq", sample=160)
    want = {i: db.get(i).keys.copy() for i in (0, 77, 159)}
    db.close()
    saved = (path / "codebook.msgpack").read_bytes()
    os.remove(path / "catalog.duckdb")
    os.remove(path / "codebook.msgpack")
    with pytest.raises(FormatError, match="codebook.msgpack"):
        m3db.repair(path)
    assert not os.path.exists(path / "catalog.duckdb")  # refused: nothing changed
    (path / "codebook.msgpack").write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    with pytest.raises(FormatError, match="codebook"):
        m3db.repair(path)
    (path / "codebook.msgpack").write_bytes(saved)
    m3db.repair(path)
    with m3db.connect(path) as db:
        assert db.spec.codec == "pq" and db.check().ok and len(db) == 160
        for i, keys in want.items():
            assert np.array_equal(db.get(i).keys, keys)


def test_a_package_of_a_pq_database_verifies_and_reads(tmp_path):
    path = tmp_path / "kb"
    db = make_db(path)
    db.train_codec("pq", sample=160)
    want = {i: db.get(i).values.copy() for i in (1, 99)}
    db.pack(tmp_path / "kb.m3kb")
    db.close()
    report = m3db.verify(tmp_path / "kb.m3kb")
    assert report.ok, report.problems
    with m3db.connect(tmp_path / "kb.m3kb") as kb:
        assert kb.spec.codec == "pq" and kb.codec.codebook == 1
        for i, values in want.items():
            assert np.array_equal(kb.get(i).values, values)
    shutil.rmtree(path)


def test_the_cli_recompresses(tmp_path, capsys):
    from m3db.cli import main

    make_db(tmp_path / "kb", n=130).close()
    assert main(["recompress", str(tmp_path / "kb"), "--codec", "pq", "--sample", "130", "-m", "4,8", "--json"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["codec"] == "pq" and out["memories"] == 130 and 0 < out["error"]["keys"] < 0.6
    assert main(["recompress", str(tmp_path / "kb"), "--codec", "pq", "--sample", "10"]) == 1
    assert "at least 128 memories" in capsys.readouterr().err
    with m3db.connect(tmp_path / "kb", read_only=True) as db:
        assert db.codec.m == {"keys": 4, "values": 8} and db.check().ok


def test_a_database_of_blob_version_1_goes_on_at_it_until_recompressed(tmp_path):
    """A pq database an older m3db wrote (its codebook row and records at blob version 1) opens,
    reads, adds, packs and is repaired at version 1; `recompress` moves it to version 2."""
    from m3db.storage import maintenance
    from m3db.storage.record import read_payload

    def versions(db):  # the codebook rows' versions, and the records'
        rows = [tuple(r[:2]) for r in db.catalog.codec_rows()]
        records = set()
        for i in db.store.locations.ids.tolist():
            seg, off, length, _ = db.store.locations.find(i)
            records.add(read_payload(db.store.segments.read(seg, off, length), "test")["codec_version"])
        return rows, records

    path = tmp_path / "kb"
    db = make_db(path)
    new = maintenance.train(db.store, "pq", sample=160)
    maintenance.recompress(db.store, PQCodec(new.centroids, error=new.error, vectors=new.vectors, version=1))
    want = {i: db.get(i) for i in (0, 159)}
    db.close()
    with m3db.connect(path) as db:
        assert db.codec.version == 1 and versions(db) == ([("pq", 1)], {1})
        for i, memory in want.items():
            assert np.array_equal(db.get(i).keys, memory.keys) and np.array_equal(db.get(i).values, memory.values)
        db.add_memories([pq_memory(500, db.spec)])  # written as the database's records are
        assert versions(db) == ([("pq", 1)], {1}) and db.check().ok
        db.pack(tmp_path / "kb.m3kb")
    assert m3db.verify(tmp_path / "kb.m3kb").ok
    with m3db.connect(tmp_path / "kb.m3kb") as kb:
        assert kb.codec.version == 1 and np.array_equal(kb.get(159).values, want[159].values)
    os.remove(path / "catalog.duckdb")
    m3db.repair(path)
    with m3db.connect(path) as db:
        assert versions(db) == ([("pq", 1)], {1}) and db.check().ok and len(db) == 161
        report = db.train_codec("pq", sample=161, m=8)
        assert versions(db) == ([("pq", 2)], {2}) and db.check().ok
        assert report["bytes_after"] < report["bytes_before"]
    with m3db.connect(path, read_only=True) as db:
        assert db.codec.version == 2 and db.codec.codebook == 2 and db.check().ok


def test_train_codec_names_a_bad_m_or_seed_before_reading_the_sample(tmp_path):
    with m3db.connect(tmp_path / "kb", spec=small_spec()) as db:
        db.add_memories([make_memory(i) for i in range(3)])  # far too few: m and seed are checked first
        with pytest.raises(m3db.InvalidInputError, match=r"got the keys \['keys'\]"):
            db.train_codec("pq", sample=300, m={"keys": 4})
        with pytest.raises(m3db.InvalidInputError, match="values got 3"):
            db.train_codec("pq", sample=300, m={"keys": 4, "values": 3})
        with pytest.raises(m3db.InvalidInputError, match="seed must be a non-negative integer, got 'x'"):
            db.train_codec("pq", sample=300, seed="x")

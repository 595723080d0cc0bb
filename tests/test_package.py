"""Packages: pack is deterministic, verify finds damage, attach reads in place, several recall together.

Real files and real processes throughout; every database is built from fixed seeds."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.package import pack as package_mod
from m3db.package.manifest import HEADER_PAGE

N = 40


def build(path, n=N, start=0, spec=None, forget=(), codec=None):
    spec = spec or small_spec(**({"codec": codec} if codec else {}))
    with m3db.connect(path, spec=spec) as db:
        db.add_memories(
            [
                make_memory(
                    i,
                    spec,
                    metadata={
                        "lang": "en" if i % 3 else "fr",
                        "year": 1990 + i % 7,
                        "score": i / 4,
                        "tags": {"i": i},
                        "flag": i % 2 == 0,
                    },
                    document=f"doc/{i % 5}",
                    ordinal=i % 4,
                    token_count=10 + i,
                )
                for i in range(start, start + n)
            ]
        )
        if forget:
            db.forget(list(forget))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Every attach in a test extracts into this directory (never the user's cache)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("M3DB_CACHE_DIR", str(path))
    return path


@pytest.fixture
def kb(tmp_path):
    return build(tmp_path / "kb", forget=[5, 6])


@pytest.fixture
def pkg(kb, tmp_path):
    with m3db.connect(kb) as db:
        db.pack(tmp_path / "kb.m3kb", license="CC-BY-4.0", attribution="the m3db tests", version="1")
    return tmp_path / "kb.m3kb"


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tree(root, skip=None):
    """{relative path: (size, mtime_ns)} of every file under root, except under `skip`."""
    out = {}
    for d, dirs, files in os.walk(root):
        if skip and os.path.abspath(d).startswith(os.path.abspath(skip)):
            continue
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


# -- pack -----------------------------------------------------------------------------------------


def test_pack_is_deterministic(kb, tmp_path, cache):
    with m3db.connect(kb) as db:
        manifest = db.pack(tmp_path / "a.m3kb", name="kb")
        db.pack(tmp_path / "b.m3kb", name="kb")
    with m3db.connect(kb, read_only=True) as db:  # reopened: the index is loaded, not the one built
        db.pack(tmp_path / "c.m3kb", name="kb")
    # another process, another hash seed
    code = f"import m3db; m3db.connect({str(kb)!r}, read_only=True).pack({str(tmp_path / 'd.m3kb')!r}, name='kb')"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONHASHSEED="123"), timeout=120)
    # packing an attached package gives the package back, byte for byte
    with m3db.connect(tmp_path / "a.m3kb") as p:
        p.pack(tmp_path / "e.m3kb", name="kb")
    digests = {sha(tmp_path / f"{x}.m3kb") for x in "abcde"}
    assert len(digests) == 1
    assert manifest["counts"] == {
        "memories": N - 2,
        "documents": 5,
        "segments": 1,
        "record_bytes": manifest["counts"]["record_bytes"],
    }


def test_layout_is_aligned_and_manifest_holds_what_it_should(pkg):
    report = m3db.verify(pkg)
    assert report.ok, report.problems
    m = report.manifest
    assert m["about"] == {"name": "kb", "license": "CC-BY-4.0", "attribution": "the m3db tests", "version": "1"}
    assert m["spec"] == small_spec().to_dict() and m["codec"]["name"] == "int8"
    assert m["build"]["source_commit"] == 2 and m["build"]["m3db_version"] == m3db.__version__
    assert all(s["offset"] % 4096 == 0 for s in m["sections"])
    names = [s["name"] for s in m["sections"]]
    assert sorted(names) == ["catalog", "index", "segment/000001"]
    data = open(pkg, "rb").read()
    assert data[:8] == b"M3KB\r\n\x1a\n"
    for s in m["sections"]:  # the manifest's hashes are the hashes of the bytes where it says
        assert hashlib.sha256(data[s["offset"] : s["offset"] + s["length"]]).hexdigest() == s["sha256"]


def test_forgotten_memories_are_not_shipped(tmp_path):
    spec = small_spec(codec="f32")
    with m3db.connect(tmp_path / "kb", spec=spec) as db:
        db.add_memories([make_memory(i, spec, text=f"keep-{i}-text") for i in range(5)])
        db.add_memory(**make_memory(9, spec, text="SECRET forgotten reference"))
        db.forget(5)
        db.pack(tmp_path / "kb.m3kb")
    raw = open(tmp_path / "kb.m3kb", "rb").read()
    assert b"keep-3-text" in raw and b"SECRET" not in raw
    assert b"SECRET" in open(tmp_path / "kb" / "segments" / "000001.seg", "rb").read()  # the source still has it


def test_pack_refuses_overwrite_bad_fields_and_transactions(kb, tmp_path):
    with m3db.connect(kb) as db:
        db.pack(tmp_path / "x.m3kb")
        with pytest.raises(m3db.InvalidInputError, match="exists; pass overwrite=True"):
            db.pack(tmp_path / "x.m3kb")
        db.pack(tmp_path / "x.m3kb", overwrite=True)
        with pytest.raises(m3db.InvalidInputError, match="license must be a string"):
            db.pack(tmp_path / "y.m3kb", license=3)
        with pytest.raises(m3db.InvalidInputError, match="inside a transaction"):
            with db.transaction():
                db.pack(tmp_path / "y.m3kb")
    assert not os.path.exists(tmp_path / "y.m3kb")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_empty_database_packs_and_attaches(tmp_path, cache):
    with m3db.connect(tmp_path / "empty", spec=small_spec()) as db:
        db.pack(tmp_path / "empty.m3kb")
    assert m3db.verify(tmp_path / "empty.m3kb").ok
    with m3db.connect(tmp_path / "empty.m3kb") as p:
        assert len(p) == 0 and p.recall(np.ones(16, np.float32), k=3).ids == []


def test_many_segments(kb, tmp_path, cache, monkeypatch):
    monkeypatch.setattr(package_mod, "PACKAGE_SEGMENT_SIZE", 4000)  # a few records a segment
    with m3db.connect(kb) as db:
        manifest = db.pack(tmp_path / "many.m3kb")
        want = {i: db.get(i) for i in db.locations.ids.tolist()}
    assert manifest["counts"]["segments"] > 5
    assert m3db.verify(tmp_path / "many.m3kb").ok
    with m3db.connect(tmp_path / "many.m3kb") as p:
        assert p.check().ok
        for i, m in want.items():
            assert np.array_equal(p.get(i).keys, m.keys)


# -- verify ---------------------------------------------------------------------------------------


def test_verify_reports_damage_where_it_is(pkg):
    m = m3db.verify(pkg).manifest
    seg = next(s for s in m["sections"] if s["name"] == "segment/000001")
    data = bytearray(open(pkg, "rb").read())
    data[seg["offset"] + seg["length"] // 2] ^= 0x40
    open(pkg, "wb").write(bytes(data))
    report = m3db.verify(pkg)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "section 'segment/000001'" in text and "sha256 mismatch" in text
    assert "segment/000001 @" in text and "checksum" in text  # and the one record that holds the byte
    assert [s["ok"] for s in report.sections if s["name"] == "catalog"] == [True]


# -- attach ---------------------------------------------------------------------------------------


def test_attach_answers_like_the_database(kb, pkg, cache):
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((10, 16)).astype(np.float32)
    with m3db.connect(kb, read_only=True) as db, m3db.connect(pkg) as p:
        assert p.read_only and len(p) == len(db) == N - 2
        assert p.spec == db.spec and p.manifest["about"]["license"] == "CC-BY-4.0"
        for i in db.locations.ids.tolist():
            a, b = p.get(i), db.get(i)
            assert (a.text, a.metadata, a.document_id, a.ordinal) == (b.text, b.metadata, b.document_id, b.ordinal)
            assert np.array_equal(a.keys, b.keys) and np.array_equal(a.positions, b.positions)
        for q in queries:
            assert p.recall(q, k=5).ids == db.recall(q, k=5).ids
            assert (
                p.recall(q, k=3, where="lang = ? AND year > 1992", params=["en"]).ids
                == db.recall(q, k=3, where="lang = ? AND year > 1992", params=["en"]).ids
            )
        assert p.recall(queries[0], k=2, decode=True)[0].memory.keys.shape == (2, 2, 4, 8)
        for query in (
            "SELECT * FROM memories ORDER BY id",
            "SELECT * FROM documents ORDER BY id",
            "SELECT * FROM meta ORDER BY key",
            "SELECT * FROM codecs",
        ):
            got, want = p.sql(query), db.sql(query)
            assert got.columns == want.columns
            if "memories" in query:  # the package's locations are its own
                drop = [got.columns.index(c) for c in ("segment", "offset")]
                got = [[v for j, v in enumerate(r) if j not in drop] for r in got]
                want = [[v for j, v in enumerate(r) if j not in drop] for r in want]
            assert [list(r) for r in got] == [list(r) for r in want], query
        assert p.check().ok
        with pytest.raises(m3db.NotFoundError):
            p.get(5)  # forgotten before packing


def test_attach_is_read_only(pkg, cache):
    with m3db.connect(pkg) as p:
        for call in (lambda: p.add_memory(**make_memory(100)), lambda: p.forget(1), lambda: p.compact()):
            with pytest.raises(m3db.ReadOnlyError, match="package .* is read-only"):
                call()
        with pytest.raises(m3db.ReadOnlyError):
            p.sql("DELETE FROM memories")


def test_attach_writes_only_in_the_cache_and_does_not_read_segments(pkg, tmp_path, cache):
    # damage a record in the middle of the segment section: attach must not notice (it does
    # not read segments), and the damage shows exactly when that memory is read
    with m3db.connect(pkg, config={"cache_dir": str(tmp_path / "scratch")}) as p:
        locs = {
            int(i): (int(o), int(n))
            for i, o, n in zip(p.locations.ids, p.locations.cols["offset"], p.locations.cols["length"])
        }
    seg = next(s for s in m3db.verify(pkg).manifest["sections"] if s["name"] == "segment/000001")
    victim = 20
    off, length = locs[victim]
    data = bytearray(open(pkg, "rb").read())
    data[seg["offset"] + off + length - 3] ^= 0x01
    open(pkg, "wb").write(bytes(data))
    before, digest = tree(tmp_path, skip=cache), sha(pkg)
    with m3db.connect(pkg) as p:  # a cold cache: this open extracts
        with pytest.raises(m3db.FormatError, match=f"memory {victim} .*checksum"):
            p.get(victim)
        assert p.get(victim + 1).text == make_memory(victim + 1)["text"]
    assert tree(tmp_path, skip=cache) == before and sha(pkg) == digest  # sizes and mtimes: nothing written
    entries = os.listdir(cache / "packages")
    assert len(entries) == 1 and not entries[0].startswith(".tmp")
    assert sorted(os.listdir(cache / "packages" / entries[0])) == ["catalog.duckdb", "index.state", "index.usearch"]
    assert not m3db.verify(pkg).ok


def test_cache_dir_from_config_beats_the_environment(pkg, tmp_path, cache):
    other = tmp_path / "other-cache"
    with m3db.connect(pkg, config={"cache_dir": str(other)}) as p:
        assert p.directory.startswith(str(other))
    assert not cache.exists()
    with pytest.raises(
        m3db.InvalidInputError, match="'segment_size' and 'index_save_every' are for writing; a package is read-only"
    ):
        m3db.connect(pkg, config={"segment_size": 4096})
    with pytest.raises(m3db.InvalidInputError, match="unknown config key 'cache'"):
        m3db.connect(pkg, config={"cache": "x"})
    with m3db.connect(pkg, config={"exact_limit": 1}) as p:  # reading settings apply as to a database
        assert p._config["exact_limit"] == 1 and len(p.recall(np.ones(16, np.float32), k=2, where="lang = 'fr'")) == 2


def test_many_processes_attach_at_once(pkg, tmp_path, cache):
    code = textwrap.dedent(f"""
        import json, sys, numpy as np, m3db
        sys.stdin.readline()  # start together
        with m3db.connect({str(pkg)!r}) as p:
            q = np.random.default_rng(3).standard_normal(16).astype(np.float32)
            print(json.dumps([len(p), p.recall(q, k=5).ids]))
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, M3DB_CACHE_DIR=str(cache)),
        )
        for _ in range(4)
    ]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outs
    results = {o for o, _ in outs}
    assert len(results) == 1 and json.loads(results.pop())[0] == N - 2
    assert len(os.listdir(cache / "packages")) == 1  # one entry; the losers' copies were dropped


def test_spec_mismatch_names_both(pkg, cache):
    other = small_spec(model_fingerprint="another-model")
    with pytest.raises(
        m3db.SpecMismatchError,
        match=r"model_fingerprint: the package '.*kb.m3kb' has 'test-model', the given spec has 'another-model'",
    ):
        m3db.connect(pkg, spec=other)
    assert not cache.exists()  # refused from the manifest, before anything was extracted
    with m3db.connect(pkg, spec=small_spec()) as p:  # the matching spec is fine
        assert len(p) == N - 2


# -- several packages -------------------------------------------------------------------------------


@pytest.fixture
def two(tmp_path):
    paths = []
    for name, start in (("wiki", 0), ("news", 1000)):
        build(tmp_path / name, n=30, start=start)
        with m3db.connect(tmp_path / name) as db:
            db.pack(tmp_path / f"{name}.m3kb")
        paths.append(tmp_path / f"{name}.m3kb")
    return paths


def test_several_packages_recall_together(two, tmp_path, cache):
    rng = np.random.default_rng(11)
    with m3db.connect(two) as shelf, m3db.connect(two[0]) as wiki, m3db.connect(two[1]) as news:
        assert shelf.names == ["wiki", "news"] and len(shelf) == 60
        for q in rng.standard_normal((10, 16)).astype(np.float32):
            got = shelf.recall(q, k=6)
            # the oracle: each package's own top 6, merged by score
            pool = [(m.score, "wiki", m.id) for m in wiki.recall(q, k=6)] + [
                (m.score, "news", m.id) for m in news.recall(q, k=6)
            ]
            pool.sort(key=lambda t: (-t[0], ["wiki", "news"].index(t[1]), t[2]))
            assert got.keys == [(p, i) for _, p, i in pool[:6]]
            assert got.scores == sorted(got.scores, reverse=True)
            assert {m.package for m in got} <= {"wiki", "news"}
            assert all(d["package"] == m.package for d, m in zip(got.to_list(), got))
            for m in got:
                assert shelf.get(m.package, m.id).text == m.text
        filtered = shelf.recall(rng.standard_normal(16).astype(np.float32), k=4, where={"lang": "fr"})
        assert all(m.metadata["lang"] == "fr" for m in filtered) and len(filtered) == 4
        assert set(filtered.plan["packages"]) == {"wiki", "news"}
        with pytest.raises(m3db.NotFoundError, match="no package named 'blog'"):
            shelf.get("blog", 1)


def test_attach_names_and_spec_checks(two, tmp_path, cache):
    with m3db.attach({"a": two[0], "b": two[1]}) as shelf:
        assert shelf.names == ["a", "b"]
    os.makedirs(tmp_path / "copy")
    dup = tmp_path / "copy" / "wiki.m3kb"
    dup.write_bytes(two[0].read_bytes())
    with pytest.raises(m3db.InvalidInputError, match=r"several packages are named \['wiki'\]"):
        m3db.attach([two[0], dup])
    build(tmp_path / "other", n=5, spec=small_spec(embedder_fingerprint="other-embedder"))
    with m3db.connect(tmp_path / "other") as db:
        db.pack(tmp_path / "other.m3kb")
    with pytest.raises(
        m3db.SpecMismatchError,
        match=r"embedder_fingerprint: package 'wiki' has 'test-embedder', package 'other' has 'other-embedder'",
    ):
        m3db.attach([two[0], tmp_path / "other.m3kb"])
    with pytest.raises(m3db.InvalidInputError, match="is not an m3db package"):
        m3db.attach([two[0], tmp_path / "wiki" / "catalog.duckdb"])


def test_a_file_that_is_not_a_package_is_still_refused_as_before(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(m3db.InvalidInputError, match="is a file"):
        m3db.connect(path)


def test_header_page_is_reserved(pkg):
    data = open(pkg, "rb").read()
    assert not any(data[68:HEADER_PAGE])


# -- the command line -------------------------------------------------------------------------------


def cli(*args, cache=None):
    env = dict(os.environ, **({"M3DB_CACHE_DIR": str(cache)} if cache else {}))
    return subprocess.run(
        [sys.executable, "-m", "m3db.cli", *map(str, args)], capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_pack_info_verify(kb, tmp_path, cache):
    out = tmp_path / "cli.m3kb"
    r = cli("pack", kb, out, "--license", "MIT", "--name", "demo", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["memories"] == N - 2
    r = cli("pack", kb, out)
    assert r.returncode == 1 and "exists" in r.stderr and "--force" in r.stderr
    r = cli("info", out, "--json")
    info = json.loads(r.stdout)
    assert info["name"] == "demo" and info["license"] == "MIT" and info["memories"] == N - 2
    assert info["spec"]["model_fingerprint"] == "test-model" and len(info["sections"]) == 3
    assert not cache.exists()  # info reads the manifest only: nothing extracted
    r = cli("verify", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = cli("sql", out, "SELECT count(*) AS n FROM memories", "--json", cache=cache)
    assert r.returncode == 0 and json.loads(r.stdout)["rows"] == [[N - 2]]
    data = bytearray(out.read_bytes())
    data[len(data) // 3] ^= 0x08
    out.write_bytes(bytes(data))
    r = cli("verify", out, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False and "sha256 mismatch" in r.stdout
    out.write_bytes(b"not a package at all")
    r = cli("verify", out)
    assert r.returncode == 1 and "not an m3db package" in r.stdout


class FakeModel:
    """Just enough of a MemoryModel to bind: its spec fields."""

    def __init__(self, fingerprint):
        self.fingerprint = fingerprint

    def memory_spec_fields(self):
        fields = {
            k: v
            for k, v in small_spec().to_dict().items()
            if k not in ("embedding_dim", "embedder_fingerprint", "codec")
        }
        return dict(fields, model_fingerprint=self.fingerprint)


class FakeEmbedder:
    dim = 16
    fingerprint = "test-embedder"


def test_a_package_for_another_model_is_refused_naming_both(pkg, cache):
    with pytest.raises(
        m3db.SpecMismatchError, match="model_fingerprint: the database has 'test-model', the model gives 'other-model'"
    ):
        m3db.connect(pkg, model=FakeModel("other-model"), embedder=FakeEmbedder())
    assert not cache.exists()
    with m3db.connect(pkg, model=FakeModel("test-model"), embedder=FakeEmbedder()) as p:
        assert len(p) == N - 2


def test_stale_temporary_extractions_are_cleaned(pkg, cache):
    stale = cache / "packages" / ".tmp-killed"
    stale.mkdir(parents=True)
    old = os.stat(stale).st_mtime - 2 * 24 * 3600
    os.utime(stale, (old, old))
    fresh = cache / "packages" / ".tmp-running"
    fresh.mkdir()
    with m3db.connect(pkg):
        pass
    assert not stale.exists() and fresh.exists()


@pytest.mark.slow
def test_larger_package_round_trip_and_racing_processes(tmp_path, cache, monkeypatch):
    """A few thousand memories over several segments: deterministic, verified, and eight
    processes opening it at once with a cold cache all see the same answers."""
    monkeypatch.setattr(package_mod, "PACKAGE_SEGMENT_SIZE", 256 << 10)
    build(tmp_path / "big", n=3000)
    with m3db.connect(tmp_path / "big") as db:
        db.pack(tmp_path / "a.m3kb")
        db.pack(tmp_path / "b.m3kb")
    assert sha(tmp_path / "a.m3kb") == sha(tmp_path / "b.m3kb")
    report = m3db.verify(tmp_path / "a.m3kb")
    assert report.ok and report.memories_checked == 3000 and report.manifest["counts"]["segments"] > 4
    code = textwrap.dedent(f"""
        import json, sys, numpy as np, m3db
        sys.stdin.readline()
        with m3db.connect({str(tmp_path / "a.m3kb")!r}) as p:
            qs = np.random.default_rng(3).standard_normal((20, 16)).astype(np.float32)
            print(json.dumps([p.recall(q, k=5).ids for q in qs]))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = {proc.communicate(timeout=300)[0] for proc in procs}
    assert all(proc.returncode == 0 for proc in procs) and len(outs) == 1
    got = json.loads(outs.pop())
    qs = np.random.default_rng(3).standard_normal((20, 16)).astype(np.float32)
    with m3db.connect(tmp_path / "a.m3kb") as p:  # the same index file: the same answers
        assert got == [p.recall(q, k=5).ids for q in qs]
    # and good answers: HNSW against brute force over the stored embeddings
    emb = np.stack([make_memory(i)["embedding"] for i in range(3000)])
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    exact = [set(np.argsort(-(emb @ (q / np.linalg.norm(q))))[:5].tolist()) for q in qs]
    assert np.mean([len(set(g) & e) / 5 for g, e in zip(got, exact)]) >= 0.9


def test_progress_bars_draw_on_stderr_and_change_nothing(kb, pkg, tmp_path, capsys):
    with m3db.connect(kb) as db:
        db.pack(tmp_path / "bar.m3kb", progress=True, license="CC-BY-4.0", attribution="the m3db tests", version="1")
    assert m3db.verify(tmp_path / "bar.m3kb", progress=True).ok
    err = capsys.readouterr().err
    assert "pack" in err and "verify" in err and f"{N - 2}/{N - 2}" in err
    assert sha(tmp_path / "bar.m3kb") == sha(pkg)


def test_long_texts_split_catalog_chunks_and_huge_rows_are_refused(tmp_path, cache, monkeypatch):
    spec = small_spec()
    with m3db.connect(tmp_path / "long", spec=spec) as db:
        db.add_memories([make_memory(i, spec, text=f"{i} " + "long reference text " * 200) for i in range(12)])
        monkeypatch.setattr(package_mod, "CHUNK_BYTES", 10_000)  # ~2 rows a chunk
        db.pack(tmp_path / "long.m3kb")
        monkeypatch.setattr(package_mod, "MAX_CHUNK", 4_000)  # no row fits: refused with the fix
        with pytest.raises(
            m3db.InvalidInputError, match="memories id 0 takes .* bytes of text and metadata.*Split the text"
        ):
            db.pack(tmp_path / "huge.m3kb")
    assert not os.path.exists(tmp_path / "huge.m3kb")
    raw = (tmp_path / "long.m3kb").read_bytes()
    assert raw.count(b"\xa1t\xa8memories") > 5  # the memories went out in several chunks
    assert m3db.verify(tmp_path / "long.m3kb").ok
    with m3db.connect(tmp_path / "long.m3kb") as p:
        assert [p.get(i).text for i in range(12)] == [f"{i} " + "long reference text " * 200 for i in range(12)]


def test_the_package_does_not_depend_on_the_physical_layout(kb, tmp_path):
    """compact() moves every record; the package, made of the content alone, stays the same."""
    with m3db.connect(kb) as db:
        db.pack(tmp_path / "before.m3kb")
        moved = db.compact()
        assert moved["bytes_after"] < moved["bytes_before"]
        db.pack(tmp_path / "after.m3kb")
    assert sha(tmp_path / "before.m3kb") == sha(tmp_path / "after.m3kb")


def test_chunks_where_a_metadata_column_is_all_null(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(package_mod, "CHUNK_ROWS", 3)
    with m3db.connect(tmp_path / "kb", spec=small_spec()) as db:
        db.add_memories([make_memory(i) for i in range(6)])  # no metadata: the first two chunks are all NULL
        db.add_memories(
            [make_memory(i, metadata={"lang": "en", "n": 3, "x": 1.5, "b": True, "j": [1]}) for i in range(6, 9)]
        )
        db.pack(tmp_path / "kb.m3kb")
        want = db.sql('SELECT * EXCLUDE (segment, "offset") FROM memories ORDER BY id')
    with m3db.connect(tmp_path / "kb.m3kb") as p:
        got = p.sql('SELECT * EXCLUDE (segment, "offset") FROM memories ORDER BY id')
        assert got.columns == want.columns and [list(r) for r in got] == [list(r) for r in want]
        ids = p.recall(make_memory(7)["embedding"], k=2, where={"lang": "en"}).ids
        assert ids[0] == 7 and len(ids) == 2 and set(ids) <= {6, 7, 8}


def test_the_docs_example_runs(tmp_path, cache, monkeypatch, capsys):
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "packaging.md")).read()
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    build(tmp_path / "kb.m3db")
    for name, start in (("wiki", 0), ("news", 500)):
        build(tmp_path / name, n=10, start=start)
        with m3db.connect(tmp_path / name) as db:
            db.pack(tmp_path / f"{name}.m3kb")
    exec(compile(snippet, "docs/packaging.md", "exec"), {"vector": make_memory(3)["embedding"]})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[0].startswith("wiki 3 ")

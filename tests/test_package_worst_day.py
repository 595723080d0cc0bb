"""Packages on a bad day: packs racing for one target, a damaged extraction cache, one package
attached twice, packages that differ only in codec, and malformed arguments.

Real files throughout; a second process where the race is between processes. Each test failed
before the fix it covers (docs/packaging.md says what each guarantees)."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.package import pack as package_mod
from m3db.package import store as store_mod
from m3db.storage.index import INDEX_FILE, STATE_FILE, file_crc32

N = 12


def build(path, n=N, start=0, spec=None):
    spec = spec or small_spec()
    with m3db.connect(path, spec=spec) as db:
        db.add_memories(
            [make_memory(i, spec, metadata={"lang": "en" if i % 2 else "fr"}) for i in range(start, start + n)]
        )
    return path


def packed(tmp_path, name, start=0, spec=None):
    """A database `name` and its package `name.m3kb` beside it: (database path, package path)."""
    db_path = build(tmp_path / name, start=start, spec=spec)
    with m3db.connect(db_path) as db:
        db.pack(tmp_path / f"{name}.m3kb")
    return db_path, tmp_path / f"{name}.m3kb"


def temporaries(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Every attach in a test extracts into this directory (never the user's cache)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("M3DB_CACHE_DIR", str(path))
    return path


# -- packs racing for one target ------------------------------------------------------------------


def test_two_threads_packing_one_target_install_one_whole_package(tmp_path, monkeypatch):
    a_db, a_pkg = packed(tmp_path, "a")
    b_db, b_pkg = packed(tmp_path, "b", start=500)
    wanted = {a_pkg.read_bytes(), b_pkg.read_bytes()}
    assert len(wanted) == 2
    out = tmp_path / "out" / "kb.m3kb"
    out.parent.mkdir()
    # both packs inside their writing at once, each with its temporary file open: the schedule
    # under which one shared temporary name mixed the two packages
    both_writing = threading.Barrier(2, timeout=60)
    real = package_mod._write_sections

    def write_sections(*args):
        both_writing.wait()
        return real(*args)

    monkeypatch.setattr(package_mod, "_write_sections", write_sections)
    errors = []

    def run(db_path):
        try:
            with m3db.connect(db_path, read_only=True) as db:
                db.pack(out, overwrite=True)
        except BaseException as e:  # reported below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in (a_db, b_db)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    report = m3db.verify(out)
    assert report.ok, report.problems
    assert out.read_bytes() in wanted
    assert temporaries(out.parent) == []
    umask = os.umask(0o022)
    os.umask(umask)
    # created exclusively, yet with the permissions any new file gets (not mkstemp's 0600)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask


def test_a_package_installed_while_packing_is_kept_without_overwrite(tmp_path, monkeypatch):
    a_db, _ = packed(tmp_path, "a")
    b_db, b_pkg = packed(tmp_path, "b", start=500)
    out = tmp_path / "out.m3kb"
    real = package_mod._write_sections

    def write_sections(*args):
        # another process packs to the target after this pack checked it was free
        code = f"import m3db; m3db.connect({str(b_db)!r}, read_only=True).pack({str(out)!r})"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        return real(*args)

    monkeypatch.setattr(package_mod, "_write_sections", write_sections)
    with m3db.connect(a_db, read_only=True) as db:
        with pytest.raises(m3db.InvalidInputError, match=r"exists.*pass overwrite=True \(or --force\)"):
            db.pack(out)
    assert out.read_bytes() == b_pkg.read_bytes()  # the other process's package, untouched
    assert m3db.verify(out).ok
    assert temporaries(tmp_path) == []


def test_without_hard_links_a_pack_still_installs_and_refuses_an_existing_file(tmp_path, monkeypatch):
    a_db, a_pkg = packed(tmp_path, "a")

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")  # EPERM: what a FAT or SMB mount answers

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "out.m3kb"
    with m3db.connect(a_db, read_only=True) as db:
        db.pack(out)
        assert out.read_bytes() == a_pkg.read_bytes()
        with pytest.raises(m3db.InvalidInputError, match="exists; pass overwrite=True"):
            db.pack(out)
    assert temporaries(tmp_path) == []


def test_leftover_temporaries_of_both_namings_are_removed_and_live_ones_kept(tmp_path):
    db_path = build(tmp_path / "kb")
    target = tmp_path / "kb.m3kb"
    dead_new = tmp_path / "kb.m3kb.tmp-999999999-0123456789abcdef"  # no such process
    dead_old = tmp_path / "kb.m3kb.tmp-999999999"  # the naming before unique temporaries
    mine = tmp_path / f"kb.m3kb.tmp-{os.getpid()}-00000000deadbeef"  # ours, but no pack is writing it
    live = tmp_path / f"kb.m3kb.tmp-{os.getppid()}-00000000cafef00d"  # a live process's pack
    other = tmp_path / "kb.m3kb.tmp-notes"  # not a pack's name
    for p in (dead_new, dead_old, mine, live, other):
        p.write_bytes(b"half a package")
    with m3db.connect(db_path) as db:
        db.pack(target)
    assert not dead_new.exists() and not dead_old.exists() and not mine.exists()
    assert live.exists() and other.exists() and m3db.verify(target).ok


# -- a damaged extraction cache ---------------------------------------------------------------------


def _entry(cache):
    (entry,) = glob.glob(str(cache / "packages" / "*-catalog*"))
    return entry


def _damage(path, how):
    if how == "delete":
        os.remove(path)
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:  # flip a byte in the middle
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(
    "name, how",
    [
        ("catalog.duckdb", "delete"),
        ("catalog.duckdb", "truncate"),
        (INDEX_FILE, "flip"),
        (INDEX_FILE, "delete"),
        (STATE_FILE, "delete"),
    ],
)
def test_a_damaged_cache_entry_is_extracted_again(tmp_path, cache, name, how):
    _, pkg = packed(tmp_path, "kb")
    q = np.random.default_rng(5).standard_normal(16).astype(np.float32)
    with m3db.connect(pkg) as p:
        expected = p.recall(q, k=4).ids
    entry = _entry(cache)
    _damage(os.path.join(entry, name), how)
    # a new process, as every later run of a program would be
    code = textwrap.dedent(f"""
        import json, numpy as np, m3db
        with m3db.connect({str(pkg)!r}) as p:
            q = np.random.default_rng(5).standard_normal(16).astype(np.float32)
            report = p.check()
            print(json.dumps([len(p), p.recall(q, k=4).ids, report.ok, p.sql("SELECT count(*) FROM memories")]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [N, expected, True, [[N]]]
    assert _entry(cache) == entry  # the same entry name, extracted afresh
    with open(os.path.join(entry, STATE_FILE)) as f:
        assert file_crc32(os.path.join(entry, INDEX_FILE)) == json.load(f)["crc32"]
    assert not [n for n in os.listdir(cache / "packages") if n.startswith(".tmp-")]  # the damaged copy is gone
    assert m3db.verify(pkg).ok


def test_a_damaged_entry_is_replaced_while_another_connection_reads_it(tmp_path, cache):
    _, pkg = packed(tmp_path, "kb")
    with m3db.connect(pkg) as first:
        before = first.sql("SELECT id FROM memories ORDER BY id")
        _damage(os.path.join(_entry(cache), INDEX_FILE), "flip")
        with m3db.connect(pkg) as second:
            assert second.check().ok and len(second) == N
        # the first connection's files were renamed and deleted under it: still readable (POSIX)
        assert first.sql("SELECT id FROM memories ORDER BY id") == before
        assert first.get(before[0][0]).text


def test_the_cache_dir_from_config_is_repaired_too(tmp_path, cache):
    _, pkg = packed(tmp_path, "kb")
    other = tmp_path / "other-cache"
    with m3db.connect(pkg, config={"cache_dir": str(other)}):
        pass
    (entry,) = glob.glob(str(other / "packages" / "*-catalog*"))
    shutil.rmtree(entry)
    os.makedirs(entry)  # an emptied entry: a cleaner deleted its files, not the directory
    with m3db.connect(pkg, config={"cache_dir": str(other)}) as p:
        assert len(p) == N and p.check().ok
    assert not cache.exists()


def test_an_entry_that_fails_when_fresh_is_an_error_not_a_loop(tmp_path, cache, monkeypatch):
    _, pkg = packed(tmp_path, "kb")
    real = store_mod._extract
    calls = []

    def extract_badly(where, mm, frame, entry):  # a disk that damages what is written to it
        calls.append(entry)
        real(where, mm, frame, entry)
        _damage(os.path.join(entry, INDEX_FILE), "flip")

    monkeypatch.setattr(store_mod, "_extract", extract_badly)
    with pytest.raises(m3db.FormatError, match=f"freshly extracted cache entry .* holds an {INDEX_FILE} that does"):
        m3db.connect(pkg)
    assert len(calls) == 1
    monkeypatch.setattr(store_mod, "_extract", real)
    with m3db.connect(pkg) as p:  # the next open replaces the damaged entry
        assert p.check().ok


# -- attaching: one package twice, codecs, arguments ---------------------------------------------


def test_one_package_attached_twice_is_refused_naming_both(tmp_path, cache):
    _, pkg = packed(tmp_path, "a")
    _, other = packed(tmp_path, "b", start=500)
    with pytest.raises(
        m3db.InvalidInputError, match=r"packages 'x' \(.*a\.m3kb'\) and 'y' \(.*a\.m3kb'\) are the same"
    ):
        m3db.connect({"x": str(pkg), "y": str(pkg)})
    os.link(pkg, tmp_path / "linked.m3kb")
    with pytest.raises(m3db.InvalidInputError, match="'a' .* and 'linked' .* are the same file"):
        m3db.connect([pkg, tmp_path / "linked.m3kb"])
    shutil.copyfile(pkg, tmp_path / "copy.m3kb")
    with pytest.raises(m3db.InvalidInputError, match="'a' .* and 'copy' .* are copies of one package"):
        m3db.connect([pkg, other, tmp_path / "copy.m3kb"])
    with m3db.connect({"x": pkg, "y": other}) as shelf:  # two packages: every match once
        keys = shelf.recall(np.ones(16, np.float32), k=2 * N).keys
        assert len(keys) == len(set(keys)) == 2 * N


def test_packages_differing_only_in_codec_name_the_codecs_and_the_fix(tmp_path, cache):
    _, a = packed(tmp_path, "a")  # int8
    b_db, b = packed(tmp_path, "b", start=500, spec=small_spec(codec="f32"))
    with pytest.raises(m3db.SpecMismatchError) as caught:
        m3db.connect([a, b])
    message = str(caught.value)
    assert "package 'a' stores its memories in codec 'int8', package 'b' in 'f32'" in message
    assert "`m3db recompress DB --codec int8`" in message and "reencode" not in message
    # the advice works: recompress b's database to int8, pack again, and the two attach
    env = dict(os.environ, M3DB_CACHE_DIR=str(cache))
    for args in (["recompress", b_db, "--codec", "int8"], ["pack", b_db, b, "--force"]):
        r = subprocess.run(
            [sys.executable, "-m", "m3db.cli", *map(str, args)], capture_output=True, text=True, timeout=120, env=env
        )
        assert r.returncode == 0, r.stderr
    with m3db.connect([a, b]) as shelf:
        assert len(shelf) == 2 * N and shelf.get("b", shelf.recall(np.ones(16, np.float32), k=1).ids[0]) is not None


def test_a_model_difference_still_advises_reencoding(tmp_path, cache):
    _, a = packed(tmp_path, "a")
    _, b = packed(tmp_path, "b", spec=small_spec(codec="f32", model_fingerprint="other-model"))
    with pytest.raises(m3db.SpecMismatchError, match="model_fingerprint: package 'a' has 'test-model'.*reencode"):
        m3db.connect([a, b])


def test_an_entry_that_is_not_a_path_is_named(tmp_path, cache):
    _, pkg = packed(tmp_path, "a")
    with pytest.raises(m3db.InvalidInputError, match=r"entry 1 is None \(NoneType\), not a package path"):
        m3db.connect([pkg, None])
    with pytest.raises(m3db.InvalidInputError, match=r"the entry 'y' is 3 \(int\), not a package path"):
        m3db.connect({"x": pkg, "y": 3})
    with pytest.raises(m3db.InvalidInputError, match="entry 1: path is empty"):
        m3db.attach([pkg, ""])
    with pytest.raises(m3db.InvalidInputError, match=r"entry 0 is b'a\.m3kb' \(bytes\)"):
        m3db.attach([b"a.m3kb"])
    assert not cache.exists()  # refused before anything was opened


def test_a_packages_config_error_lists_what_a_package_takes(tmp_path, cache):
    _, pkg = packed(tmp_path, "a")
    takes = r"\['cache_bytes', 'cache_dir', 'exact_limit', 'expansion_search'\]"
    with pytest.raises(m3db.InvalidInputError, match=f"unknown config key 'bogus'; a package takes {takes}"):
        m3db.connect(pkg, config={"bogus": 1})
    with pytest.raises(m3db.InvalidInputError, match=f"a package is read-only. A package takes {takes}"):
        m3db.connect(pkg, config={"index_save_every": 10})
    with pytest.raises(m3db.InvalidInputError, match="config must be a dict, got list"):
        m3db.connect(pkg, config=[("exact_limit", 1)])
    with m3db.connect(pkg, config={"cache_dir": str(tmp_path / "c"), "cache_bytes": 1 << 20}) as p:
        assert len(p) == N

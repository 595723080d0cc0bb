"""The damage sweep (SQLite's way): every file of a closed database and a package is flipped,
zeroed, truncated, deleted or swapped with another database's, then opened and used in a
subprocess (tests/damage_worker.py). Each trial must end correct (every answer equal to the
undamaged one), with a clean m3db error, or rebuilt (an error that names `m3db check --repair`,
after which every answer is correct): never a crash, a hang, a raw exception or a wrong
answer. A few trials per file by default; M3DB_SLOW=1 runs many more."""

import collections
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW = os.environ.get("M3DB_SLOW") == "1"
N = 60
FILES = (
    "catalog.duckdb",
    "index.usearch",
    "index.state",
    "segments/000001.seg",
    "lock",
    "spec.json",
    "forgotten.log",
)


def build(path, seed):
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memories([make_memory(seed * 1000 + i, metadata={"n": i}) for i in range(N)])
        db.forget([1, 2])
        ids = sorted(db.locations.ids.tolist())
        query = make_memory(seed * 1000 + 7)["embedding"]
        top = db.recall(query, k=5, where="id >= 0").ids
    return {"ids": ids, "query": query.tolist(), "top": top}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    expected = build(root / "kb", 0)
    build(root / "other", 1)  # the files swapped in
    with m3db.connect(root / "kb", read_only=True) as db:
        db.pack(root / "kb.m3kb")
    return root, expected


def damage(path, how, rng, other=None):
    size = os.path.getsize(path)
    if how == "delete":
        os.remove(path)
    elif how == "swap":
        shutil.copyfile(other, path)
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(rng.randrange(size) if size else 0)
    elif size:
        with open(path, "r+b") as f:
            start = rng.randrange(size)
            f.seek(start)
            if how == "flip":
                byte = f.read(1)
                f.seek(start)
                f.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
            else:  # "zero": a range of zeros, as a lost page reads back
                f.write(bytes(min(rng.choice((16, 100, 4096)), size - start)))
    return how


def run_worker(path, expected, cache):
    env = dict(os.environ, M3DB_CACHE_DIR=str(cache))
    try:
        r = subprocess.run(
            [sys.executable, os.path.join(HERE, "damage_worker.py"), str(path), json.dumps(expected)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return [("hang", "no answer in 60 s")]
    if r.returncode != 0:
        return [("crash", f"exit {r.returncode}: {r.stderr[-300:]}")]
    return [tuple(o) for o in json.loads(r.stdout.strip().splitlines()[-1])]


def sweep(originals, tmp_path, trials):
    root, expected = originals
    rng = random.Random(13)
    counts, bad = collections.Counter(), []
    for t, (target, how) in enumerate(trials):
        trial = tmp_path / f"t{t}"
        if target == "package":
            trial.mkdir()
            path = trial / "kb.m3kb"
            shutil.copyfile(root / "kb.m3kb", path)
            damage(path, how, rng, other=root / "kb.m3kb")
        else:
            shutil.copytree(root / "kb", trial / "kb")
            path = trial / "kb"
            damage(path / target, how, rng, other=root / "other" / target)
        for outcome, detail in run_worker(path, expected, trial / "cache"):
            counts[(target, how, outcome)] += 1
            if outcome not in ("correct", "error", "rebuilt"):
                bad.append(f"{target} {how}: {outcome}: {detail}")
    return counts, bad


def trials(per_file):
    out = []
    for target in FILES:
        for how in ("flip", "zero"):
            out += [(target, how)] * per_file
        out += [(target, "truncate"), (target, "delete"), (target, "swap")]
    out += [("package", "flip")] * (2 * per_file) + [("package", "zero")] * per_file + [("package", "truncate")]
    return out


def test_damage_never_crashes_hangs_raises_raw_or_answers_wrong(originals, tmp_path):
    counts, bad = sweep(originals, tmp_path, trials(8 if SLOW else 2))
    summary = "\n".join(f"{t} {h}: {o} x{n}" for (t, h, o), n in sorted(counts.items()))
    print(summary)
    assert not bad, "\n".join(bad)
    # the sweep is only worth something if damage was seen, and if undamaged paths still work
    assert any(o == "error" for (_, _, o) in counts) and any(o == "correct" for (_, _, o) in counts)


def test_the_worker_sees_an_undamaged_database_as_correct(originals, tmp_path):
    root, expected = originals
    shutil.copytree(root / "kb", tmp_path / "kb")
    assert run_worker(tmp_path / "kb", expected, tmp_path / "cache") == [("correct", ""), ("correct", "")]
    assert run_worker(root / "kb.m3kb", expected, tmp_path / "cache") == [("correct", "")]
    wrong = dict(expected, top=list(reversed(expected["top"])))
    assert run_worker(tmp_path / "kb", wrong, tmp_path / "cache")[0][0] == "wrong"
    assert np.isfinite(expected["query"]).all()


def test_another_databases_index_files_are_found(originals, tmp_path, monkeypatch):
    """Both index files of another database copied in (their state agrees with itself, and the
    commit and count match): an open compares a few vectors with the catalog's embeddings and
    rebuilds the index; check() compares them all."""
    root, expected = originals
    shutil.copytree(root / "kb", tmp_path / "kb")
    for name in ("index.usearch", "index.state"):
        shutil.copyfile(root / "other" / name, tmp_path / "kb" / name)
    query = np.asarray(expected["query"], np.float32)
    with m3db.connect(tmp_path / "kb", read_only=True) as db:
        assert db.recall(query, k=5, where="id >= 0").ids == expected["top"] and db.check().ok
    monkeypatch.setattr(m3db.storage.store, "INDEX_PROBES", 0)  # an open that compares none
    with m3db.connect(tmp_path / "kb", read_only=True) as db:
        report = db.check()
    assert not report.ok and "the index's vectors differ from the catalog's embeddings" in report.problems[0]
    monkeypatch.undo()
    with m3db.connect(tmp_path / "kb") as db:  # a writable open rebuilds the index and saves it
        assert db.check().ok
    with m3db.connect(tmp_path / "kb", read_only=True) as db:
        assert db.check().ok

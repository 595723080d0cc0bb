"""`m3db merge` is idempotent: a second run, or the rerun of a killed one, adds nothing the target
holds already, memories without a document included (issue 32), and copies whole what it lacks.

Real databases and real `m3db merge` processes; memories come from fixed seeds (conftest)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.cli import main
from m3db.package.merge import _commits

SPEC = small_spec()


def build(path, commits):
    """A database of `commits`: lists of (seed, document source or None)."""
    with m3db.connect(path, spec=SPEC) as db:
        for commit in commits:
            db.add_memories([make_memory(seed, SPEC, document=doc, metadata={"n": seed}) for seed, doc in commit])
    return path


# a knowledge base as the engine API makes one: memories with no document (one of them added
# twice, in two commits: two copies, on purpose) and a commit with documents
A = [[(0, None), (1, None), (2, None)], [(3, None)], [(4, "doc/x"), (5, "doc/y")], [(3, None)]]
B = [[(10, None)], [(11, None), (12, "doc/z")]]
# a document that grew over two commits (add_memory(document=...), or a sync that re-encoded one
# of its chunks)
GROWN = [[(13, "doc/w"), (14, "doc/v")], [(15, "doc/w")]]


def dump(path):
    """Every memory's id, text, document, metadata and commit number, and its stored embedding."""
    with m3db.connect(path, read_only=True) as db:
        assert db.check().ok
        rows = db.sql(
            "SELECT m.id, m.text, d.source, m.n, m.commit_seq, m.embedding FROM memories m "
            "LEFT JOIN documents d ON d.id = m.document_id ORDER BY m.id"
        )
        return [(*r[:5], np.asarray(r[5], np.float32).tobytes()) for r in rows]


def texts(path):
    return sorted(r[1] for r in dump(path))


def merge(target, *sources, capsys=None):
    assert main(["merge", str(target), "--from", *map(str, sources), "--json"]) == 0
    return json.loads(capsys.readouterr().out) if capsys else None


@pytest.fixture
def sources(tmp_path):
    return build(tmp_path / "a", A), build(tmp_path / "b", B)


def test_a_second_merge_adds_nothing_memories_without_documents_included(tmp_path, sources, capsys):
    a, b = sources
    target = tmp_path / "t"
    first = merge(target, a, b, capsys=capsys)
    assert first == {"memories_added": 10, "commits_added": 6, "commits_skipped": 0, "memories_total": 10}
    once = dump(target)
    assert texts(target) == sorted(texts(a) + texts(b))  # a's two copies of seed 3 too
    second = merge(target, a, b, capsys=capsys)
    assert second == {"memories_added": 0, "commits_added": 0, "commits_skipped": 6, "memories_total": 10}
    assert dump(target) == once
    merge(target, b, capsys=capsys)  # one source again, alone
    assert dump(target) == once


def test_a_document_that_grew_over_several_commits_is_copied_whole(tmp_path, capsys):
    grown = build(tmp_path / "grown", GROWN)
    target = tmp_path / "t"
    assert merge(target, grown, capsys=capsys)["memories_added"] == 3
    with m3db.connect(target, read_only=True) as db:
        rows = db.sql("SELECT d.source, count(*) FROM memories m JOIN documents d ON d.id = m.document_id GROUP BY 1")
        assert sorted(rows) == [("doc/v", 1), ("doc/w", 2)]
    assert texts(target) == texts(grown)
    assert merge(target, grown, capsys=capsys)["memories_added"] == 0
    # its documents, come from another source, still skip a commit of them (as before)
    assert merge(target, build(tmp_path / "other", [[(7, "doc/w")]]), capsys=capsys)["commits_skipped"] == 1
    assert texts(target) == texts(grown)


def test_a_merged_database_merged_again_adds_only_what_the_target_lacks(tmp_path, sources, capsys):
    a, b = sources
    both = tmp_path / "both"
    merge(both, a, b, capsys=capsys)
    # the same source into two targets: each gets it whole
    only_a = tmp_path / "only-a"
    merge(only_a, a, capsys=capsys)
    assert texts(only_a) == texts(a)
    # a source that is itself a merge: the commits that came from `a` are held already
    report = merge(only_a, both, capsys=capsys)
    assert report["memories_added"] == 3 and report["commits_skipped"] == 4, report
    assert texts(only_a) == texts(both)
    # and the original sources after it: nothing new
    assert merge(only_a, a, b, capsys=capsys)["memories_added"] == 0
    assert texts(only_a) == texts(both)


def test_identical_commits_of_two_sources_give_one_copy_identical_memories_in_others_stay(tmp_path, capsys):
    # `c` holds a's second commit (seed 3, no document) as its own commit, and seed 0 in a commit
    # that differs from any of a's: the first is the same commit (one copy, as a document of one
    # source is copied once), the second another memory that says the same (copied)
    a = build(tmp_path / "a", A)
    c = build(tmp_path / "c", [[(3, None)], [(0, None), (20, None)]])
    target = tmp_path / "t"
    report = merge(target, a, c, capsys=capsys)
    assert report["commits_skipped"] == 1 and report["memories_added"] == 7 + 2, report
    counts = {t: texts(target).count(t) for t in set(texts(target))}
    assert counts["reference text number 3"] == 2  # a's two copies; c's copy is one of them
    assert counts["reference text number 0"] == 2  # a's and c's (other commits)


def test_a_target_merged_by_an_older_m3db_is_recognised(tmp_path, sources, capsys):
    """What a merge writes has not changed (no log, no new table): a target an older merge made,
    one add_memories commit per source commit, is read the same way, and a rerun adds nothing.
    Here with ids of its own, not a run (as add_memories(id=...) gives them)."""
    a, _ = sources
    target = tmp_path / "t"
    with m3db.connect(a, read_only=True) as src, m3db.connect(target, spec=SPEC) as db:
        for c, items in enumerate(_commits("a", src)):
            db.add_memories([dict(item, id=100 * c + 2 * k) for k, item in enumerate(items)])
    before = dump(target)
    assert merge(target, a, capsys=capsys)["memories_added"] == 0
    assert dump(target) == before


# a real `m3db merge` process with every durable step of a commit trapped: it kills itself at
# step K (kill_points.py)
WORKER = r"""
import sys
sys.path.insert(0, sys.argv[3])
from kill_points import arm, calls, trap
from m3db.storage.catalog import Catalog
from m3db.storage.segment import SegmentStore
arm(int(sys.argv[4]), sys.argv[5])
for owner, name in [(SegmentStore, "append"), (SegmentStore, "sync"), (Catalog, "begin"),
                    (Catalog, "insert_memories"), (Catalog, "insert_document"), (Catalog, "commit")]:
    trap(owner, name)
from m3db.cli.main import main
rc = main(["merge", sys.argv[1], "--from", *sys.argv[2].split(","), "--json"])
print(" ".join(calls), file=sys.stderr, flush=True)
sys.exit(rc)
"""


def run_merge(target, sources, kill_at, when="before"):
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, "-c", WORKER, str(target), ",".join(map(str, sources)), here, str(kill_at), when]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stderr.strip().splitlines()[-1].split() if proc.stderr.strip() else []


def test_a_killed_merge_rerun_holds_exactly_one_copy_of_every_memory(tmp_path, sources):
    merged = (*sources, build(tmp_path / "grown", GROWN))
    clean = tmp_path / "clean"
    rc, calls = run_merge(clean, merged, 0)
    assert rc == 0 and calls.count("commit") == 8, calls
    want = dump(clean)
    commits = [i + 1 for i, c in enumerate(calls) if c == "commit"]
    if os.environ.get("M3DB_SLOW") == "1":
        points = [(k, when) for k in range(1, len(calls) + 1) for when in ("before", "after")]
    else:  # the first commit's record, fsync and commit; the commits of a memory's two copies, of b,
        # and of the grown document's first part
        steps = (1, calls.index("sync") + 1, commits[0], commits[1], commits[3], commits[4], commits[6])
        points = [(k, when) for k in steps for when in ("before", "after")]
    for k, when in points:
        trial = tmp_path / f"trial-{k}-{when}"
        rc, _ = run_merge(trial, merged, k, when)
        assert rc == -signal.SIGKILL, (k, when, rc)
        assert main(["merge", str(trial), "--from", *map(str, merged)]) == 0, (k, when)
        assert dump(trial) == want, (k, when)
        shutil.rmtree(trial)

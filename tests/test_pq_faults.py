"""SIGKILL during recompress (maintenance.recompress): a real process re-encoding a database
into pq is killed at chosen points (before or after each segment append, fsync, catalog step,
file replace and segment removal); every reopen shows exactly the old state or the new one,
never a mix, with check() clean."""

import os
import shutil
import signal
import subprocess
import sys

import msgpack
import numpy as np
from test_pq import make_db

import m3db
from m3db.storage import maintenance

# the worker: load the trained codec, wrap the steps of recompress, kill itself at call K
WORKER = r"""
import os, signal, sys
import m3db
from m3db.storage import maintenance, store as store_module
from m3db.storage.catalog import Catalog
from m3db.storage.codec import load_codec
from m3db.storage.segment import SegmentStore

path, params, kill_at, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
codec = load_codec("pq", open(params, "rb").read())
sys.path.insert(0, sys.argv[5])
from kill_points import arm, calls, trap
arm(kill_at, when)

with m3db.connect(path) as db:
    for owner, name in [(SegmentStore, "append"), (SegmentStore, "sync"), (SegmentStore, "new_segment"),
                        (SegmentStore, "remove"), (Catalog, "begin"), (Catalog, "replace_codec"),
                        (Catalog, "relocate_memories"), (Catalog, "set_meta"), (Catalog, "commit"),
                        (maintenance, "replace_file"), (store_module, "replace_file")]:
        trap(owner, name)
    maintenance.recompress(db.store, codec)
    print(" ".join(calls), flush=True)
"""


TESTS = os.path.dirname(os.path.abspath(__file__))  # where the worker finds kill_points.py


def run_worker(path, params, kill_at, when):
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(path), str(params), str(kill_at), when, TESTS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout.split()


def test_sigkill_during_recompress_leaves_the_old_or_the_new_state(tmp_path):
    pristine = tmp_path / "pristine"
    db = make_db(pristine, n=130)
    codec = maintenance.train(db.store, "pq", sample=130)
    old = {i: (db.get(i).keys.copy(), db.get(i).values.copy()) for i in range(130)}
    db.close()
    new = {
        i: (
            codec.decode(codec.encode(k), k.shape),
            codec.decode(codec.encode(v, part="values"), v.shape, part="values"),
        )
        for i, (k, v) in old.items()
    }
    params = tmp_path / "codebook.bin"
    params.write_bytes(msgpack.packb(codec.params(), use_bin_type=True))
    clean = tmp_path / "clean"
    shutil.copytree(pristine, clean)
    rc, calls = run_worker(clean, params, 0, "never")
    assert rc == 0 and calls.count("append") == 130 and "commit" in calls, calls
    # every step that is not a record append, and a few appends: before and after each
    rng = np.random.default_rng(18)
    appends = [i + 1 for i, c in enumerate(calls) if c == "append"]
    points = [i + 1 for i, c in enumerate(calls) if c != "append"] + sorted(rng.choice(appends, 3, replace=False))
    if os.environ.get("M3DB_SLOW") != "1":
        commit = calls.index("commit") + 1
        points = sorted({1, commit - 1, commit, commit + 1, len(calls), int(rng.choice(appends))})
    seen = set()
    for k in points:
        for when in ("before", "after"):
            trial = tmp_path / f"trial-{k}-{when}"
            shutil.copytree(pristine, trial)
            rc, _ = run_worker(trial, params, k, when)
            assert rc == -signal.SIGKILL, (k, when, rc)
            with m3db.connect(trial) as db:
                state = db.spec.codec
                seen.add(state)
                assert state in ("int4", "pq"), state
                assert {r[0] for r in db.sql("SELECT DISTINCT codec FROM memories")} == {state}, (k, when)
                want = old if state == "int4" else new
                for i, (keys, values) in want.items():
                    m = db.get(i)
                    assert np.array_equal(m.keys, keys) and np.array_equal(m.values, values), (k, when, i)
                report = db.check()
                assert report.ok, (k, when, report.problems)
            shutil.rmtree(trial)
    assert seen == {"int4", "pq"}  # the points straddle the commit

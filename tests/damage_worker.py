"""Open a (damaged) database or package and use it; print one JSON line saying how it went.

Run by tests/test_damage.py in a subprocess of its own, so a crash (a signal) or a hang fails
the test instead of killing pytest. Usage: damage_worker.py PATH EXPECTED_JSON
EXPECTED_JSON: {"ids": [all memory ids], "query": [vector], "top": [exact top-5 ids]}.
Outcomes: "correct" (every answer equals the undamaged one), "error" (a clean m3db error),
"rebuilt" (the error named `m3db check --repair`, and after it every answer is correct),
"wrong" (an answer differs and nothing said so), "raw" (a non-m3db exception).
"""

import json
import sys

import numpy as np

import m3db


def use(path, expected, read_only):
    query = np.asarray(expected["query"], np.float32)
    with m3db.connect(path, read_only=read_only) as db:
        if sorted(db.locations.ids.tolist()) != expected["ids"]:
            return "wrong", "the memory ids differ"
        exact = db.recall(query, k=5, where="id >= 0")  # an allowed set this small is searched exactly
        if exact.ids != expected["top"]:
            return "wrong", f"exact recall gave {exact.ids}, expected {expected['top']}"
        ann = db.recall(query, k=5)
        if not set(ann.ids) <= set(expected["ids"]) or not np.isfinite(ann.scores).all():
            return "wrong", f"ANN recall gave ids {ann.ids} scores {ann.scores}"
        for memory in db.get_many(expected["ids"]):
            if memory.keys is None or not np.isfinite(memory.keys).all():
                return "wrong", f"memory {memory.id} decoded to bad arrays"
        report = db.check()
        return ("correct", "") if report.ok else ("error", "check: " + "; ".join(report.problems)[:300])


def judged(fn, *args):
    try:
        return fn(*args)
    except m3db.M3DBError as e:
        return "error", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - the very thing this worker reports
        return "raw", f"{type(e).__module__}.{type(e).__name__}: {e}"


def repaired(path, expected):
    """What `m3db check --repair` does for a catalog that cannot be opened: rebuild, then use."""
    m3db.repair(path)
    outcome, detail = use(path, expected, False)
    return ("rebuilt", "") if outcome == "correct" else (outcome, f"after repair: {detail}")


def main():
    path, expected = sys.argv[1], json.loads(sys.argv[2])
    outcomes = []
    for read_only in (True, False) if not path.endswith(".m3kb") else (True,):
        outcomes.append(judged(use, path, expected, read_only))
    last, detail = outcomes[-1]
    if not path.endswith(".m3kb") and last == "error" and "catalog" in detail and "repair" in detail:
        outcomes.append(judged(repaired, path, expected))  # the error named the repair: it must work
    print(json.dumps([(outcome, detail[:300]) for outcome, detail in outcomes]))


if __name__ == "__main__":
    main()

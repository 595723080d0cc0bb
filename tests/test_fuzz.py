"""Coverage-guided fuzzing (atheris) of every parser of bytes a user can hand m3db: the targets in
tests/fuzz/ (docs/fuzzing.md). Each target runs in a process of its own (atheris owns the
process) for a few seconds here, up to a minute each under M3DB_SLOW=1; and the committed
corpus, the inputs of every finding fixed so far among them, replays here as a regression test.

The runs here are reproducible: a fixed seed and, for the long ones, a fixed number of inputs
(what a minute reaches on a loaded 2-core machine), so a test run that passed passes again on the
same code, whatever the machine's speed. Exploring is the long runs' job (docs/fuzzing.md, "The
long runs": hours per target, random seeds), and what they find lands in the corpus, which every
run here replays."""

import importlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("atheris")

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.join(HERE, "fuzz")
TARGETS = ("record", "segment", "pq", "spec", "index_state", "forgotten", "package", "catalog", "adapter", "sql")
SHORT_S = 2  # per target: with its start, the ten take about 40 s here
LONG_S = 60  # the long run's ceiling; it stops first at LONG_RUNS inputs
SEED = 7
# inputs per target in the long run: about what a minute reaches with the machine shared
# (each verified to its full count, seed 7, 0 findings: 14-81 s on an "Intel(R) Xeon(R) Processor",
# 2 vCPUs, AVX-512, shared; docs/fuzzing.md)
LONG_RUNS = {
    "record": 300_000,
    "segment": 50_000,
    "pq": 100_000,
    "spec": 100_000,
    "index_state": 150_000,
    "forgotten": 250_000,
    "package": 60_000,
    "catalog": 150_000,
    "adapter": 50_000,
    "sql": 50_000,
}
NEEDS = {"adapter": "torch"}  # a target's parser needs an extra


def fuzz_module(name):
    """tests/fuzz/<name>.py, imported (its folder is where the targets import the harness from)."""
    if FUZZ not in sys.path:
        sys.path.insert(0, FUZZ)
    return importlib.import_module(name)


def fuzz(name, seconds, tmp_path, runs=None):
    """Run target `name` for `seconds` (or `runs` inputs, if fewer), from a fixed seed; fail with
    libFuzzer's report and the crashing input."""
    if NEEDS.get(name):
        pytest.importorskip(NEEDS[name])
    findings = tmp_path / "findings"
    findings.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", M3DB_FUZZ_TMP=str(tmp_path))
    command = [sys.executable, os.path.join(FUZZ, f"fuzz_{name}.py"), f"-max_total_time={seconds}", f"-seed={SEED}"]
    command += [f"-runs={runs}"] if runs else []
    # -rss_limit_mb=0: libFuzzer reads the peak RSS, which Linux carries across exec from the
    # forked parent (a pytest process that loaded models reports gigabytes at the target's first
    # input); the harness's RLIMIT_AS bounds the target's memory instead
    command += [f"-artifact_prefix={findings}{os.sep}", "-print_final_stats=1", "-rss_limit_mb=0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    report = done.stderr[-6000:]
    crashes = sorted(p.name for p in findings.iterdir())
    assert done.returncode == 0 and not crashes, f"fuzz_{name}: exit {done.returncode}, {crashes}\n{report}"
    assert "Done" in report, report


@pytest.mark.parametrize("name", TARGETS)
def test_committed_corpus_and_seeds_parse_as_documented(name):
    if NEEDS.get(name):
        pytest.importorskip(NEEDS[name])
    t = fuzz_module(f"fuzz_{name}").TARGET
    assert t.name == name
    failures = fuzz_module("harness").replay(t)
    assert not failures, "\n".join(f"{path}:\n{tb}" for path, tb in failures)
    for data in t.seeds():
        t.run_one(data)


@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_briefly(name, tmp_path):
    fuzz(name, SHORT_S, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_a_minute(name, tmp_path):
    fuzz(name, LONG_S, tmp_path, runs=LONG_RUNS[name])

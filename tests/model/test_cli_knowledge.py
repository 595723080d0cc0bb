"""`m3db build`, `recall` and `ask` end to end on the bundled model (real weights)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytestmark = [pytest.mark.model, pytest.mark.slow]


def m3db(*args):
    return subprocess.run(
        [sys.executable, "-m", "m3db.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def test_build_recall_ask(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "zorblax.txt").write_text("Zorblax is a small moon of the planet Quendor. Its capital city is Vell.")
    (docs / "bread.md").write_text("Bread is made from flour, water and yeast.")
    kb = tmp_path / "kb.m3db"
    r = m3db("build", kb, "--from", docs, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["documents_added"] == 2 and out["memories_total"] == 2
    assert m3db("build", kb, "--from", docs, "--json").returncode == 0  # resumable: nothing added twice
    r = m3db("recall", kb, "moon of Quendor", "-k", "1", "--json")
    assert json.loads(r.stdout)["rows"][0][3].startswith("Zorblax")
    r = m3db("ask", kb, "What is the capital city of Zorblax?", "--max-tokens", "16", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["sources"][0]["document"].endswith("zorblax.txt") and answer["answer"]
    r = m3db("ask", kb, "hello", "--memory", "dense")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    # reading on the GGUF's own 4-bit weights: the same memories, recalled the same way
    r = m3db("ask", kb, "What is the capital city of Zorblax?", "--max-tokens", "16", "--precision", "int4", "--json")
    assert r.returncode == 0, r.stderr
    quantized = json.loads(r.stdout)
    assert quantized["answer"] and quantized["sources"][0]["id"] == answer["sources"][0]["id"]
    r = m3db("ask", kb, "hello", "--precision", "fp16")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_cold_build_then_ask(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "zorblax.txt").write_text("Zorblax is a small moon of the planet Quendor. Its capital city is Vell.")
    kb = tmp_path / "kb.m3db"
    r = m3db("build", kb, "--from", docs, "--cold", "--json")
    assert r.returncode == 0 and "encoded on first read" in r.stderr, r.stderr
    assert json.loads(m3db("sql", kb, "SELECT codec FROM memories", "--json").stdout)["rows"] == [["cold"]]
    r = m3db("ask", kb, "What is the capital city of Zorblax?", "--max-tokens", "8", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["sources"], r.stderr
    # ask opens read-only: the memory was encoded in RAM; a writable open keeps it
    assert json.loads(m3db("sql", kb, "SELECT codec FROM memories", "--json").stdout)["rows"] == [["cold"]]


def test_train_two_steps_and_resume(tmp_path):
    run = tmp_path / "run"
    args = ("train", run, "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--json")
    r = m3db(*args)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["steps"] == 2 and out["fingerprint"].startswith("sha256:")
    rows = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval" in rows[-1]
    r = m3db(*args)  # finished: resuming trains nothing more and gives the same adapter
    assert r.returncode == 0 and json.loads(r.stdout)["fingerprint"] == out["fingerprint"], r.stderr
    r = m3db("train", run, "--steps", "3", "--layers", "0-x")
    assert r.returncode == 1 and "--layers" in r.stderr

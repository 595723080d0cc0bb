"""`m3db sql` and `m3db shell`, driven as a user would: real processes, stdin, a terminal."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.cli.shell import split_statements


def run(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "m3db.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture
def kb(tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memories([make_memory(i, metadata={"lang": "en" if i % 2 else "fr"}) for i in range(6)])
    return path


def test_sql_binds_params_and_prints_tables_or_json(kb):
    vector = json.dumps(make_memory(3)["embedding"].tolist())
    r = run(
        "sql",
        kb,
        "SELECT r.id, r.lang FROM recall(?, k => 2) r WHERE r.lang = ? ORDER BY r.score DESC",
        "-p",
        vector,
        "-p",
        "en",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["columns"] == ["id", "lang"] and out["rows"][0] == [3, "en"] and len(out["rows"]) == 2
    r = run("sql", kb, "SELECT count(*) AS n FROM memories WHERE lang = ?", "-p", "x' OR '1'='1")
    assert r.returncode == 0 and "| 0 |" in r.stdout


def test_sql_writes_only_with_write(kb):
    r = run("sql", kb, "DELETE FROM memories WHERE lang = 'fr'")
    assert r.returncode == 1 and r.stderr.startswith("error: [read_only]") and "--write" in r.stderr
    r = run("sql", kb, "DELETE FROM memories WHERE lang = 'fr'", "--write", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rows"] == [[3]]
    with m3db.connect(kb, read_only=True) as db:
        assert len(db) == 3


def test_sql_explain_prints_each_step(kb):
    r = run("sql", kb, "EXPLAIN SELECT r.id FROM recall(?, k => 2) r WHERE r.lang = 'en'", "-p", json.dumps([0.5] * 16))
    assert r.returncode == 0, r.stderr
    assert "-- recall r\n" in r.stdout and "selectivity 50.00%" in r.stdout and "-- duckdb\n" in r.stdout


def test_split_statements_respects_strings_and_comments():
    assert split_statements("SELECT 1; SELECT ';' AS s; -- a; comment\nSELECT 2") == (
        ["SELECT 1", "SELECT ';' AS s"],
        " -- a; comment\nSELECT 2",
    )
    assert split_statements("SELECT 'unfinished; still") == ([], "SELECT 'unfinished; still")
    assert split_statements("/* ; */ SELECT 3;") == (["/* ; */ SELECT 3"], "")


SCRIPT = """\
SELECT lang,
       count(*) AS n
FROM memories
GROUP BY lang ORDER BY lang; SELECT 'a;b' AS s;
.tables
.schema memories
SELECT nope FROM memories;
.bogus
DELETE FROM memories;
SELECT 42 AS answer
"""


def test_shell_runs_a_script_from_stdin(kb):
    r = run("shell", kb, stdin=SCRIPT)
    assert r.returncode == 1  # statements failed, and input was not a terminal
    out = r.stdout
    assert "| en   | 3 |" in out and "| fr   | 3 |" in out  # a statement over four lines
    assert "| a;b |" in out
    assert "| memories  | 6    |" in out and "memories: id BIGINT" in out
    assert "| 42     |" in out  # the last statement, without a final ';'
    errors = r.stderr.splitlines()
    assert errors[0].startswith('error: [query] Binder Error: Referenced column "nope" not found')
    assert any(e.startswith("error: unknown command '.bogus'") for e in errors)
    assert any(e.startswith("error: [read_only] DELETE FROM memories writes") for e in errors)
    assert "m3db>" not in out  # no prompts when reading a pipe
    r = run(
        "shell", kb, "--write", stdin="DELETE FROM memories WHERE lang = 'fr';\nSELECT count(*) AS n FROM memories;\n"
    )
    assert r.returncode == 0 and "| 3                  |" in r.stdout and "| 3 |" in r.stdout


def test_shell_in_a_terminal_keeps_history(kb, tmp_path):
    """A real terminal: prompts, a statement typed over two lines saved as one history entry."""
    pytest.importorskip("readline")
    history = tmp_path / "history"
    env = dict(os.environ, M3DB_HISTORY=str(history), TERM="dumb")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the shell on the terminal
        os.execve(sys.executable, [sys.executable, "-m", "m3db.cli", "shell", str(kb)], env)
    out = b""

    def read_until(marker, timeout=60):
        nonlocal out
        end = time.time() + timeout
        while marker not in out and time.time() < end:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        return marker in out

    assert read_until(b"m3db> "), out
    os.write(fd, b"SELECT 6 *\n")
    assert read_until(b"...> "), out
    os.write(fd, b"7 AS answer;\n")
    assert read_until(b"| 42     |"), out
    os.write(fd, b".quit\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert history.read_text().splitlines()[-2:] == ["SELECT 6 * 7 AS answer;", ".quit"]


def test_shell_and_sql_are_documented():
    doc = open("docs/cli.md").read()
    assert "m3db shell PATH" in doc and "--write" in doc and "docs/sql.md" in doc


def test_vector_param_round_trip(kb):
    """A vector given as JSON on the command line recalls what the same vector recalls in Python."""
    q = np.random.default_rng(5).standard_normal(16).astype(np.float32)
    with m3db.connect(kb, read_only=True) as db:
        want = db.recall(q, k=3).ids
    r = run("sql", kb, "SELECT id FROM recall(?, k => 3) ORDER BY score DESC", "-p", json.dumps(q.tolist()), "--json")
    assert [row[0] for row in json.loads(r.stdout)["rows"]] == want

"""The CLI on a bad day: typo'd and empty paths, wrong sources, Ctrl-C, a closed pipe, bytes that
are not UTF-8. Each mistake is one clear `error:` line, exit 1, and nothing made or left behind."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.cli import main
from m3db.cli.shell import Shell


def run(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "m3db.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=120,
        env=env,
    )


def make_db(path, n=6, spec=None, first=0):
    spec = spec or small_spec()
    with m3db.connect(path, spec=spec) as db:
        db.add_memories(
            [make_memory(i, spec, metadata={"lang": "en" if i % 2 else "fr"}) for i in range(first, first + n)]
        )
    return path


@pytest.fixture
def kb(tmp_path):
    return make_db(tmp_path / "kb")


@pytest.fixture
def no_model(monkeypatch):
    """Loading the bundled model fails at once, saying so: a command that reaches it has checked
    its input already (the real load takes ~12 s)."""

    def stub(*args, **kwargs):
        raise m3db.DependencyError("stub: the bundled model would load here")

    for module in ("m3db.opening", "m3db.knowledge.bundled"):
        monkeypatch.setattr(sys.modules[module], "bundled", stub)


def listing(path):
    return sorted(os.listdir(path))


# -- 1. only build and merge make a database ------------------------------------------------------


def test_writing_commands_refuse_a_folder_without_a_database(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("a note")
    empty = tmp_path / "empty"
    empty.mkdir()
    commands = [
        ["compact"],
        ["sql", "SELECT 1", "--write"],
        ["shell", "--write"],
        ["recompress", "--codec", "int4"],
        ["reencode"],
    ]
    for folder, before in ((notes, ["a.txt"]), (empty, [])):
        for command in commands:
            name, *rest = command
            assert main([name, f"{folder}/", *rest]) == 1, command
            err = capsys.readouterr().err
            assert f"no m3db database at '{folder}/'" in err and err.startswith("error: "), (command, err)
            assert listing(folder) == before, command  # no catalog, segments, lock or spec.json
    for command in commands:
        name, *rest = command
        assert main([name, str(tmp_path / "typo"), *rest]) == 1
        assert f"no database at '{tmp_path / 'typo'}': nothing is there" in capsys.readouterr().err
        assert not (tmp_path / "typo").exists()
    # segments whose catalog is gone: never a new database over them, and the fix is named
    kb = make_db(tmp_path / "kb")
    os.remove(kb / "catalog.duckdb")
    assert main(["compact", str(kb)]) == 1
    assert "m3db check --repair" in capsys.readouterr().err and not (kb / "catalog.duckdb").exists()


# -- 2 and 5. build checks its input before the model loads -------------------------------------------


def test_build_checks_every_source_before_loading_the_model(tmp_path, capsys, no_model):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("Paris is the capital of France.")
    (tmp_path / "empty").mkdir()
    (tmp_path / "slides.pptx").write_bytes(b"PK")
    target = tmp_path / "kb.m3db"
    cases = [
        (["--from", str(tmp_path / "note")], "no such file or folder"),
        (["--from", str(notes), str(tmp_path / "missing.txt")], "missing.txt'"),
        (["--from", "wikipedia", str(notes)], "build it and your files in two runs"),
        (["--from", str(tmp_path / "empty")], "holds no .txt, .md, .markdown, .jsonl, .pdf, .html, .htm, .docx files"),
        (["--from", str(tmp_path / "slides.pptx")], "m3db reads .txt, .md, .markdown, .jsonl, .pdf"),
        (["--from", str(notes), "--batch-size", "0"], "--batch-size must be a positive"),
        (["--from", str(notes), "--codec", "int3"], "unknown codec 'int3'"),
    ]
    for extra, says in cases:
        assert main(["build", str(target), *extra]) == 1, extra
        err = capsys.readouterr().err
        assert says in err and "stub" not in err, (extra, err)
        assert not target.exists(), extra
    # with good input it goes on to load the model
    assert main(["build", str(target), "--from", str(notes)]) == 1
    assert "stub: the bundled model would load here" in capsys.readouterr().err


def test_build_refuses_another_codec_for_an_existing_database(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from m3db.model.memory_model import MemoryModel
    from m3db.testing import HashEmbedder

    tiny = MemoryModel.tiny(seed=0)
    for module in ("m3db.opening", "m3db.knowledge.bundled"):  # the tiny decoder stands in for SmolLM2
        monkeypatch.setattr(sys.modules[module], "bundled", lambda *a, **k: (tiny, HashEmbedder()))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("Paris is the capital of France. " * 3)
    kb = str(tmp_path / "kb.m3db")
    assert main(["build", kb, "--from", str(notes), "--codec", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memories_added"] >= 1
    (notes / "b.txt").write_text("Rome is the capital of Italy.")
    assert main(["build", kb, "--from", str(notes), "--codec", "int4"]) == 1
    err = capsys.readouterr().err
    assert "stores its memories in int8" in err and "m3db reencode" in err and "m3db recompress" in err
    with m3db.connect(kb, read_only=True) as db:
        assert db.sql("SELECT count(*) FROM documents")[0][0] == 1  # nothing was added
    # without --codec, or naming the stored one, it adds in the stored codec
    assert main(["build", kb, "--from", str(notes), "--codec", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["documents_added"] == 1
    assert main(["build", kb, "--from", str(notes), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["documents_skipped"] == 2
    with m3db.connect(kb, read_only=True) as db:
        assert db.spec.codec == "int8"


# -- 3. merge ---------------------------------------------------------------------------------------


def test_merge_refuses_a_glob_or_path_that_matches_nothing(tmp_path, capsys):
    (tmp_path / "parts").mkdir()
    for pattern in (f"{tmp_path}/parts/*.m3kb", f"{tmp_path}/parts/part-*.m3kb", f"{tmp_path}/nowhere/*"):
        assert main(["merge", str(tmp_path / "m4.m3db"), "--from", pattern]) == 1, pattern
        assert f"--from '{pattern}' matches no package or database" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "m4.m3db"), "--from", str(tmp_path / "part-000.m3kb")]) == 1
    assert "no package or database at" in capsys.readouterr().err
    assert listing(tmp_path) == ["parts"]


def test_merge_checks_every_source_before_making_the_target(tmp_path, capsys):
    a = make_db(tmp_path / "a", 3)
    b = make_db(tmp_path / "b", 3, spec=small_spec(codec="int4"), first=3)
    c = make_db(tmp_path / "c", 3, spec=small_spec(head_dim=16), first=3)
    target = tmp_path / "merged"
    for other in (b, c):
        assert main(["merge", str(target), "--from", str(a), str(other)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "mismatch" in err, err
        assert not target.exists()
    # the same source twice, or by two names, is refused (a second copy would add nothing)
    for twice in ([str(a), str(a)], [str(a), f"{tmp_path}/./a"], [str(a), f"{tmp_path}/[a]"]):
        assert main(["merge", str(target), "--from", *twice]) == 1
        assert "twice" in capsys.readouterr().err
        assert not target.exists()
    d = make_db(tmp_path / "d", 4, first=10)
    assert main(["merge", str(target), "--from", str(a), str(d), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memories_total"] == 7


def test_a_merge_that_fails_leaves_no_empty_target(tmp_path, capsys):
    a = make_db(tmp_path / "a", 3)
    seg = a / "segments" / "000001.seg"
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    target = tmp_path / "merged"
    assert main(["merge", str(target), "--from", str(a)]) == 1
    assert "error: " in capsys.readouterr().err
    assert not target.exists()


# -- 4. Ctrl-C and a closed pipe -------------------------------------------------------------------------


def test_ctrl_c_during_build_says_how_to_resume_in_one_line(tmp_path):
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        # as at a terminal: a job started in the background (CI can be) inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import m3db.opening
        def slow(*args, **kwargs):
            print("loading", file=sys.stderr, flush=True)
            time.sleep(60)
        m3db.opening.bundled = slow
        from m3db.cli import main
        sys.exit(main(["build", {str(tmp_path / "kb.m3db")!r}, "--from", "wikipedia", "--limit", "3"]))
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            lines.append(line)
            if line.strip() == "loading" or not line:
                break
        assert lines[-1].strip() == "loading", lines
        p.send_signal(signal.SIGINT)
        rest = p.stderr.read()
        assert p.wait(timeout=60) == 130, rest
    finally:
        if p.poll() is None:
            p.kill()
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert rest.strip() == "interrupted; every committed batch is kept: run the same command again to resume"


def test_ctrl_c_in_another_command_is_one_line_and_exit_130(kb, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["m3db.cli.main"], "connect", interrupted)
    try:
        status = main(["compact", str(kb)])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")
    assert status == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_a_closed_pipe_ends_quietly(kb):
    for args in (["sql", kb, "SELECT * FROM range(20000)"], ["check", kb]):
        p = subprocess.Popen(
            [sys.executable, "-m", "m3db.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        p.stdout.close()  # `| head -0`: the reader is gone before the first line
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 1, err
        assert err == "", err


# -- 5. verify says what it was given ------------------------------------------------------------------


def test_verify_names_a_missing_package_and_a_database_directory(kb, tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nosuch.m3kb")]) == 1
    assert "no package file at" in capsys.readouterr().err
    assert main(["verify", str(kb)]) == 1
    err = capsys.readouterr().err
    assert "is an m3db database directory, not a package file" in err and "m3db check" in err


# -- 6. text that is not UTF-8 ----------------------------------------------------------------------------


def test_sql_and_filters_refuse_text_that_is_not_utf8(kb):
    with m3db.connect(kb, read_only=True) as db:
        for statement in ("SELECT '\udcff'", "SELECT \udcff", "EXPLAIN SELECT 1,\n '\ud800'"):
            with pytest.raises(m3db.QueryError, match="the query is not valid UTF-8 text"):
                db.sql(statement)
        with pytest.raises(m3db.QueryError, match="the filter is not valid UTF-8 text: .*the byte 0xff"):
            db.recall(make_memory(1)["embedding"], 2, where="lang = '\udcff'")
        assert db.sql("SELECT 'été' AS s")[0][0] == "été"  # UTF-8 text is fine


def test_cli_sql_refuses_text_that_is_not_utf8(kb, capsys):
    assert main(["sql", str(kb), "SELECT \udcff"]) == 1
    assert "the query is not valid UTF-8 text: at character 8, the byte 0xff" in capsys.readouterr().err
    assert main(["sql", str(kb), "SELECT count(*) FROM memories WHERE lang = ?", "-p", "\udcff"]) == 1
    assert "a -p value is not valid UTF-8 text" in capsys.readouterr().err


def test_shell_says_a_failing_line_and_goes_on(kb):
    with m3db.connect(kb, read_only=True) as db:
        out, err = io.StringIO(), io.StringIO()
        script = "SELECT 1 AS one;\nSELECT '\udcff';\nSELECT 2 AS two;\n"
        status = Shell(db, stdin=io.StringIO(script), stdout=out, stderr=err, interactive=False).run()
    assert status == 1
    assert "| one |" in out.getvalue() and "| two |" in out.getvalue()
    assert "error: [query] the query is not valid UTF-8 text" in err.getvalue()


def test_shell_goes_on_after_an_internal_error(kb):
    with m3db.connect(kb, read_only=True) as real:

        class Flaky:
            def __getattr__(self, name):
                return getattr(real, name)

            def sql(self, statement, params=None):
                if "boom" in statement:
                    raise TypeError("boom")
                return real.sql(statement, params)

        out, err = io.StringIO(), io.StringIO()
        script = "SELECT 'boom';\nSELECT 2 AS two;\n.tables\n"
        status = Shell(Flaky(), stdin=io.StringIO(script), stdout=out, stderr=err, interactive=False).run()
    assert status == 1 and "| two |" in out.getvalue() and "| memories" in out.getvalue()
    assert "TypeError: boom" in err.getvalue()


def test_shell_reads_bytes_that_are_not_utf8_as_a_failing_statement(kb):
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict")
    r = run("shell", kb, stdin=b"SELECT 1 AS one;\nSELECT '\xff';\nSELECT 2 AS two;\n", env=env)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 1 and "| one |" in out and "| two |" in out, (out, err)
    assert "the byte 0xff is not UTF-8" in err and "Traceback" not in err

"""One writing process, or many readers: a second writer or a reader beside a writer gets a
clear LockedError (real processes)."""

import subprocess
import sys

from conftest import make_memory, small_spec

import m3db

OPEN = """
import sys, m3db
try:
    db = m3db.connect(sys.argv[1], read_only=sys.argv[2] == 'ro')
    print('opened', len(db))
except m3db.LockedError as e:
    print('locked', e)
"""


def other_process(path, mode):
    out = subprocess.run([sys.executable, "-c", OPEN, str(path), mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_second_writer_and_reader_beside_writer_are_refused(tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memory(**make_memory(0))
        out = other_process(path, "rw")
        assert out.startswith("locked") and "one writing process" in out and "read_only=True" in out
        out = other_process(path, "ro")
        assert out.startswith("locked") and "open for writing in another process" in out
    assert other_process(path, "rw") == "opened 1"


def test_many_readers_at_once(tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memory(**make_memory(0))
    with m3db.connect(path, read_only=True) as a, m3db.connect(path, read_only=True) as b:
        assert len(a) == len(b) == 1
        assert other_process(path, "ro") == "opened 1"
        assert other_process(path, "rw").startswith("locked")

"""One writing process, or many readers: a second writer or a reader beside a writer gets a
clear LockedError once the connect timeout has passed, and a waiting writer goes before readers
that arrive after it (real processes)."""

import subprocess
import sys
import time

import pytest
from conftest import make_memory, small_spec

import m3db

OPEN = """
import sys, m3db
try:
    db = m3db.connect(sys.argv[1], read_only=sys.argv[2] == 'ro', timeout=float(sys.argv[3]))
    print('opened', len(db))
except m3db.LockedError as e:
    print('locked', e)
"""


def other_process(path, mode, timeout=0):
    out = subprocess.run(
        [sys.executable, "-c", OPEN, str(path), mode, str(timeout)], capture_output=True, text=True, timeout=60
    )
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


# a process that holds the database open for `seconds`, then closes it; it prints "open" once it
# holds it
HOLD = """
import sys, time, m3db
db = m3db.connect(sys.argv[1], read_only=sys.argv[2] == 'ro', timeout=30)
print('open', flush=True)
time.sleep(float(sys.argv[3]))
db.close()
"""

# readers reopening in a tight loop for `seconds`: at any moment one of them holds the database
READERS = """
import sys, time, m3db
end = time.monotonic() + float(sys.argv[2])
opened = 0
while time.monotonic() < end:
    try:
        with m3db.connect(sys.argv[1], read_only=True, timeout=0) as db:
            len(db)
            time.sleep(0.02)
        opened += 1
    except m3db.LockedError:
        time.sleep(0.001)
print(opened)
"""


def holder(path, mode, seconds):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), mode, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "open"
    return proc


@pytest.fixture
def kb(tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, spec=small_spec()) as db:
        db.add_memory(**make_memory(0))
    return path


def test_a_writer_waits_for_a_reader_to_close(kb):
    reader = holder(kb, "ro", 1.5)
    try:
        with pytest.raises(m3db.LockedError, match="waited for it the connect timeout"):
            m3db.connect(kb, timeout=0)  # no wait: refused at once
        started = time.monotonic()
        with m3db.connect(kb, timeout=30) as db:
            assert time.monotonic() - started < 25 and len(db) == 1
    finally:
        reader.wait(timeout=60)


def test_the_default_timeout_waits_then_names_the_writer(kb):
    writer = holder(kb, "rw", 30)
    try:
        started = time.monotonic()
        with pytest.raises(m3db.LockedError, match="is open for writing .* timeout=SECONDS"):
            m3db.connect(kb, read_only=True)
        assert 4 <= time.monotonic() - started < 20  # 5 s, as sqlite3.connect
    finally:
        writer.kill()
        writer.wait()


def test_readers_reopening_in_a_loop_do_not_starve_a_writer(kb):
    """Two processes reopen the database read-only in a loop, so a reader nearly always holds it;
    a writer that waits goes first (readers arriving while it waits queue behind it), where before
    it found the lock free almost never."""
    loops = [
        subprocess.Popen([sys.executable, "-c", READERS, str(kb), "12"], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        time.sleep(3)  # both loops running
        started = time.monotonic()
        with m3db.connect(kb, timeout=8) as db:
            waited = time.monotonic() - started
            db.add_memory(**make_memory(1))
        assert waited < 8
    finally:
        counts = [int(p.communicate(timeout=60)[0]) for p in loops]
    assert all(n > 0 for n in counts), counts  # the readers did run, before and after the writer
    with m3db.connect(kb, read_only=True) as db:
        assert len(db) == 2


def test_a_reader_arriving_while_a_writer_waits_queues_behind_it(kb):
    reader = holder(kb, "ro", 3)
    waiting = subprocess.Popen([sys.executable, "-c", OPEN, str(kb), "rw", "30"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)  # the writer now waits for the first reader
        with pytest.raises(m3db.LockedError, match="a writer is waiting for this database's readers to close"):
            m3db.connect(kb, read_only=True, timeout=0)
        assert waiting.communicate(timeout=60)[0].strip() == "opened 1"
    finally:
        reader.wait(timeout=60)
        waiting.kill()


def test_a_conflict_with_this_process_fails_at_once(kb):
    with m3db.connect(kb) as db:
        started = time.monotonic()
        with pytest.raises(m3db.LockedError, match="in a connection of this process that was not closed"):
            m3db.connect(kb, read_only=True, timeout=30)
        assert time.monotonic() - started < 5 and len(db) == 1
    with m3db.connect(kb, read_only=True) as a, m3db.connect(kb, read_only=True, timeout=30) as b:
        assert len(a) == len(b) == 1  # readers beside readers, in one process


@pytest.mark.parametrize("timeout", [-1, float("inf"), float("nan"), "5", True, None])
def test_a_bad_timeout_is_named(kb, timeout):
    with pytest.raises(m3db.InvalidInputError, match="timeout is the seconds to wait"):
        m3db.connect(kb, timeout=timeout)

"""Sync (m3db/knowledge/sync.py, db.sync, `m3db sync`), with the tiny decoder and the hashing
embedder on real files: after editing, adding and deleting files, a synced knowledge base equals a
fresh build of the folder (every live record's bytes but its ids and commit number, every
document and memory row but ids and places); a sync is one commit, a dry run changes nothing, a
second sync does nothing; documents outside the folder and a file that cannot be read now are kept;
a real `m3db sync` process killed at each step of its commit leaves the old or the new state, and
running it again reaches the new one."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

pytest.importorskip("torch")
from test_documents import MARKDOWN, PAGES, use_tiny_model, write_docx, write_pdf  # noqa: E402

import m3db  # noqa: E402
from m3db import sources  # noqa: E402
from m3db.cli import main  # noqa: E402
from m3db.storage.record import read_payload  # noqa: E402

# what a record or a row holds of where and when it was written, not of what it is
PLACE = ("id", "document_id", "seq")
ROW_PLACE = ("id", "document_id", "segment", "offset", "length", "checksum", "commit_seq", "created_at")


@pytest.fixture
def tiny_bundled(monkeypatch):
    return use_tiny_model(monkeypatch)


def write_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    write_pdf(folder / "report.pdf", PAGES)
    (folder / "notes.md").write_text(MARKDOWN)
    write_docx(folder / "manual.docx")
    (folder / "paris.html").write_text("<html><head><title>Paris</title></head><body><p>" + "Paris is big. " * 9)
    (folder / "faq.jsonl").write_text(
        '{"text": "Q: Rome? A: Italy.", "metadata": {"topic": "geo"}}\n{"text": "Q: Oslo?"}\n'
    )
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "a.txt").write_text("Alpha is the first letter. " * 4)
    return folder


def edit_folder(folder):
    """Every kind of change: a page edited, a section edited and one removed, a file deleted, one
    added, a line of a .jsonl edited, the rest the same."""
    write_pdf(folder / "report.pdf", [PAGES[0], "Page two now says the museum closed in 2001.", PAGES[2]])
    md = MARKDOWN.replace("Run the installer.", "Run the new installer twice.")
    (folder / "notes.md").write_text(md.replace("## Install (2)\nA heading that looks like a duplicate's name.\n", ""))
    os.remove(folder / "paris.html")
    (folder / "sub" / "b.txt").write_text("Beta is the second letter.")
    (folder / "faq.jsonl").write_text(
        '{"text": "Q: Rome? A: Italy.", "metadata": {"topic": "geo"}}\n{"text": "Q: Oslo? A: Norway."}\n'
    )


def build(path, folder, pair):
    with m3db.connect(path, model=pair[0], embedder=pair[1]) as db:
        db.add_documents(sources.files(folder), batch_size=4, progress=False)


def built_then_edited(tmp_path, pair, name="kb.m3db"):
    """(folder, knowledge base, its dump): the folder built, then edited."""
    folder = write_folder(tmp_path / "docs")
    kb = tmp_path / name
    build(kb, folder, pair)
    before = dump(kb)
    edit_folder(folder)
    return folder, kb, before


def dump(path):
    """The knowledge base's content, without ids and places: each live document's row, each memory's
    row (its metadata without the NULLs of a column no live memory uses) and record, by (source, ordinal)."""
    with m3db.connect(path, read_only=True) as db:
        meta = list(db.catalog.metadata_columns())
        names = [c for c in db.sql("SELECT * FROM memories LIMIT 0").columns if c not in ROW_PLACE]
        rows = db.sql(
            "SELECT d.source, m.* EXCLUDE (created_at) FROM memories m JOIN documents d ON d.id = m.document_id"
        )
        cols = rows.columns
        memories, records = {}, {}
        loc = db.locations
        where = {int(mid): i for i, mid in enumerate(loc.ids.tolist())}
        for row in rows:
            r = dict(zip(cols, row))
            key = (r["source"], r["ordinal"])
            memories[key] = {c: str(r[c]) for c in names if c not in meta and c != "created_at"}
            memories[key]["metadata"] = {c: r[c] for c in meta if r[c] is not None}
            i = where[int(r["id"])]
            blob = db.segments.read(*(int(loc.cols[c][i]) for c in ("segment", "offset", "length")))
            payload = read_payload(bytes(blob), "test")
            records[key] = {k: v for k, v in payload.items() if k not in PLACE}
        documents = {
            s: (t, u, m)
            for s, t, u, m in db.sql(
                "SELECT source, title, uri, metadata FROM documents WHERE id IN (SELECT document_id FROM memories)"
            )
        }
        return {"documents": documents, "memories": memories, "records": records}


def test_a_synced_knowledge_base_equals_a_fresh_build_of_the_folder(tmp_path, tiny_bundled):
    folder, kb, before = built_then_edited(tmp_path, tiny_bundled)
    model, embedder = tiny_bundled
    with m3db.connect(kb, model=model, embedder=embedder) as db:
        seq = db.commit_seq
        plan = db.sync(sources.files(folder), dry_run=True)
        assert db.commit_seq == seq  # a dry run changes nothing
        report = db.sync(sources.files(folder), progress=False)
        assert db.commit_seq == seq + 1  # one commit: the forgets and every add
        assert db.sync(sources.files(folder), progress=False).documents_added == 0
        assert db.commit_seq == seq + 1  # nothing left to do: no commit
    assert dump(tmp_path / "kb.m3db") != before
    for r in (plan, report):
        assert (r.added, r.deleted) == ([f"{folder}/sub/b.txt"], [f"{folder}/paris.html"])
        assert r.changed == [f"{folder}/faq.jsonl", f"{folder}/notes.md", f"{folder}/report.pdf"]
        assert r.unchanged == 2 and r.skipped == []  # manual.docx, sub/a.txt
        # written: page 2, the edited section, the section after the removed one (its name was
        # "Install (3)", now "Install (2)"), the edited line, b.txt; forgotten: "Install (3)", paris.html
        assert (r.documents_added, r.documents_forgotten) == (5, 2)
    assert plan.dry_run and not report.dry_run
    assert (plan.memories_added, plan.memories_forgotten) == (report.memories_added, report.memories_forgotten)
    fresh = tmp_path / "fresh.m3db"
    build(fresh, folder, tiny_bundled)
    assert dump(kb) == dump(fresh)


def test_sync_keeps_what_is_outside_the_folder_and_what_cannot_be_read_now(tmp_path, tiny_bundled):
    model, embedder = tiny_bundled
    a, b = write_folder(tmp_path / "a"), tmp_path / "b"
    b.mkdir()
    (b / "other.txt").write_text("Another folder, built into the same knowledge base.")
    kb = tmp_path / "kb.m3db"
    with m3db.connect(kb, model=model, embedder=embedder) as db:
        db.add_documents(sources.files([a, b]), progress=False)
        db.add("Added by hand, with no file.", source="by-hand")
        (a / "report.pdf").write_bytes(b"%PDF-1.4 damaged")
        os.remove(a / "notes.md")
        report = db.sync(sources.files(a), progress=False)
        assert report.deleted == [f"{a}/notes.md"] and report.changed == []
        assert [f for f, _ in report.skipped] == [f"{a}/report.pdf"]
        kept = {
            s for (s,) in db.sql("SELECT DISTINCT d.source FROM documents d JOIN memories m ON m.document_id = d.id")
        }
        assert {"by-hand", f"{b}/other.txt", f"{a}/report.pdf#page=2"} <= kept
        assert not any(s.startswith(f"{a}/notes.md") for s in kept)
        with pytest.raises(m3db.InvalidInputError, match="sync needs a scope"):
            db.sync([{"text": "x", "source": "y"}])
        with pytest.raises(m3db.InvalidInputError, match="dry_run must be True or False"):
            db.sync(sources.files(a), dry_run="yes")
    with m3db.connect(kb, read_only=True) as db, pytest.raises(m3db.ReadOnlyError):
        db.sync(sources.files(a))


def test_m3db_sync_says_what_it_would_do_and_does_it(tmp_path, tiny_bundled, capsys):
    folder, kb, _ = built_then_edited(tmp_path, tiny_bundled)
    kb = str(kb)
    assert main(["sync", kb, f"{folder}/", "--dry-run", "--json"]) == 0  # "docs/" is "docs"
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["dry_run"] and plan["files_deleted"] == [f"{folder}/paris.html"]
    assert f"would forget {folder}/paris.html" in captured.err and f"would add {folder}/sub/b.txt" in captured.err
    assert f"would re-encode {folder}/report.pdf" in captured.err
    assert main(["sync", kb, str(folder), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert not done["dry_run"] and {k: v for k, v in done.items() if k not in ("dry_run", "memories_total")} == {
        k: v for k, v in plan.items() if k not in ("dry_run", "memories_total")
    }
    assert main(["sync", kb, str(tmp_path / "nowhere")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["sync", str(tmp_path / "no.m3db"), str(folder)]) == 1
    assert "no database at" in capsys.readouterr().err


# a real `m3db sync` process, the tiny decoder standing in for the bundled one, with every durable
# step of the commit trapped: it kills itself at step K (kill_points.py)
WORKER = r"""
import sys
sys.path.insert(0, sys.argv[4])
from kill_points import arm, calls, trap
import m3db.knowledge.bundled, m3db.opening
from m3db.model.memory_model import MemoryModel
from m3db.storage.catalog import Catalog
from m3db.storage.forgotten import ForgottenLog
from m3db.storage.segment import SegmentStore
from m3db.testing import HashEmbedder
pair = (MemoryModel.tiny(seed=0), HashEmbedder())
m3db.opening.bundled = m3db.knowledge.bundled.bundled = lambda *a, **k: pair
arm(int(sys.argv[3]), sys.argv[5])
for owner, name in [(SegmentStore, "append"), (SegmentStore, "sync"), (ForgottenLog, "append"), (Catalog, "begin"),
                    (Catalog, "insert_document"), (Catalog, "delete_memories"), (Catalog, "commit")]:
    trap(owner, name)
from m3db.cli.main import main
rc = main(["sync", sys.argv[1], sys.argv[2], "--json"])
print(" ".join(calls), file=sys.stderr, flush=True)
sys.exit(rc)
"""


def run_sync(kb, folder, kill_at, when="before"):
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, "-c", WORKER, str(kb), str(folder), str(kill_at), here, when]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stderr.strip().splitlines()[-1].split() if proc.stderr.strip() else []


def test_a_killed_m3db_sync_leaves_the_old_or_the_new_state(tmp_path, tiny_bundled):
    folder, pristine, old = built_then_edited(tmp_path, tiny_bundled, "pristine.m3db")
    clean = tmp_path / "clean.m3db"
    shutil.copytree(pristine, clean)
    rc, calls = run_sync(clean, folder, 0)
    assert rc == 0 and "commit" in calls, calls
    new = dump(clean)
    assert new != old
    steps = {name: i + 1 for i, name in reversed(list(enumerate(calls)))}  # each step's first call
    appends = [i + 1 for i, c in enumerate(calls) if c == "append"]
    if os.environ.get("M3DB_SLOW") == "1":
        points = [(k, when) for k in range(1, len(calls) + 1) for when in ("before", "after")]
    else:  # a record appended mid-way, the fsync, the forgotten log, the catalog's steps, and either side
        # of its commit (before: nothing of the sync is there; after: all of it)
        middle = appends[len(appends) // 2]
        points = [(middle, "before")] + [(steps[n], "before") for n in ("sync", "begin", "delete_memories")]
        points += [(steps["commit"], "before"), (steps["commit"], "after")]
    seen = set()
    for k, when in points:
        trial = tmp_path / f"trial-{k}-{when}.m3db"
        shutil.copytree(pristine, trial)
        rc, _ = run_sync(trial, folder, k, when)
        assert rc == -signal.SIGKILL, (k, rc)
        with m3db.connect(trial, model=tiny_bundled[0], embedder=tiny_bundled[1]) as db:  # a writable open recovers
            report = db.check()
            assert report.ok, (k, report.problems)
        state = dump(trial)
        assert state in (old, new), k
        seen.add("old" if state == old else "new")
        # and running it again reaches the new state
        with m3db.connect(trial, model=tiny_bundled[0], embedder=tiny_bundled[1]) as db:
            db.sync(sources.files(folder), progress=False)
        assert dump(trial) == new, k
        shutil.rmtree(trial)
    assert seen == {"old", "new"}  # the points straddle the commit


def test_a_line_whose_metadata_changed_is_synced_as_a_fresh_build_would_store_it(tmp_path, tiny_bundled):
    # the same text under new metadata: the chunks alone called it unchanged, and the stored row
    # and memories kept the old topic
    model, embedder = tiny_bundled
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "faq.jsonl").write_text('{"text": "Q: Rome? A: Italy.", "metadata": {"topic": "geo"}}\n')
    with m3db.connect(tmp_path / "kb.m3db", model=model, embedder=embedder) as db:
        db.add_documents(sources.files(folder), progress=False)
        (folder / "faq.jsonl").write_text('{"text": "Q: Rome? A: Italy.", "metadata": {"topic": "history"}}\n')
        report = db.sync(sources.files(folder), progress=False)
        assert report.changed == [f"{folder}/faq.jsonl"] and report.documents_added == 1
        assert db.recall("Rome", k=1, where="topic = 'history'") and not db.recall("Rome", k=1, where="topic = 'geo'")
        assert db.sync(sources.files(folder), progress=False).documents_added == 0

"""replace=True makes the stored document what was passed: after add_documents(..., replace=True)
(or db.add(..., replace=True)) the `documents` row holds the new title, uri and metadata, in the
same commit as the new memories; the same text with another title, uri or metadata is stored
again under replace=True (its memories encoded again: their records carry the metadata) and
refused without it; a catalog rebuilt by repair after a replace equals the live one, and a
replace killed at each durable step of its commit leaves the old or the new state, which repair
rebuilds with the document row its newest records describe."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

pytest.importorskip("torch")

import m3db  # noqa: E402
from m3db.testing import HashEmbedder  # noqa: E402

OLD = {
    "text": "Paris is the capital of France. It lies on the Seine.",
    "source": "wiki/Paris",
    "title": "Paris (old)",
    "uri": "https://example.org/old",
    "metadata": {"lang": "en", "year": 2020},
}
# the same source, and everything else new
NEW = dict(OLD, text="Paris is the capital and largest city of France. The Louvre is there.", title="Paris")
NEW.update(uri="https://example.org/paris", metadata={"lang": "fr", "year": 2024})
OTHER = {"text": "Rome is the capital of Italy.", "source": "wiki/Rome", "title": "Rome", "metadata": {"lang": "it"}}


def row(db, source):
    found = db.sql("SELECT title, uri, metadata FROM documents WHERE source = ?", [source])
    assert len(found) == 1, found
    title, uri, metadata = found[0]
    return {"title": title, "uri": uri, "metadata": None if metadata is None else json.loads(metadata)}


def wanted(doc):
    return {"title": doc.get("title"), "uri": doc.get("uri"), "metadata": doc.get("metadata") or None}


def memories(db, source):
    """(id, text, lang, year) of a document's memories, and each one's metadata as its record has it."""
    rows = db.sql(
        "SELECT m.id, m.text, m.lang, m.year FROM memories m JOIN documents d ON m.document_id = d.id "
        "WHERE d.source = ? ORDER BY m.id",
        [source],
    )
    return rows, [db.get(r[0]).metadata for r in rows]


def documents(db):
    return [tuple(r) for r in db.sql("SELECT id, source, title, uri, metadata FROM documents ORDER BY id")]


def memory_rows(db):
    return [
        tuple(r)
        for r in db.sql(
            "SELECT id, document_id, ordinal, char_start, char_end, text, lang, year, codec, commit_seq "
            "FROM memories ORDER BY id"
        )
    ]


def found(db, text, where):
    return [r.id for r in db.recall(text, k=10, where=where)]


def test_replace_with_other_text_stores_the_new_title_uri_and_metadata(kb):
    kb.add_documents([OLD, OTHER], progress=False)
    doc_id = kb.sql("SELECT id FROM documents WHERE source = 'wiki/Paris'")[0][0]
    before = kb.commit_seq
    report = kb.add_documents([NEW], replace=True, progress=False)
    assert report.documents_added == 1 and kb.commit_seq == before + 1  # one commit
    assert row(kb, "wiki/Paris") == wanted(NEW)
    assert kb.sql("SELECT id FROM documents WHERE source = 'wiki/Paris'")[0][0] == doc_id  # the same document
    rows, metadata = memories(kb, "wiki/Paris")
    assert rows and all(r[2:] == ("fr", 2024) for r in rows) and all(m == NEW["metadata"] for m in metadata)
    assert row(kb, "wiki/Rome") == wanted(OTHER)  # the other document is untouched
    ids = {r[0] for r in rows}
    assert set(found(kb, NEW["text"], "lang = 'fr'")) == ids
    assert found(kb, NEW["text"], "lang = 'en'") == []
    assert kb.check().ok


def test_the_same_text_with_new_metadata_under_replace_is_stored_again(kb):
    kb.add_documents([OLD], progress=False)
    old_rows, _ = memories(kb, "wiki/Paris")
    again = dict(OLD, title="Paris", uri=None, metadata={"lang": "fr", "year": 2024})
    report = kb.add_documents([again], replace=True, progress=False)
    assert report.documents_added == 1 and report.documents_skipped == 0
    assert row(kb, "wiki/Paris") == wanted(again)
    rows, metadata = memories(kb, "wiki/Paris")
    # encoded again: new memories (the records carry the metadata), the same chunks
    assert [r[1] for r in rows] == [r[1] for r in old_rows] and not {r[0] for r in rows} & {r[0] for r in old_rows}
    assert all(r[2:] == ("fr", 2024) for r in rows) and all(m == again["metadata"] for m in metadata)
    assert set(found(kb, OLD["text"], "lang = 'fr' AND year = 2024")) == {r[0] for r in rows}
    assert found(kb, OLD["text"], "lang = 'en'") == []
    # the same document again, all of it equal: skipped, no commit
    seq = kb.commit_seq
    report = kb.add_documents([again], replace=True, progress=False)
    assert report.documents_skipped == 1 and report.documents_added == 0 and kb.commit_seq == seq


def test_db_add_with_replace_stores_the_new_row(kb):
    first = kb.add(OLD["text"], source="notes/a", title="A", lang="en", year=1)
    second = kb.add(OLD["text"], source="notes/a", title="A, revised", uri="file:a", replace=True, lang="de", year=2)
    assert second and not set(first) & set(second)
    assert row(kb, "notes/a") == {"title": "A, revised", "uri": "file:a", "metadata": {"lang": "de", "year": 2}}
    assert {r[2:] for r in memories(kb, "notes/a")[0]} == {("de", 2)}


def test_the_same_text_with_new_metadata_without_replace_is_refused(kb):
    kb.add_documents([OLD], progress=False)
    seq, rows = kb.commit_seq, memories(kb, "wiki/Paris")
    for change in ({"title": "Paris"}, {"uri": "https://example.org/new"}, {"metadata": {"lang": "fr"}}):
        with pytest.raises(m3db.InvalidInputError, match=r"replace=True") as e:
            kb.add_documents([dict(OLD, **change)], progress=False)
        assert "wiki/Paris" in str(e.value) and "title, uri or metadata" in str(e.value)
    with pytest.raises(m3db.InvalidInputError, match=r"other text.*replace=True"):
        kb.add_documents([NEW], progress=False)  # other text: refused, as before
    assert kb.commit_seq == seq and memories(kb, "wiki/Paris") == rows and row(kb, "wiki/Paris") == wanted(OLD)
    # the same document twice in one call with other metadata: which one is meant is not known
    with pytest.raises(m3db.InvalidInputError, match="twice in this call"):
        kb.add_documents([OTHER, dict(OTHER, metadata={"lang": "la"})], replace=True, progress=False)
    # a rerun of the same documents still resumes past them; a field left out says nothing of it
    assert kb.add_documents([OLD], progress=False).documents_skipped == 1
    assert kb.add(OLD["text"], source="wiki/Paris", lang="en", year=2020) == []
    assert kb.add(OLD["text"], source="wiki/Paris") == [] and kb.commit_seq == seq
    # with replace=True the document is stored as given: a field left out becomes empty
    assert kb.add(OLD["text"], source="wiki/Paris", replace=True)
    assert row(kb, "wiki/Paris") == {"title": None, "uri": None, "metadata": None}


def test_replace_inside_a_transaction_is_one_commit_and_rolls_back_whole(kb):
    kb.add_documents([OLD, OTHER], progress=False)
    before = (documents(kb), memory_rows(kb))
    with pytest.raises(RuntimeError, match="changed my mind"):
        with kb.transaction():
            kb.add_documents([NEW], replace=True, progress=False)
            assert row(kb, "wiki/Paris") == wanted(OLD)  # nothing is written before the commit
            raise RuntimeError("changed my mind")
    assert (documents(kb), memory_rows(kb)) == before
    seq = kb.commit_seq
    with kb.transaction():
        kb.add_documents([NEW], replace=True, progress=False)
        kb.add_documents([dict(OTHER, title="Roma")], replace=True, progress=False)
    assert kb.commit_seq == seq + 1
    assert row(kb, "wiki/Paris") == wanted(NEW) and row(kb, "wiki/Rome") == wanted(dict(OTHER, title="Roma"))


def test_a_catalog_repaired_after_a_replace_equals_the_live_one(tmp_path, tiny):
    path = tmp_path / "kb"
    with m3db.connect(path, model=tiny, embedder=HashEmbedder()) as db:
        db.add_documents([OLD, OTHER], progress=False)
        db.add_documents([NEW], replace=True, progress=False)
        db.add_documents([dict(OTHER, metadata={"lang": "la"})], replace=True, progress=False)  # same text
        live = (documents(db), memory_rows(db))
    os.remove(path / "catalog.duckdb")
    m3db.repair(path)
    with m3db.connect(path, model=tiny, embedder=HashEmbedder()) as db:
        assert (documents(db), memory_rows(db)) == live and db.check().ok


def test_repair_takes_a_documents_row_from_its_newest_records(tmp_path, tiny):
    """A replace cut short after its records' fsync, before its forgets were logged: both the old
    and the new memories come back (nothing tells the new ones from committed ones), and the row
    is the one the newest records describe."""
    path = tmp_path / "kb"
    with m3db.connect(path, model=tiny, embedder=HashEmbedder()) as db:
        db.add_documents([OLD], progress=False)
        old_ids = [r[0] for r in memories(db, "wiki/Paris")[0]]
    steps, calls = _steps(path, tmp_path / "probe")
    assert calls[steps["sync"] - 2 : steps["sync"] + 1] == ["append", "sync", "append"]  # records, fsync, forgets
    rc, _ = run_replace(path, steps["sync"], "after")
    assert rc == -signal.SIGKILL
    os.remove(path / "catalog.duckdb")
    m3db.repair(path)
    with m3db.connect(path, model=tiny, embedder=HashEmbedder()) as db:
        rows, _ = memories(db, "wiki/Paris")
        assert set(old_ids) < {r[0] for r in rows}  # the old memories, and the new ones of the cut commit
        assert row(db, "wiki/Paris") == wanted(NEW)
        assert db.check().ok


# a process replacing wiki/Paris with NEW, every durable step of its commit trapped: it kills
# itself at step K (kill_points.py)
WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from kill_points import arm, calls, trap
import m3db
from m3db.model.memory_model import MemoryModel
from m3db.storage.catalog import Catalog
from m3db.storage.forgotten import ForgottenLog
from m3db.storage.segment import SegmentStore
from m3db.testing import HashEmbedder
arm(int(sys.argv[3]), sys.argv[4])
for owner, name in [(SegmentStore, "append"), (SegmentStore, "sync"), (ForgottenLog, "append"), (Catalog, "begin"),
                    (Catalog, "update_document"), (Catalog, "delete_memories"), (Catalog, "commit")]:
    if hasattr(owner, name):
        trap(owner, name)
with m3db.connect(sys.argv[2], model=MemoryModel.tiny(), embedder=HashEmbedder()) as db:
    db.add_documents([json.loads(sys.argv[5])], replace=True, progress=False)
print(" ".join(calls), file=sys.stderr, flush=True)
"""


def run_replace(path, kill_at, when):
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, "-c", WORKER, here, str(path), str(kill_at), when, json.dumps(NEW)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stderr.strip().splitlines()[-1].split() if proc.stderr.strip() else []


def _steps(pristine, tmp):
    """Run the replace to its end on a copy: {step: its first call's number} and the calls."""
    shutil.copytree(pristine, tmp)
    rc, calls = run_replace(tmp, 0, "before")
    shutil.rmtree(tmp)
    assert rc == 0 and "commit" in calls, calls
    return {name: i + 1 for i, name in reversed(list(enumerate(calls)))}, calls


def state(db):
    return documents(db), [r[1:8] for r in memory_rows(db)]  # ids and commit numbers aside


def test_a_killed_replace_leaves_the_old_or_the_new_state(tmp_path, tiny):
    path = tmp_path / "kb"
    with m3db.connect(path, model=tiny, embedder=HashEmbedder()) as db:
        db.add_documents([OLD, OTHER], progress=False)
        old = state(db)
    pristine = tmp_path / "pristine"
    shutil.copytree(path, pristine)
    steps, calls = _steps(pristine, tmp_path / "probe")
    assert "update_document" in calls
    new_copy = tmp_path / "new"
    shutil.copytree(pristine, new_copy)
    assert run_replace(new_copy, 0, "before")[0] == 0
    with m3db.connect(new_copy, model=tiny, embedder=HashEmbedder()) as db:
        new = state(db)
        assert row(db, "wiki/Paris") == wanted(NEW)
    points = [(steps[n], "before") for n in ("sync", "append", "begin", "update_document", "commit")]
    points[1] = (calls.index("append", calls.index("sync")) + 1, "before")  # the forgotten log's append
    points += [(steps["commit"], "after")]
    seen = set()
    for k, when in points:
        trial = tmp_path / f"trial-{k}-{when}"
        shutil.copytree(pristine, trial)
        rc, _ = run_replace(trial, k, when)
        assert rc == -signal.SIGKILL, (k, when, rc)
        with m3db.connect(trial, model=tiny, embedder=HashEmbedder()) as db:  # a writable open recovers
            assert db.check().ok
            got = state(db)
        assert got in (old, new), (k, when)
        seen.add("old" if got == old else "new")
        if got == new:  # and a repair of what was committed gives the same documents and memories
            os.remove(trial / "catalog.duckdb")
            m3db.repair(trial)
            with m3db.connect(trial, model=tiny, embedder=HashEmbedder()) as db:
                assert state(db) == new
        shutil.rmtree(trial)
    assert seen == {"old", "new"}

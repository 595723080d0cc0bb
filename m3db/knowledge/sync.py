"""Sync: a knowledge base made to hold exactly the documents of a folder, in one commit.

`sync(db, documents)` is Database.sync. `documents` is what a fresh build would add (usually
`sources.files(folder)`); the **scope** is the paths it speaks for (its `scope`, or scope=). A
stored document is in the scope when its `file` metadata (which every document from
`sources.files` carries) is one of those paths or lies under one; documents without `file`
(added by hand, the Wikipedia summaries) are in no scope and never touched.

The plan compares each document given with the stored one of the same source, by content: its
chunks (text and spans) and its row (title, uri, metadata), the test add_documents resumes by. A
document is new, changed or the
same; a stored document of the scope whose source is not given is gone, unless its file was given
but could not be read this time (listed in `skipped`: its stored documents are kept). A file is
reported as added (nothing of it was stored), deleted (nothing of it is given), changed or
unchanged. Comparing content rather than a hash of the file's bytes means a file saved again
without a change to its text (a PDF re-exported) re-encodes nothing, and a long PDF with one page
edited re-encodes that page.

Applying the plan is one transaction: the gone documents' memories are forgotten and the new and
changed documents added (add_documents with replace=True, which forgets a changed document's old
memories) in the same commit. Killed at any point, the knowledge base holds the old state or the
new one; nothing of a killed sync was committed, so running it again does all of it. The database
arrives as an argument (its public verbs: models, sql, transaction, forget, add_documents).
"""

import dataclasses
import json
import os

from ..errors import InvalidInputError
from .chunk import chunk_text
from .ingest import check_document, described, document_row


@dataclasses.dataclass
class SyncReport:
    """What sync did (or, with dry_run, would do): files by what happened to their documents,
    documents written and forgotten, memories added and forgotten, and the files that could not
    be read (kept as stored)."""

    added: list = dataclasses.field(default_factory=list)
    changed: list = dataclasses.field(default_factory=list)
    deleted: list = dataclasses.field(default_factory=list)
    unchanged: int = 0
    skipped: list = dataclasses.field(default_factory=list)  # [(file, reason)]
    documents_added: int = 0  # new or changed documents written
    documents_forgotten: int = 0  # stored documents gone
    memories_added: int = 0
    memories_forgotten: int = 0
    dry_run: bool = False


def sync(db, documents, *, scope=None, dry_run=False, batch_size=16, progress=True, cold=False) -> SyncReport:
    """See Database.sync."""
    db.require_writable()
    if not isinstance(dry_run, bool):
        raise InvalidInputError(f"dry_run must be True or False, got {dry_run!r}")
    scope = _scope(documents if scope is None else scope, scope is None)
    given = [check_document(doc, i) for i, doc in enumerate(documents)]  # a folder's files are read here
    skipped = list(getattr(documents, "skipped", []))
    model, _ = db.models()
    stored = stored_documents(db, scope)
    plan = Plan(db, model, given, stored, {path for path, _ in skipped})
    report = plan.report(skipped, dry_run)
    if dry_run or not (plan.todo or plan.gone):
        return report
    with db.transaction():  # one commit: the forgets and every add
        gone = set(plan.gone)
        current = stored_documents(db, scope)  # another thread may have committed since the plan
        ids = [mid for source, doc in current.items() if source in gone for mid in doc["ids"]]
        if ids:
            db.forget(ids)
        added = db.add_documents(plan.todo, batch_size=batch_size, progress=progress, cold=cold, replace=True)
    report.documents_added, report.memories_added = added.documents_added, added.memories_added
    report.memories_forgotten = len(ids) + plan.replaced_memories
    report.documents_forgotten = len({s for s in gone if s in current})
    return report


def _scope(value, from_documents) -> list[str]:
    paths = getattr(value, "scope", None) if from_documents else value
    if paths is None:
        raise InvalidInputError(
            "sync needs a scope, the paths whose stored documents the call speaks for: pass sources.files(folder), "
            "or scope=[folder, ...] with documents whose metadata names their `file`"
        )
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [os.path.normpath(os.fspath(p)) for p in paths]
    if not out:
        raise InvalidInputError("scope is empty: name the folders (or files) the documents come from")
    return out


def within(file, scope) -> bool:
    """True when the path `file` is one of the scope's paths or lies under one."""
    for path in scope:
        if path == os.curdir:
            if not os.path.isabs(file) and file != os.pardir and not file.startswith(os.pardir + os.sep):
                return True
        elif file == path or file.startswith(path.rstrip(os.sep) + os.sep):
            return True
    return False


def stored_documents(db, scope) -> dict[str, dict]:
    """{source: {"id", "file", "ids", "row"}} of the stored documents (with memories) in the
    scope; "row" is the document's {title, uri, metadata}."""
    rows = db.sql(
        "SELECT d.id, d.source, d.title, d.uri, d.metadata, list(m.id ORDER BY m.id) FROM documents d "
        "JOIN memories m ON m.document_id = d.id GROUP BY d.id, d.source, d.title, d.uri, d.metadata"
    )
    out = {}
    for doc_id, source, title, uri, metadata, ids in rows:
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        file = (metadata or {}).get("file")
        if isinstance(file, str) and within(file, scope):
            row = {"title": title, "uri": uri, "metadata": metadata}
            out[source] = {"id": doc_id, "file": file, "ids": list(ids), "row": row}
    return out


class Plan:
    """What sync will do: `todo` (the new and changed documents, in the order given), `gone` (the
    stored sources to forget), each file's fate, and counts."""

    def __init__(self, db, model, given, stored, unreadable):
        self.todo, self.gone, self.replaced_memories, self.new_memories = [], [], 0, 0
        sources, changed_files, files_given = set(), set(), {}
        old = _stored_chunks(db, [stored[d["source"]]["id"] for d in given if d["source"] in stored])
        for doc in given:
            source = doc["source"]
            if source in sources:
                continue  # add_documents skips the same text twice and refuses other text
            sources.add(source)
            file = doc["metadata"].get("file", source)
            files_given.setdefault(file, None)
            pieces = chunk_text(doc["text"], model.count_tokens, db.spec.reference_length)
            before = stored.get(source)
            if before is None and not pieces:
                continue  # empty: a build stores nothing of it either
            same_text = before is not None and [(p.start, p.end, p.text) for p in pieces] == old.get(before["id"])
            if same_text and described(document_row(doc), before["row"], exactly=True):
                continue  # the same chunks under the same title, uri and metadata: as a build would store it
            self.todo.append(doc)
            self.new_memories += len(pieces)
            changed_files.add(file)
            if before is not None:
                self.replaced_memories += len(before["ids"])
        files_stored = {}
        for source, doc in stored.items():
            files_stored.setdefault(doc["file"], []).append(source)
            if source not in sources and doc["file"] not in unreadable:
                self.gone.append(source)
                changed_files.add(doc["file"])
        self.added = sorted(f for f in files_given if f not in files_stored)
        self.deleted = sorted(f for f in files_stored if f not in files_given and f not in unreadable)
        self.changed = sorted(f for f in changed_files if f in files_given and f in files_stored)
        self.unchanged = len(files_given) - len(self.added) - len(self.changed)
        self.gone_memories = sum(len(stored[s]["ids"]) for s in self.gone)

    def report(self, skipped, dry_run) -> SyncReport:
        return SyncReport(
            added=self.added,
            changed=self.changed,
            deleted=self.deleted,
            unchanged=self.unchanged,
            skipped=skipped,
            documents_added=len(self.todo),
            documents_forgotten=len(self.gone),
            memories_added=self.new_memories,
            memories_forgotten=self.gone_memories + self.replaced_memories,
            dry_run=dry_run,
        )


def _stored_chunks(db, doc_ids) -> dict[int, list[tuple]]:
    """{document id: [(char_start, char_end, text)] in ordinal order}."""
    if not doc_ids:
        return {}
    rows = db.sql(
        "SELECT document_id, list((char_start, char_end, text) ORDER BY ordinal, id) FROM memories "
        "WHERE document_id IN (SELECT UNNEST(?)) GROUP BY document_id",
        [sorted(doc_ids)],
    )
    return {doc_id: [tuple(c.values()) if isinstance(c, dict) else tuple(c) for c in chunks] for doc_id, chunks in rows}

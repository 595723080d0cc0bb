"""`m3db sync PATH FOLDER...`: a knowledge base made to hold exactly a folder's documents.

SYNC_ARGUMENTS is the one list of sync's options (main.py registers the command with it). The
work is Database.sync (m3db/knowledge/sync.py); this module checks the folders as build does,
before the model loads, and says what was (or, with --dry-run, would be) done.
"""

from ..database import connect
from .build import MODEL_ARGUMENT, check_sources, report_files

SYNC_HELP = (
    "make a knowledge base hold exactly a folder's documents, in one commit: new files added, changed ones "
    "re-encoded, deleted ones forgotten"
)
SYNC_EXAMPLE = "m3db sync kb.m3db docs/ --dry-run"
SYNC_ARGUMENTS = [
    (
        ("folders",),
        dict(
            nargs="+",
            metavar="FOLDER",
            help="folders (or files) as `m3db build --from` named them: documents are matched by these paths",
        ),
    ),
    (("--dry-run",), dict(action="store_true", dest="dry_run", help="print what it would do; change nothing")),
    (("--batch-size",), dict(type=int, default=16, dest="batch_size", help="documents encoded at a time (default 16)")),
    (
        ("--cold",),
        dict(action="store_true", help="store the new documents' text and embeddings; encode each memory when read"),
    ),
    MODEL_ARGUMENT,
]


def cmd_sync(args) -> dict[str, object]:
    from ..errors import InvalidInputError
    from ..knowledge import sources
    from .models import model_from, say

    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be a positive number of documents, got {args.batch_size}")
    check_sources(args.folders)  # before the model loads
    docs = sources.files(args.folders)
    say(f"loading the model and opening {args.path} ...")
    model = model_from(args)
    with connect(args.path, model=model) as db:
        say(f"reading {', '.join(docs.scope)} and comparing it with {args.path} ...")
        report = db.sync(docs, dry_run=args.dry_run, batch_size=args.batch_size, cold=args.cold)
        total = len(db)
    would = "would " if report.dry_run else ""
    for verb, files in (("add", report.added), ("re-encode", report.changed), ("forget", report.deleted)):
        for path in files:
            say(f"{would}{verb} {path}")
    return {
        "dry_run": report.dry_run,
        "files_added": report.added,
        "files_changed": report.changed,
        "files_deleted": report.deleted,
        "files_unchanged": report.unchanged,
        "documents_added": report.documents_added,
        "documents_forgotten": report.documents_forgotten,
        "memories_added": report.memories_added,
        "memories_forgotten": report.memories_forgotten,
        "memories_total": total,
        **report_files(docs, say),
    }

"""The command line: `m3db COMMAND PATH ...`.

Every command prints JSON (`--json`) or a readable table, says `error: ...` and exits 1 on
failure, and shows a traceback only with `--debug`. Every help text ends with an example
(tests/test_cli.py fails when one does not).
"""

import argparse
import json
import os
import sys

from .database import connect
from .errors import M3DBError

COMMANDS = {}


def command(name, help, example, arguments=()):
    """Register a command; `arguments`: extra (flags, argparse keywords) pairs after PATH."""

    def register(fn):
        COMMANDS[name] = (fn, help, example)
        EXTRA_ARGUMENTS[name] = arguments
        return fn

    return register


EXTRA_ARGUMENTS = {}


@command("info", "show a database's (or a package's) memory spec, counts and files", "m3db info kb.m3db")
def cmd_info(args):
    if os.path.isfile(args.path):  # a package: its manifest, read without attaching
        from .manifest import describe

        return describe(args.path)
    with connect(args.path, read_only=True) as db:
        segments = db.segments.numbers()
        info = {
            "path": args.path,
            "memories": len(db),
            "documents": db.sql("SELECT count(*) FROM documents")[0][0],
            "segments": len(segments),
            "segment_bytes": sum(db.segments.size(n) for n in segments),
            "commit": db._commit_seq,
            "metadata_columns": db.catalog.metadata_columns(),
            "spec": db.spec.to_dict(),
        }
    return info


@command("check", "verify every checksum, and the index against the catalog", "m3db check kb.m3db")
def cmd_check(args):
    with connect(args.path, read_only=True) as db:
        report = db.check()
    out = {"ok": report.ok, "checked": report.checked, "problems": report.problems}
    if not report.ok:
        _emit(out, args)
        raise SystemExit(1)
    return out


@command("sql", "run one read-only SQL query over the catalog", "m3db sql kb.m3db \"SELECT lang, count(*) FROM memories GROUP BY lang\"",
         [(("query",), {"help": "one SELECT statement"})])
def cmd_sql(args):
    with connect(args.path, read_only=True) as db:
        rows = db.sql(args.query)
    return {"columns": rows.columns, "rows": [list(r) for r in rows]}


@command("compact", "rewrite segments to reclaim the space of forgotten memories", "m3db compact kb.m3db")
def cmd_compact(args):
    with connect(args.path) as db:
        return db.compact()


@command("pack", "write a database as one read-only package file (.m3kb) to ship", "m3db pack kb.m3db kb.m3kb --license CC-BY-4.0",
         arguments=[
             (("out",), dict(metavar="OUT", help="the package file to write")),
             (("--name",), dict(help="the knowledge base's name (default: the directory's)")),
             (("--description",), dict(help="what it holds")),
             (("--kb-version",), dict(dest="kb_version", help="its version, e.g. 2024-06")),
             (("--license",), dict(help="its license, e.g. CC-BY-SA-4.0")),
             (("--attribution",), dict(help="who to credit")),
             (("--force",), dict(action="store_true", help="replace OUT if it exists")),
         ])
def cmd_pack(args):
    with connect(args.path, read_only=True) as db:
        manifest = db.pack(args.out, name=args.name, description=args.description, version=args.kb_version,
                           license=args.license, attribution=args.attribution, overwrite=args.force,
                           progress=sys.stderr.isatty())
    return {"path": args.out, "bytes": os.path.getsize(args.out), **manifest["counts"], "about": manifest["about"]}


@command("verify", "check every hash and structure of a package; exit 0 only if it is intact", "m3db verify kb.m3kb")
def cmd_verify(args):
    from .package import verify

    report = verify(args.path, progress=sys.stderr.isatty())
    out = {"ok": report.ok, "memories_checked": report.memories_checked, "bytes_read": report.bytes_read,
           "problems": report.problems}
    if not report.ok:
        _emit(out, args)
        raise SystemExit(1)
    return out


@command("build", "build (or extend) a knowledge base from text files or the bundled Wikipedia summaries",
         "m3db build kb.m3db --from wikipedia --limit 300",
         arguments=[
             (("--from",), dict(dest="source", nargs="+", required=True, metavar="FILES|wikipedia",
                                help="'wikipedia', or .txt/.md/.jsonl files and directories")),
             (("--limit",), dict(type=int, help="at most this many documents")),
             (("--codec",), dict(default="int8", help="how a new database stores memories (f32, f16, int8, int4)")),
             (("--batch-size",), dict(type=int, default=16, dest="batch_size", help="documents per commit")),
         ])
def cmd_build(args):
    import itertools

    from . import sources

    if args.source == ["wikipedia"]:
        docs = sources.wikipedia(limit=args.limit)
    else:
        docs = sources.files(args.source)
        if args.limit is not None:
            docs = itertools.islice(docs, args.limit)
    _say(f"loading the model and opening {args.path} ...")
    with connect(args.path, codec=args.codec) as db:
        _say(f"chunking, embedding and encoding documents into memories (commits every {args.batch_size}) ...")
        report = db.add_documents(docs, batch_size=args.batch_size)
        total = len(db)
    return {"documents_added": report.documents_added, "documents_skipped": report.documents_skipped,
            "documents_empty": report.documents_empty, "memories_added": report.memories_added, "memories_total": total}


_RECALL_ARGS = [
    (("text",), dict(help="what to look for")),
    (("-k",), dict(type=int, default=5, help="how many memories (default 5)")),
    (("--where",), dict(help="a SQL filter over the columns of `memories`, e.g. \"topic = 'Science'\"")),
]


@command("recall", "find the memories nearest a text", "m3db recall kb.m3db \"capital of France\" -k 3",
         arguments=_RECALL_ARGS)
def cmd_recall(args):
    with connect(args.path, read_only=True) as db:
        matches = db.recall(args.text, k=args.k, where=args.where)
        names = db._document_names([m.document_id for m in matches])
    rows = [[m.id, round(m.score, 4), names.get(m.document_id, (None,))[0], m.text] for m in matches]
    return {"columns": ["id", "score", "document", "text"], "rows": rows}


@command("ask", "answer a question from the knowledge base, and show the memories used",
         "m3db ask kb.m3db \"Who directed 2001: A Space Odyssey?\"",
         arguments=[
             (("question",), dict(help="the question")),
             (("--memory",), dict(default="memory", choices=["memory", "rag", "none"],
                                  help="read memories (default), put the references' text in the prompt (rag), or neither")),
             (("--max-tokens",), dict(type=int, default=96, dest="max_tokens", help="longest answer in tokens")),
             (("-k",), dict(type=int, default=None, help="memories per 64-token chunk (default 5)")),
             (("--where",), dict(help="a SQL filter over the columns of `memories`")),
         ])
def cmd_ask(args):
    with connect(args.path, read_only=True) as db:
        answer = db.generate([{"role": "user", "content": args.question}], max_tokens=args.max_tokens,
                             memory={"memory": True, "rag": "rag", "none": False}[args.memory], k=args.k, where=args.where)
    out = {"question": args.question, "answer": answer.text.strip(), "mode": answer.mode,
           "sources": [{"id": s.id, "document": s.document, "text": s.text} for s in answer.sources]}
    if not args.json:
        print(f"Q: {out['question']}\nA: {out['answer']}\n\nmemories used ({answer.mode}):")
        for s in out["sources"]:
            print(f"  #{s['id']}  [{s['document']}]  {_cell(s['text'], 110)}")
        return None
    return out


def _say(text):
    print(text, file=sys.stderr, flush=True)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="m3db",
        description="m3db: an embedded database for the explicit memory of language models.",
        epilog="example: m3db info kb.m3db",
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help, example) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, epilog=f"example: {example}")
        p.add_argument("path", metavar="PATH", help="the package file" if name == "verify" else "the database directory (or package file)")
        for flags, keywords in EXTRA_ARGUMENTS.get(name, ()):
            p.add_argument(*flags, **keywords)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        # SUPPRESS: `m3db --debug sql ...` must not be reset by the subcommand's default
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors")
        p.set_defaults(fn=fn)
    return parser


def _emit(out, args):
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2, default=str))
    elif "columns" in out:
        print(format_table(out["columns"], out["rows"]))
    else:
        for key, value in out.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value, default=str)
            print(f"{key:>18}: {value}")


def format_table(columns, rows, max_width=60):
    cells = [[_cell(v, max_width) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |", line]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    out += [line, f"({len(rows)} row{'s' if len(rows) != 1 else ''})"]
    return "\n".join(out)


def _cell(value, max_width):
    text = "NULL" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= max_width else text[: max_width - 3] + "..."


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    try:
        if args.command != "build" and not os.path.exists(args.path):
            raise FileNotFoundError(f"no database at {args.path!r}")
        out = args.fn(args)
    except (M3DBError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    if out is not None:
        _emit(out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

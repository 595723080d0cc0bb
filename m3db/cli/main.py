"""The command line: `m3db COMMAND PATH ...`.

Every command prints JSON (`--json`) or a readable table, says `error: ...` and exits 1 on
failure, and shows a traceback only with `--debug`; Ctrl-C is one line and exit 130, a closed
output pipe a quiet exit 1. Only build, merge and train make PATH; every other command needs a
database (or package) there already. Every help text ends with an example (tests/test_cli.py
fails when one does not).
"""

import argparse
import json
import os
import sys
from collections.abc import Callable

from ..database import connect
from ..errors import FormatError, InvalidInputError, M3DBError, SpecMismatchError
from ..knowledge.answer import GENERATION_MODES
from ..storage.repair import repair
from . import build as build_cli
from . import sync as sync_cli
from .build import ADAPTER_ARGUMENT, MODEL_ARGUMENT, PRECISION_ARGUMENT
from .guard import CREATES, INTERRUPTED, quiet_stdout, require_database, require_package_file, require_text
from .mcp import ARGUMENTS as MCP_ARGUMENTS
from .mcp import EXAMPLE as MCP_EXAMPLE
from .mcp import HELP as MCP_HELP
from .models import (
    bundled_for_training,
    check_train_arguments,
    explain_mismatch,
    load_model,
    model_from,
    own_model,
    say,
    training_device,
)
from .serve import ARGUMENTS as SERVE_ARGUMENTS
from .table import format_cell, format_table

COMMANDS = {}


def command(name, help, example, arguments=()) -> Callable[[Callable], Callable]:
    """Register a command; `arguments`: extra (flags, argparse keywords) pairs after PATH."""

    def register(fn) -> Callable:
        COMMANDS[name] = (fn, help, example)
        EXTRA_ARGUMENTS[name] = arguments
        return fn

    return register


EXTRA_ARGUMENTS = {}


@command("info", "show a database's (or a package's) memory spec, counts and files", "m3db info kb.m3db")
def cmd_info(args) -> dict[str, object]:
    if os.path.isfile(args.path):  # a package: its manifest, read without attaching
        from ..package.manifest import describe

        return describe(args.path)
    with connect(args.path, read_only=True) as db:
        segments = db.segments.numbers()
        info = {
            "path": args.path,
            "memories": len(db),
            "documents": db.sql("SELECT count(*) FROM documents")[0][0],
            "segments": len(segments),
            "segment_bytes": sum(db.segments.size(n) for n in segments),
            "commit": db.commit_seq,
            "metadata_columns": db.catalog.metadata_columns(),
            "spec": db.spec.to_dict(),
        }
    return info


@command(
    "check",
    "verify every checksum, and the index against the catalog; --repair rebuilds a lost or damaged catalog",
    "m3db check kb.m3db --repair",
    arguments=[
        (
            ("--repair",),
            dict(
                action="store_true",
                help="when the catalog is missing or cannot be read, rebuild it from the segments' records "
                "(the old one is moved aside, never deleted), then check; what the repair lost or could not "
                "vouch for is listed as problems (exit 1)",
            ),
        ),
        (
            ("--accept-resurrection",),
            dict(
                action="store_true",
                help="with --repair: keep the memories that forgotten.log (damaged or missing) and the index cannot "
                "vouch were never forgotten, where repair would refuse; they are listed, to forget again",
            ),
        ),
    ],
)
def cmd_check(args) -> dict[str, object]:
    repaired = None
    try:
        db = connect(args.path, read_only=True)
    except FormatError as e:
        if not args.repair or not os.path.isdir(args.path) or "catalog" not in str(e):
            raise
        say(f"{e}\nrebuilding the catalog from the segments ...")
        repaired = repair(args.path, accept_resurrection=args.accept_resurrection)
        db = connect(args.path)  # a writable open rebuilds the vector index from the new catalog
    with db:
        report = db.check()
    # a repair that lost memories or could not vouch for some is no ok, however clean the result checks
    problems = (repaired["problems"] if repaired is not None else []) + report.problems
    out = {"ok": not problems, "checked": report.checked, "problems": problems}
    if repaired is not None:
        out["repaired"] = repaired
    if problems:
        _emit(out, args)
        raise SystemExit(1)
    return out


@command(
    "sql",
    "run one SQL statement: queries, recall(), generate(), INSERT INTO documents, DELETE FROM memories (docs/sql.md)",
    'm3db sql kb.m3db "SELECT r.score, r.text FROM recall(?, k => 3) r WHERE r.lang = \'en\'" -p "capital of France"',
    [
        (("query",), {"help": "one SQL statement"}),
        (
            ("-p", "--param"),
            dict(
                action="append",
                default=[],
                metavar="VALUE",
                help="a value for the next ? (repeatable); read as JSON when it is JSON "
                '(42, true, [0.1, 0.2], "text"), else as text',
            ),
        ),
        (("--write",), dict(action="store_true", help="open the database for writing (INSERT, DELETE)")),
    ],
)
def cmd_sql(args) -> dict[str, object] | None:
    params = [_param(v) for v in args.param] or None
    with connect(args.path, read_only=not args.write) as db:
        rows = db.sql(args.query, params)
    if rows.explain and not args.json:
        for step, text in rows:
            print(f"-- {step}\n{text.rstrip()}")
        return None
    return {"columns": rows.columns, "rows": [list(r) for r in rows]}


def _param(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


@command(
    "shell",
    "an interactive SQL shell: multi-line statements, history, tables (docs/sql.md)",
    "m3db shell kb.m3db",
    [(("--write",), dict(action="store_true", help="open the database for writing (INSERT, DELETE)"))],
)
def cmd_shell(args) -> None:
    from .shell import Shell

    with connect(args.path, read_only=not args.write) as db:
        status = Shell(db).run()
    if status:
        raise SystemExit(status)
    return None


@command("compact", "rewrite segments to reclaim the space of forgotten memories", "m3db compact kb.m3db")
def cmd_compact(args) -> dict[str, int]:
    with connect(args.path) as db:
        return db.compact()


@command(
    "recompress",
    "re-encode every memory into another codec in one atomic swap (pq: trained on a sample first)",
    "m3db recompress kb.m3db --codec pq --sample 2000",
    arguments=[
        (("--codec",), dict(required=True, help="the codec to store memories in: pq, int4, int8, f16, f32")),
        (("--sample",), dict(type=int, help="pq: how many memories to train its codebooks on (default 2000)")),
        (
            ("-m",),
            dict(default="8", dest="m", help="pq: bytes per 64-dim head vector (default 8), or KEYS,VALUES: 4,8"),
        ),
    ],
)
def cmd_recompress(args) -> dict[str, object]:
    from ..storage.codec import codec_class

    sample = args.sample
    if sample is None and codec_class(args.codec).trained:
        sample = 2000
    try:
        parts = [int(x) for x in args.m.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise InvalidInputError(f"-m takes a number of bytes or KEYS,VALUES (4,8), got {args.m!r}")
    m = parts[0] if len(parts) == 1 else dict(zip(("keys", "values"), parts))
    with connect(args.path) as db:
        return db.train_codec(args.codec, sample=sample, m=m, progress=sys.stderr.isatty())


@command(
    "reencode",
    "rebuild every memory from its stored text for another model, memory mode or codec (resumable; one "
    "atomic swap at the end; ids, texts, documents and metadata are kept)",
    "m3db reencode kb.m3db --memory-mode sparse --codec int4",
    arguments=[
        MODEL_ARGUMENT,
        ADAPTER_ARGUMENT,
        (
            ("--memory-mode",),
            dict(
                dest="memory_mode",
                help="dense or sparse (default: the mode the database has; docs/adapter.md)",
            ),
        ),
        (("--codec",), dict(help="f32, f16, int8 or int4 (default: the stored one; pq: reencode, then recompress)")),
        (
            ("--batch-size",),
            dict(type=int, default=16, dest="batch_size", help="memories encoded and staged durably at a time"),
        ),
    ],
)
def cmd_reencode(args) -> dict[str, object]:
    from ..knowledge.reencode import check_arguments, reencode

    # bad input fails before a model loads
    check_arguments(args.path, memory_mode=args.memory_mode, codec=args.codec, batch_size=args.batch_size)
    model = model_from(args, args.memory_mode)
    say(f"re-encoding {args.path} (an interrupted run resumes when run again) ...")
    mode = None if model else args.memory_mode
    return reencode(
        args.path,
        model=model,
        memory_mode=mode,
        codec=args.codec,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )


@command(
    "pack",
    "write a database as one read-only package file (.m3kb) to ship",
    "m3db pack kb.m3db kb.m3kb --license CC-BY-4.0",
    arguments=[
        (("out",), dict(metavar="OUT", help="the package file to write")),
        (("--name",), dict(help="the knowledge base's name (default: the directory's)")),
        (("--description",), dict(help="what it holds")),
        (("--kb-version",), dict(dest="kb_version", help="its version, e.g. 2024-06")),
        (("--license",), dict(help="its license, e.g. CC-BY-SA-4.0")),
        (("--attribution",), dict(help="who to credit")),
        (("--force",), dict(action="store_true", help="replace OUT if it exists")),
    ],
)
def cmd_pack(args) -> dict[str, object]:
    with connect(args.path, read_only=True) as db:
        manifest = db.pack(
            args.out,
            name=args.name,
            description=args.description,
            version=args.kb_version,
            license=args.license,
            attribution=args.attribution,
            overwrite=args.force,
            progress=sys.stderr.isatty(),
        )
    return {"path": args.out, "bytes": os.path.getsize(args.out), **manifest["counts"], "about": manifest["about"]}


@command("verify", "check every hash and structure of a package; exit 0 only if it is intact", "m3db verify kb.m3kb")
def cmd_verify(args) -> dict[str, object]:
    from ..package.verify import verify

    require_package_file(args.path)
    report = verify(args.path, progress=sys.stderr.isatty())
    out = {
        "ok": report.ok,
        "memories_checked": report.memories_checked,
        "bytes_read": report.bytes_read,
        "problems": report.problems,
    }
    if not report.ok:
        _emit(out, args)
        raise SystemExit(1)
    return out


# build and merge live in build.py; BUILD_ARGUMENTS is the one list of build's options
cmd_build = command("build", build_cli.BUILD_HELP, build_cli.BUILD_EXAMPLE, build_cli.BUILD_ARGUMENTS)(
    build_cli.cmd_build
)
cmd_merge = command("merge", build_cli.MERGE_HELP, build_cli.MERGE_EXAMPLE, build_cli.MERGE_ARGUMENTS)(
    build_cli.cmd_merge
)
# sync lives in sync.py; SYNC_ARGUMENTS is the one list of its options
cmd_sync = command("sync", sync_cli.SYNC_HELP, sync_cli.SYNC_EXAMPLE, sync_cli.SYNC_ARGUMENTS)(sync_cli.cmd_sync)


@command(
    "train",
    "train the reader adapter that lets the decoder (or your own --model) read sparse memories "
    "(docs/adapter.md, docs/bindings.md)",
    "m3db train runs/adapter --steps 300",
    arguments=[
        (("--steps",), dict(type=int, default=300, help="training steps (default 300)")),
        (("--batch-size",), dict(type=int, default=8, dest="batch_size", help="memory examples per step (default 8)")),
        (("--lr",), dict(type=float, default=1e-3, help="peak learning rate (default 1e-3)")),
        (("--rank",), dict(type=int, default=8, help="rank of the low-rank updates (default 8)")),
        (("--seed",), dict(type=int, default=0)),
        (("--eval-every",), dict(type=int, default=25, dest="eval_every", help="steps between held-out evaluations")),
        (("--layers",), dict(help="memory layers, e.g. 15-29 or 0,5,10 (default: the sparse mode's, the upper half)")),
        (
            ("--tokens-per-head",),
            dict(type=int, default=8, dest="tokens_per_head", help="tokens kept per head (default 8, the paper's)"),
        ),
        (("--device",), dict(default="cpu", help="where to train: cpu (default) or cuda / cuda:N (a GPU)")),
        (
            ("--minutes",),
            dict(type=float, help="a time budget: stop at a checkpoint when it is spent (run again to resume)"),
        ),
        (
            ("--model",),
            dict(
                help="train for your own Hugging Face transformers model (a local checkpoint folder or a .gguf "
                "file) instead of the bundled decoder: the same loop and data; its weights stay frozen; then read "
                "with --model PATH --adapter OUT/adapter.safetensors (docs/bindings.md)"
            ),
        ),
    ],
)
def cmd_train(args) -> dict[str, object]:
    from ..knowledge import sources
    from ..knowledge.chunk import chunk_text
    from ..model.train import TrainConfig, train

    layers = check_train_arguments(args)  # before the model loads
    device = training_device(args.device)
    try:
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            rank=args.rank,
            seed=args.seed,
            eval_every=args.eval_every,
        )
        if args.model:
            changes = {"tokens_per_head": args.tokens_per_head}
            if layers:
                changes["memory_layers"] = layers
            model = own_model(args.model, device=str(device)).for_training(**changes)
        else:
            model = bundled_for_training(layers, args.tokens_per_head, device)
    except M3DBError:
        raise  # already worded for the command line
    except ValueError as e:
        raise InvalidInputError(str(e)) from e
    settings = model.settings
    wiki = {d["title"]: d for d in sources.wikipedia()}

    def chunk(text) -> list[str]:  # the references ingest would make
        return [c.text for c in chunk_text(text, model.count_tokens, settings.reference_length)]

    say(
        f"training a reader adapter for memory layers {list(settings.memory_layers)}, "
        f"{settings.tokens_per_head} tokens per head, in {args.path} (resumes a run there) ..."
    )
    try:
        seconds = None if args.minutes is None else args.minutes * 60
        adapter = train(model, args.path, cfg, wiki=wiki, chunk=chunk, say=say, seconds=seconds)
    except ValueError as e:
        raise InvalidInputError(str(e)) from e
    return {
        "adapter": os.path.join(args.path, "adapter.safetensors"),
        "fingerprint": adapter.fingerprint,
        "model_fingerprint": model.fingerprint,
        "steps": cfg.steps,
        "log": os.path.join(args.path, "log.jsonl"),
    }


_RECALL_ARGS = [
    (("text",), dict(help="what to look for")),
    (("-k",), dict(type=int, default=5, help="how many memories (default 5)")),
    (("--where",), dict(help="a SQL filter over the columns of `memories`, e.g. \"topic = 'Science'\"")),
]


@command(
    "recall", "find the memories nearest a text", 'm3db recall kb.m3db "capital of France" -k 3', arguments=_RECALL_ARGS
)
def cmd_recall(args) -> dict[str, list[object]]:
    with connect(args.path, read_only=True) as db:
        matches = db.recall(args.text, k=args.k, where=args.where)
        names = db.documents_of(matches)
    rows = [[m.id, round(m.score, 4), document, m.text] for m, (document, _) in zip(matches, names)]
    return {"columns": ["id", "score", "document", "text"], "rows": rows}


@command(
    "ask",
    "answer a question from the knowledge base, and show the memories used",
    'm3db ask kb.m3db "Who directed 2001: A Space Odyssey?"',
    arguments=[
        (("question",), dict(help="the question")),
        (
            ("--memory",),
            dict(
                default="memory",
                choices=GENERATION_MODES,
                help="read memories (default), put the references' text in the prompt (rag), or neither",
            ),
        ),
        (("--max-tokens",), dict(type=int, default=96, dest="max_tokens", help="longest answer in tokens")),
        (("-k",), dict(type=int, default=None, help="memories per 64-token chunk (default 5)")),
        (("--where",), dict(help="a SQL filter over the columns of `memories`")),
        MODEL_ARGUMENT,
        ADAPTER_ARGUMENT,
        PRECISION_ARGUMENT,
        (
            ("--raw",),
            dict(
                action="store_true",
                help="send the question as plain completion text, not as a chat message (a base model without "
                "a chat template; chosen by itself when the tokenizer has none)",
            ),
        ),
    ],
)
def cmd_ask(args) -> dict[str, object] | None:
    model, embedder = load_model(args.model, getattr(args, "adapter", None))
    raw = args.raw or not _has_chat_template(model)
    if raw and not args.raw:
        say("note: this model's tokenizer has no chat template; asking with the question as plain text (--raw)")
    try:
        db = connect(args.path, read_only=True, model=model, embedder=embedder, precision=args.precision)
    except SpecMismatchError as e:
        raise explain_mismatch(e, args.path, model, getattr(args, "adapter", None)) from e
    with db:
        answer = db.generate(
            args.question if raw else [{"role": "user", "content": args.question}],
            max_tokens=args.max_tokens,
            memory=args.memory,
            k=args.k,
            where=args.where,
            raw=raw,
        )
    out = {
        "question": args.question,
        "answer": answer.text.strip(),
        "finish_reason": answer.finish_reason,
        "mode": answer.mode,
        "sources": [{"id": s.id, "document": s.document, "text": s.text} for s in answer.sources],
    }
    if not args.json:
        shown = out["answer"] or f"(no answer: the model ended its turn at once; finish_reason={answer.finish_reason})"
        print(f"Q: {out['question']}\nA: {shown}\n\nmemories used ({answer.mode}):")
        for s in out["sources"]:
            print(f"  #{s['id']}  [{s['document']}]  {format_cell(s['text'], 110)}")
        return None
    return out


def _has_chat_template(model) -> bool:
    """False only for your own model whose tokenizer has no chat template (a base model)."""
    hf = getattr(getattr(model, "tokenizer", None), "hf", None)
    return hf is None or bool(getattr(hf, "chat_template", None))


@command(
    "serve",
    "serve the knowledge base over HTTP: OpenAI-compatible chat, completions, embeddings, plus memory endpoints",
    "m3db serve kb.m3db --port 8000",
    arguments=SERVE_ARGUMENTS,
)
def cmd_serve(args) -> None:
    from .serve import serve  # the server's packages load only for this command

    return serve(args)


@command("mcp", MCP_HELP, MCP_EXAMPLE, arguments=MCP_ARGUMENTS)
def cmd_mcp(args) -> None:
    from .mcp import mcp  # the MCP SDK loads only for this command

    return mcp(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3db",
        description="m3db: an embedded database for the explicit memory of language models.",
        epilog="example: m3db info kb.m3db",
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help, example) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, epilog=f"example: {example}")
        p.add_argument(
            "path",
            metavar="PATH",
            nargs="?" if name == "serve" else None,  # several knowledge bases are named by --kb instead
            help={
                "verify": "the package file",
                "train": "the training directory (checkpoints, log, adapter)",
                "serve": "the database directory (or package file); or none, with --kb NAME=PATH",
            }.get(name, "the database directory (or package file)"),
        )
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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    try:
        try:
            if args.command not in CREATES + ("verify",) and args.path is not None:
                require_database(args)
            require_text(args)
            out = args.fn(args)
        except BrokenPipeError:
            raise
        except (M3DBError, OSError) as e:
            if args.debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 1
        if out is not None:
            _emit(out, args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:
        if args.debug:
            raise
        quiet_stdout()
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        start = "\n" if sys.stderr.isatty() else ""  # after the terminal's ^C (or a progress bar)
        print(f"{start}{INTERRUPTED.get(args.command, 'interrupted')}", file=sys.stderr, flush=True)
        return 130
    return 0

"""`m3db build` (locally, or on Ray with --ray) and `m3db merge`.

BUILD_ARGUMENTS is the one list of build's options: a new option goes there (main.py registers
the command with it). Imports: the database, the knowledge sources, package merge, and the Ray
binding only when --ray is given.
"""

import glob
import itertools
import os
import shutil
import sys

from ..database import DEFAULT_CODEC, connect
from ..errors import InvalidInputError, NotFoundError
from ..storage.store import holds_catalog

MODEL_ARGUMENT = (
    ("--model",),
    dict(
        help="your own Hugging Face transformers model instead of the bundled one: a local checkpoint "
        "folder or a .gguf file (Llama, Mistral, Qwen2, Qwen3; CPU, float32; docs/bindings.md)"
    ),
)

ADAPTER_ARGUMENT = (
    ("--adapter",),
    dict(
        help="with --model: read the sparse memory mode through this reader adapter, trained for that model by "
        "`m3db train OUT --model PATH` (OUT/adapter.safetensors; docs/bindings.md)"
    ),
)

PRECISION_ARGUMENT = (
    ("--precision",),
    dict(
        default=None,
        choices=["fp32", "int8", "int4"],
        help="the bundled decoder's reading precision: int4 (default: the GGUF's own 4-bit weights), int8, or "
        "fp32; int4 and int8 decode ~1.4-3x faster on CPU than fp32, with answers within 0.02 nats (docs/decoder.md)",
    ),
)

BUILD_HELP = (
    "build (or extend) a knowledge base from documents (text, Markdown, PDF, HTML, DOCX) or the bundled Wikipedia "
    "summaries"
)
BUILD_EXAMPLE = "m3db build kb.m3db --from wikipedia --limit 300"
BUILD_ARGUMENTS = [
    (
        ("--from",),
        dict(
            dest="source",
            nargs="+",
            required=True,
            metavar="FILES|wikipedia",
            help="'wikipedia', or files and folders: .txt, .md, .jsonl, .pdf, .html, .docx (a PDF a document per "
            "page, Markdown and DOCX one per section; docs/documents.md)",
        ),
    ),
    (("--limit",), dict(type=int, help="at most this many documents")),
    (
        ("--codec",),
        dict(
            help="how a new database stores memories (f32, f16, int8, int4; default int4, measured in "
            "docs/quality.md); an existing one keeps its codec (change it with `m3db reencode` or `m3db recompress`)",
        ),
    ),
    (("--batch-size",), dict(type=int, default=16, dest="batch_size", help="documents per commit (default 16)")),
    (
        ("--cold",),
        dict(
            action="store_true",
            help="cold start: store text and embeddings now, encode each memory "
            "the first time it is read (docs/knowledge.md)",
        ),
    ),
    (
        ("--sparse",),
        dict(
            action="store_true",
            help="a new database in the sparse memory mode: 8 tokens per "
            "head on half the layers, read through the bundled reader adapter (docs/adapter.md), or with "
            "--model through --adapter",
        ),
    ),
    MODEL_ARGUMENT,
    ADAPTER_ARGUMENT,
    (
        ("--ray",),
        dict(
            action="store_true",
            help="encode on a Ray cluster (pip install 'm3db[ray]'): a pool of workers, this process "
            "the one writer (docs/distributed.md)",
        ),
    ),
    (("--address",), dict(help="--ray: a running cluster's address (`ray start --head` prints it); default: local")),
    (("--workers",), dict(type=int, default=2, help="--ray: encoding workers, each loading the model once")),
    (
        ("--gpus-per-worker",),
        dict(type=float, default=0, dest="gpus_per_worker", help="--ray: GPUs per worker (used by --model)"),
    ),
    (
        ("--cpus-per-worker",),
        dict(
            type=float,
            dest="cpus_per_worker",
            help="--ray: CPUs Ray reserves per worker (default: what leaves half a CPU for reading)",
        ),
    ),
    (
        ("--shards",),
        dict(
            type=int,
            help="--ray: write N packages (PATH/part-000.m3kb ...), each by its own worker, instead of one "
            "database; serve them with m3db.connect([...]) or join them with `m3db merge`",
        ),
    ),
]


WIKIPEDIA = "wikipedia"  # --from's name for the bundled Wikipedia summaries


def check_sources(paths) -> None:
    """Refuse --from paths that are missing, of kinds m3db does not read, folders without such files,
    or files whose reading library is not installed, before a model loads or a database is made
    (a file that cannot be read is found while the build runs: it is listed, and the build goes on)."""
    from ..knowledge import documents
    from ..knowledge.sources import Files

    kinds = ", ".join(documents.FORMATS)
    found = []
    for path in paths:
        if path == WIKIPEDIA and len(paths) > 1 and not os.path.exists(path):
            raise InvalidInputError(
                "--from wikipedia (the bundled summaries) is a source of its own: build it and your files in two "
                "runs into the same database"
            )
        if not os.path.exists(path):
            hint = "; the bundled summaries are --from wikipedia" if path.lower().startswith("wiki") else ""
            raise NotFoundError(f"--from {path!r}: no such file or folder{hint}; nothing was built")
        if os.path.isdir(path):
            inner = list(Files(path).paths())
            if not inner:
                raise InvalidInputError(f"--from {path!r}: the folder holds no {kinds} files; nothing was built")
            found += inner
        elif not documents.readable(path):
            raise InvalidInputError(f"--from {path!r}: m3db reads {kinds} files; convert it to one of those")
        else:
            found.append(path)
    documents.require(documents.suffix(p) for p in found)


def report_files(docs, say) -> dict[str, object]:
    """A build's or sync's word on the files it did not read: each unreadable one on stderr, with
    its reason, and in the result (`files_skipped`); other files in the folders are counted."""
    out = {}
    for path, reason in docs.skipped:
        say(f"skipped {path}: {reason}")
    if docs.skipped:
        out["files_skipped"] = [{"file": path, "reason": reason} for path, reason in docs.skipped]
    if docs.ignored:
        shown = ", ".join(docs.ignored[:5]) + (", ..." if len(docs.ignored) > 5 else "")
        say(f"not read: {len(docs.ignored)} other file(s) in the folders ({shown})")
        out["files_ignored"] = len(docs.ignored)
    return out


def check_codec(path, codec) -> str:
    """The codec to build in: --codec for a new database (int4 when not given); for an existing
    one its stored codec, and --codec given explicitly must name it (a build never re-encodes)."""
    from ..storage.codec import codec_class

    if codec is not None:
        codec_class(codec)  # an unknown name: an error listing the known ones, before the model loads
    if not os.path.isdir(path) or not holds_catalog(path):
        return codec or DEFAULT_CODEC
    with connect(path, read_only=True) as db:
        stored = db.spec.codec
    if codec is not None and codec != stored:
        raise InvalidInputError(
            f"--codec {codec}: {path!r} stores its memories in {stored}, and a build adds to it in that codec. "
            f"Build without --codec, or convert the database first: `m3db reencode {path} --codec {codec}` "
            f"(from the texts) or `m3db recompress {path} --codec {codec}` (from the stored memories)"
        )
    return stored


def cmd_build(args) -> dict[str, object]:
    from ..knowledge import sources
    from .models import model_from, say

    if args.limit is not None and args.limit < 1:
        raise InvalidInputError(f"--limit must be a positive number of documents, got {args.limit}")
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be a positive number of documents, got {args.batch_size}")
    if args.shards is not None and not args.ray:
        raise InvalidInputError("--shards needs --ray: shards are written by Ray workers")
    if args.ray and args.cold:
        raise InvalidInputError("--cold stores text only, with nothing to encode; build it without --ray")
    if args.source != [WIKIPEDIA]:
        check_sources(args.source)  # all before the model loads or the database is made
    if args.shards is None:
        args.codec = check_codec(args.path, args.codec)
    elif args.codec is None:
        args.codec = DEFAULT_CODEC
    read = None  # the files read, when --from names files: what was skipped
    if args.source == [WIKIPEDIA]:
        docs = sources.wikipedia(limit=args.limit)
    else:
        docs = read = sources.files(args.source)
        if args.limit is not None:
            docs = itertools.islice(docs, args.limit)
    mode = "sparse" if args.sparse or args.adapter else None
    if args.ray and args.model and mode == "sparse":
        raise InvalidInputError(
            "--ray with --model builds the dense mode only (its workers load no reader adapter); build a sparse "
            "knowledge base for your own model without --ray"
        )
    if args.ray:
        return _build_on_ray(args, docs, mode, say, read)
    say(f"loading the model and opening {args.path} ...")
    model = model_from(args, mode)
    with connect(args.path, codec=args.codec, memory_mode=None if model else mode, model=model) as db:
        say(
            f"chunking, embedding{'' if args.cold else ' and encoding'} documents into memories "
            f"(commits every {args.batch_size}{'; cold: encoded on first read' if args.cold else ''}) ..."
        )
        report = db.add_documents(docs, batch_size=args.batch_size, cold=args.cold)
        total = len(db)
    return {
        "documents_added": report.documents_added,
        "documents_skipped": report.documents_skipped,
        "documents_empty": report.documents_empty,
        "memories_added": report.memories_added,
        "memories_total": total,
        **(report_files(read, say) if read is not None else {}),
    }


def _build_on_ray(args, docs, mode, say, read):
    from ..errors import DependencyError

    try:
        from ..bindings import ray as ray_build
        from ..bindings.ray import BundledModels, TransformersModels
    except ImportError as e:
        raise DependencyError(f"--ray needs the ray extra ({e}): pip install 'm3db[ray]'") from e
    models = TransformersModels(args.model, mode or "dense") if args.model else BundledModels(mode)
    options = dict(
        models=models,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        batch_size=args.batch_size,
        codec=args.codec,
        address=args.address,
        progress=sys.stderr.isatty(),
    )
    docs = list(docs)  # read (and checked for missing files) before the cluster starts
    if args.shards is not None:
        say(f"encoding {len(docs)} documents into {args.shards} packages in {args.path} on Ray ...")
        report = ray_build.build_shards(args.path, docs, shards=args.shards, **options)
        out = {"packages": report.packages, "kept": report.kept}
    else:
        say(f"encoding {len(docs)} documents on Ray with {args.workers} workers, committing into {args.path} ...")
        report = ray_build.build(args.path, docs, workers=args.workers, **options)
        with connect(args.path, read_only=True) as db:
            out = {"memories_total": len(db)}
    for e in report.errors:
        say(f"document #{e['document']} ({e['source']}): {e['error']}")
    return {
        "documents_added": report.documents_added,
        "documents_skipped": report.documents_skipped,
        "documents_empty": report.documents_empty,
        "documents_failed": report.documents_failed,
        "memories_added": report.memories_added,
        **out,
        **(report_files(read, say) if read is not None else {}),
    }


MERGE_HELP = "merge packages (a sharded build's parts) or databases into one database, in the order given"
MERGE_EXAMPLE = "m3db merge kb.m3db --from shards/part-000.m3kb shards/part-001.m3kb"
MERGE_ARGUMENTS = [
    (
        ("--from",),
        dict(dest="sources", nargs="+", required=True, metavar="PACKAGE|DB", help="packages or databases, in order"),
    ),
]


def merge_paths(patterns) -> list[str]:
    """--from's sources, globs expanded (in sorted order): each must exist and be named once."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise NotFoundError(
                    f"--from {pattern!r} matches no package or database; check the path (nothing was merged)"
                )
            paths.extend(matched)
        elif not os.path.exists(pattern):
            raise NotFoundError(f"no package or database at {pattern!r}; check the path (nothing was merged)")
        else:
            paths.append(pattern)
    seen = {}
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            same = f"{p!r}" if seen[key] == p else f"{seen[key]!r} and {p!r}"
            raise InvalidInputError(
                f"--from names {same} twice; each source is merged once (a second copy would add nothing): "
                "name each once"
            )
        seen[key] = p
    return paths


def cmd_merge(args) -> dict[str, object]:
    from ..package.merge import check_sources, merge

    paths = merge_paths(args.sources)
    if os.path.realpath(args.path) in {os.path.realpath(p) for p in paths}:
        raise InvalidInputError(f"{args.path!r} is both the target and a source; merge into another database")
    sources = {}
    try:
        for p in paths:
            sources[p] = connect(p, read_only=True)
        first = next(iter(sources.values()))
        check_sources(sources)  # all agree before the target is made
        existed = os.path.exists(args.path)
        created = not (os.path.isdir(args.path) and holds_catalog(args.path))
        empty = False
        try:
            with connect(args.path, spec=first.spec.to_dict()) as db:
                try:
                    report = merge(db, sources, progress=sys.stderr.isatty())
                except BaseException:
                    try:
                        empty = created and len(db) == 0
                    except Exception:  # (the original error is what to report)
                        pass
                    raise
                total = len(db)
        except BaseException:
            if empty:  # a failed merge into a new database leaves no empty database behind
                _remove_new_database(args.path, existed)
            raise
    finally:
        for src in sources.values():
            src.close()
    return {
        "memories_added": report.memories_added,
        "commits_added": report.commits_added,
        "commits_skipped": report.commits_skipped,
        "memories_total": total,
    }


def _remove_new_database(path, existed) -> None:
    """Remove the database this merge made and left empty: the folder too unless it was there before
    (then it held only m3db's files: connect() makes a new database nowhere else)."""
    if not existed:
        shutil.rmtree(path, ignore_errors=True)
        return
    for name in os.listdir(path):
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                os.remove(entry)
            except OSError:
                pass

"""`m3db serve`: run the OpenAI-compatible HTTP server (m3db.bindings.server) under uvicorn.

Opens the knowledge base (a database read-only unless --write, a package, or several packages
attached together), binds the model (the bundled one, your own transformers model, or a factory), serves until
SIGINT or SIGTERM, then stops generation and closes the database. The server's modules
(Starlette, uvicorn, torch) are imported inside `serve`, so `import m3db` stays light.
"""

import os

from ..database import attach, connect
from ..errors import DependencyError, InvalidInputError, SpecMismatchError
from .build import ADAPTER_ARGUMENT, PRECISION_ARGUMENT
from .models import load_model, say

ARGUMENTS = [
    (("more",), dict(nargs="*", metavar="PACKAGE", help="more package files, served together with PATH")),
    (("--host",), dict(default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only)")),
    (("--port",), dict(type=int, default=8000, help="the port (default 8000)")),
    (
        ("--api-key",),
        dict(
            dest="api_key",
            default=None,
            help="require `Authorization: Bearer KEY` on every request (default: the M3DB_API_KEY variable)",
        ),
    ),
    (("--write",), dict(action="store_true", help="accept writes: add documents, forget memories, writing SQL")),
    (
        ("--ray",),
        dict(
            action="store_true",
            help="serve replicas on Ray Serve (read-only; --replicas, --ray-address; docs/server.md, Replicas)",
        ),
    ),
    (("--replicas",), dict(type=int, default=2, help="with --ray: copies of the server, each with its own decoder")),
    (
        ("--ray-address",),
        dict(
            dest="ray_address",
            default=None,
            help="with --ray: the Ray cluster to join (default: RAY_ADDRESS, else a local one started here)",
        ),
    ),
    (
        ("--kb",),
        dict(
            action="append",
            default=[],
            metavar="NAME=PATH",
            help="serve several knowledge bases, each a database or packages joined with + (repeat --kb; "
            "needs --keys, and no PATH)",
        ),
    ),
    (
        ("--keys",),
        dict(
            default=None,
            metavar="FILE",
            help="API keys and what each may read and write, a TOML file (docs/server.md, Tenants); reread on SIGHUP",
        ),
    ),
    (
        ("--public-metrics",),
        dict(
            dest="public_metrics",
            action="store_true",
            help="serve GET /metrics (Prometheus) without the API key, for a scraper that has none",
        ),
    ),
    (
        ("--model",),
        dict(
            default=None,
            help="your own transformers model, as `m3db build --model` took it (a local checkpoint folder or a "
            ".gguf file), or MODULE:FUNCTION returning a model or (model, embedder) (default: the bundled "
            "SmolLM2-135M-Instruct)",
        ),
    ),
    ADAPTER_ARGUMENT,
    PRECISION_ARGUMENT,
    (("--name",), dict(default=None, help="the model id clients send (default: the file name without extension)")),
    (("--max-tokens",), dict(type=int, default=1024, dest="max_tokens", help="the most tokens one answer may ask")),
    (("--max-batch",), dict(type=int, default=8, dest="max_batch", help="requests decoded together (default 8)")),
    (
        ("--max-queue",),
        dict(type=int, default=64, dest="max_queue", help="generation requests queued or running; more get 429"),
    ),
    (
        ("--max-body-bytes",),
        dict(type=int, default=4 * 1024 * 1024, dest="max_body_bytes", help="the largest request body (default 4 MiB)"),
    ),
    (
        ("--grace",),
        dict(type=float, default=10.0, help="seconds running requests get to finish on SIGTERM (default 10)"),
    ),
    (
        ("--sql-timeout",),
        dict(
            type=float,
            default=30.0,
            dest="sql_timeout",
            help="seconds one /v1/sql statement may run before it is interrupted (default 30)",
        ),
    ),
    (
        ("--sql-max-queue",),
        dict(
            type=int,
            default=16,
            dest="sql_max_queue",
            help="/v1/sql statements waiting for the database or running; more get 429 (default 16)",
        ),
    ),
    (
        ("--sql-max-rows",),
        dict(
            type=int,
            default=10_000,
            dest="sql_max_rows",
            help="the most rows a /v1/sql result may have (default 10000)",
        ),
    ),
    (
        ("--sql-max-bytes",),
        dict(
            type=int,
            default=64 * 1024 * 1024,
            dest="sql_max_bytes",
            help="the largest /v1/sql result, in bytes of JSON (default 64 MiB)",
        ),
    ),
    (
        ("--header-timeout",),
        dict(
            type=float,
            default=10.0,
            dest="header_timeout",
            help="seconds a connection may take to send a request's headers (default 10)",
        ),
    ),
    (
        ("--body-timeout",),
        dict(
            type=float,
            default=30.0,
            dest="body_timeout",
            help="seconds a request's body may take to arrive (default 30; then 408)",
        ),
    ),
    (
        ("--max-connections",),
        dict(
            type=int,
            default=1000,
            dest="max_connections",
            help="open connections (or running requests) past which a new one is answered 503 (default 1000)",
        ),
    ),
]


def fit_to_spec(model, spec):
    """The bundled decoder class reads with memory settings; a database records its own (dense
    or sparse), so a model loaded from a file takes the database's settings when it is the
    model that built it (otherwise opening reports the mismatch)."""
    if model is None or not hasattr(model, "with_settings") or model.fingerprint != spec.model_fingerprint:
        return model
    from ..model.settings import MemorySettings

    try:
        return model.with_settings(MemorySettings.from_spec(spec))
    except ValueError:
        return model


def open_kb(paths, *, write, model, embedder, precision=None):
    if len(paths) > 1:
        if write:
            raise InvalidInputError("packages are read-only: --write serves one database directory")
        if model is not None:
            with attach(paths) as peek:
                model = fit_to_spec(model, peek.spec)
        return attach(paths, model=model, embedder=embedder, precision=precision)
    if model is not None:
        with connect(paths[0], read_only=True) as peek:
            model = fit_to_spec(model, peek.spec)
    return connect(paths[0], read_only=not write, model=model, embedder=embedder, precision=precision)


def serve(args) -> None:
    """The `m3db serve` command."""
    try:
        import uvicorn  # noqa: F401 (serve_on runs it; imported here to fail before anything starts)

        from ..bindings.server import Limits, listen
    except ImportError as e:
        raise DependencyError(f"m3db serve needs the server extra ({e}): pip install 'm3db[server]'") from e
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        default_max_tokens=min(256, args.max_tokens),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        body_timeout=args.body_timeout,
        sql_timeout=args.sql_timeout,
        sql_max_rows=args.sql_max_rows,
        sql_max_bytes=args.sql_max_bytes,
        sql_max_queue=args.sql_max_queue,
    )
    limits.check()
    if not (0 < args.header_timeout < float("inf")):
        raise InvalidInputError(f"--header-timeout {args.header_timeout}: expected a positive number of seconds")
    if args.max_connections < 1:
        raise InvalidInputError(f"--max-connections {args.max_connections}: expected a positive integer")
    if not 0 <= args.port <= 65535:
        raise InvalidInputError(f"--port {args.port}: expected 0-65535")
    api_key = args.api_key or os.environ.get("M3DB_API_KEY") or None
    if args.ray:
        from .replicas import serve_replicas  # Ray loads only for --ray

        return serve_replicas(args, api_key=api_key, limits=limits)
    served = tenant_paths(args, api_key)
    if served is None:
        paths = [args.path, *args.more]
        for path in args.more:  # PATH itself was checked by the command line
            if not os.path.exists(path):
                raise InvalidInputError(f"no package at {path!r}")
    # the port first: a port in use fails at once, not after the model has loaded
    sock = listen(args.host, args.port)
    try:
        if served is None:
            serve_on(sock, args, paths=paths, api_key=api_key, limits=limits)
        else:
            serve_tenants_on(sock, args, served=served, limits=limits)
    finally:
        sock.close()


def tenant_paths(args, api_key) -> dict | None:
    """{name: [paths]} of the knowledge bases --kb names (or PATH's under --keys), or None for
    one knowledge base served to one key (or none)."""
    if args.path is None and not args.kb:
        raise InvalidInputError("m3db serve needs PATH (a database or package) or --kb NAME=PATH (several)")
    if args.kb and (args.path is not None or args.more):
        raise InvalidInputError("give PATH (one knowledge base) or --kb NAME=PATH (several), not both")
    if args.kb and not args.keys:
        raise InvalidInputError("several knowledge bases are served to API keys: give --keys FILE (docs/server.md)")
    if not args.keys:
        return None
    if api_key:
        raise InvalidInputError("--keys replaces --api-key (and M3DB_API_KEY): give one of them")
    if args.name is not None and args.kb:
        raise InvalidInputError("--name names PATH's knowledge base; with --kb the name is before the =")
    if not args.kb:  # one knowledge base, served to the keys of the file
        require_keys_file(args.keys)
        return {
            args.name or os.path.splitext(os.path.basename(os.path.normpath(args.path)))[0]: [args.path, *args.more]
        }
    served = {}
    for item in args.kb:
        name, eq, joined = item.partition("=")
        if not eq or not name or not joined:
            raise InvalidInputError(f"--kb {item!r}: expected NAME=PATH (e.g. --kb wiki=wiki.m3kb)")
        if name in served:
            raise InvalidInputError(f"--kb names {name!r} twice; give each knowledge base its own name")
        paths = joined.split("+")
        for path in paths:
            if not os.path.exists(path):
                raise InvalidInputError(f"--kb {item!r}: nothing at {path!r}; check the path")
        served[name] = paths
    require_keys_file(args.keys)
    return served


def require_keys_file(path) -> None:
    """The keys file is there: checked before any knowledge base opens or model loads (its
    contents are checked against the knowledge bases once they are open)."""
    if not os.path.isfile(path):
        raise InvalidInputError(f"--keys {path!r}: no such file; write the keys file first (docs/server.md, Tenants)")


def serve_tenants_on(sock, args, *, served, limits) -> None:
    """Open each knowledge base (a package set read-only; a database for writing under
    --write), serve them to the keys file's keys until a signal, close them."""
    from ..bindings.server import run_tenants

    model, embedder = load_model(args.model, getattr(args, "adapter", None))
    dbs = {}
    try:
        for name, paths in served.items():
            write = args.write and len(paths) == 1 and os.path.isdir(paths[0])
            dbs[name] = open_kb(paths, write=write, model=model, embedder=embedder, precision=args.precision)
            say(f"opened {name} = {'+'.join(paths)}")
        run_tenants(
            dbs, args.keys, write=args.write, limits=limits, public_metrics=args.public_metrics, **hosting(args, sock)
        )
    finally:
        for name, db in dbs.items():
            db.close()
            say(f"closed {name}")


def open_served(args, paths):
    """The knowledge base a serving command (serve, mcp) opens: the model that --model and
    --adapter name, fitted to the database's spec, and a mismatch explained."""
    adapter = getattr(args, "adapter", None)
    model, embedder = load_model(args.model, adapter)
    try:
        return open_kb(paths, write=args.write, model=model, embedder=embedder, precision=args.precision)
    except SpecMismatchError as e:
        from .models import explain_mismatch

        raise explain_mismatch(e, paths[0], model, adapter) from e


def hosting(args, sock) -> dict:
    """How the server is hosted (bindings/server hosting.serve_app), from the command line."""
    return dict(
        host=args.host,
        port=args.port,
        grace=args.grace,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        sock=sock,
        say=say,
    )


def serve_on(sock, args, *, paths, api_key, limits) -> None:
    """Open the knowledge base, serve it on the bound socket until a signal, close it."""
    from ..bindings.server import run

    db = open_served(args, paths)
    try:
        say(f"opened {', '.join(paths)}")
        run(
            db,
            name=args.name,
            api_key=api_key,
            write=args.write,
            limits=limits,
            public_metrics=args.public_metrics,
            **hosting(args, sock),
        )
    finally:
        db.close()
        say(f"closed {', '.join(paths)}")

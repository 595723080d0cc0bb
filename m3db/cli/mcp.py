"""`m3db mcp`: serve a knowledge base to agents over MCP (m3db.bindings.mcp), on stdio or, with
--port, on streamable HTTP.

Argument handling only: the options are `m3db serve`'s (the same names, types and defaults,
taken from serve.ARGUMENTS, with help worded for MCP) plus --port, which switches from stdio to
HTTP. Opens the knowledge base as `m3db serve` does (serve.open_served), binds the port first on
HTTP, runs the binding until the client goes or a signal, then closes the database. On stdio,
stdout is the protocol's: what loading prints goes to stderr. The binding's modules (the MCP
SDK, uvicorn, torch) are imported inside `mcp`, so `import m3db` stays light.
"""

import contextlib
import dataclasses
import os
import sys

from ..errors import InvalidInputError
from .build import ADAPTER_ARGUMENT, PRECISION_ARGUMENT
from .models import say
from .serve import ARGUMENTS as SERVE_ARGUMENTS
from .serve import open_served


def serve_argument(flag: str, **changes) -> tuple:
    """`m3db serve`'s argument `flag`, with `changes` (its help, for MCP) over its keywords."""
    flags, keywords = next(a for a in SERVE_ARGUMENTS if a[0][0] == flag)
    return flags, {**keywords, **changes}


HELP = "serve the knowledge base to agents over MCP: tools recall, ask, sql (add_documents with --write); documents"
EXAMPLE = "m3db mcp kb.m3db"
ARGUMENTS = [
    serve_argument("more"),
    (
        ("--port",),
        dict(type=int, default=None, help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio"),
    ),
    serve_argument("--host", default=None, help="with --port: the address to listen on (default 127.0.0.1)"),
    serve_argument(
        "--api-key",
        help="with --port: require `Authorization: Bearer KEY` on every request (default: the M3DB_API_KEY variable)",
    ),
    serve_argument(
        "--write", help="accept writes: the add_documents tool, INSERT INTO documents and DELETE FROM memories in sql"
    ),
    serve_argument("--model"),
    ADAPTER_ARGUMENT,
    PRECISION_ARGUMENT,
    serve_argument("--name", help="the server's name (default: the file name without extension)"),
    serve_argument("--max-tokens", help="the most tokens one answer (ask's max_tokens) may ask (default 1024)"),
    serve_argument("--max-queue", help="questions (ask calls) waiting or being answered; more are refused"),
    serve_argument("--max-body-bytes", help="with --port: the largest request body (default 4 MiB)"),
    serve_argument(
        "--sql-timeout", help="seconds one SQL statement (the sql tool, or a where filter) may run (default 30)"
    ),
    serve_argument(
        "--sql-max-queue", help="SQL statements waiting for the database or running; more are refused (default 16)"
    ),
    serve_argument("--sql-max-rows", help="the most rows a sql result may have (default 10000)"),
    serve_argument("--sql-max-bytes", help="the largest sql result or document read, in bytes (default 64 MiB)"),
]


def mcp(args) -> None:
    """The `m3db mcp` command."""
    from ..bindings.mcp import run  # a DependencyError naming the extra when the SDK is missing
    from ..bindings.server import Limits, listen

    # the limits whose options this command shares with m3db serve (the others keep their defaults)
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(Limits) if hasattr(args, f.name)}
    limits = Limits(**shared, default_max_tokens=min(256, args.max_tokens))
    limits.check()
    http = args.port is not None
    if not http and (args.host is not None or args.api_key is not None):
        raise InvalidInputError(
            f"{'--host' if args.host is not None else '--api-key'} applies to HTTP: add --port (on stdio only the "
            "client that started the server speaks to it)"
        )
    if http and not 0 <= args.port <= 65535:
        raise InvalidInputError(f"--port {args.port}: expected 0-65535")
    api_key = (args.api_key or os.environ.get("M3DB_API_KEY") or None) if http else None
    paths = [args.path, *args.more]
    for path in args.more:  # PATH itself was checked by the command line
        if not os.path.exists(path):
            raise InvalidInputError(f"no package at {path!r}")
    host = args.host or "127.0.0.1"
    sock = listen(host, args.port) if http else None  # a port in use fails before the model loads
    try:
        with contextlib.redirect_stdout(sys.stderr):  # on stdio, stdout carries the protocol alone
            db = open_served(args, paths)
        try:
            say(f"opened {', '.join(paths)}")
            run(
                db,
                port=args.port,
                host=host,
                name=args.name,
                api_key=api_key,
                write=args.write,
                limits=limits,
                sock=sock,
                say=say,
            )
        finally:
            db.close()
            say(f"closed {', '.join(paths)}")
    finally:
        if sock is not None:
            sock.close()

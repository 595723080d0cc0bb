"""Hosting: `run(db, ...)` serves a knowledge base over MCP, on stdio (the client starts this
process and speaks on its stdin and stdout) or on streamable HTTP at http://HOST:PORT/mcp.

On stdio, nothing but the protocol reaches stdout: the SDK points the process's stdout at
stderr while it serves (a stray print goes to the log), and this module's notices go to stderr.
It ends when the client closes stdin. On HTTP, uvicorn serves the SDK's streamable-HTTP app
on a socket bound first (the HTTP server's `listen`: a port in use fails at once), with the
request body bounded (`Limits.max_body_bytes`), an optional API key (the HTTP server's
`BearerAuth`), and the SDK's DNS-rebinding protection on a loopback address. SIGINT or SIGTERM
stops either: running SQL is interrupted, the question being answered gets `GRACE` seconds,
then `run` returns and the caller closes the database. Imports: anyio, the SDK's stdio
transport, uvicorn (lazily), the server binding, this binding's server.
"""

import ipaddress
import signal
import socket
import sys
import threading

import anyio
from mcp.server.stdio import stdio_server

from m3db.bindings.server import BearerAuth, Limits, listen
from m3db.errors import InvalidInputError

from .server import Served

GRACE = 10.0  # seconds the question being answered gets when the server stops
PATH = "/mcp"  # the streamable-HTTP endpoint
MAX_CONNECTIONS = 1000  # open HTTP connections past which a new one is answered 503 (as m3db serve's default)


def notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(
    db,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    name: str | None = None,
    api_key: str | None = None,
    write: bool = False,
    limits: Limits | None = None,
    sock: socket.socket | None = None,
    say=notice,
) -> None:
    """Serve `db` (a Database, or a PackageSet from m3db.attach) over MCP until the client
    closes stdin (stdio, when neither port nor sock is given) or SIGINT/SIGTERM; the caller
    closes `db`.

    port, host: serve streamable HTTP at http://host:port/mcp instead (sock: a socket already
    bound, see m3db.bindings.server.listen); api_key: HTTP only, every request then needs
    `Authorization: Bearer KEY`; name: the server's name (default: the file name); write: accept
    writes (add_documents, writing SQL; a database opened for writing); limits: the HTTP
    server's Limits (max_tokens, max_queue, max_body_bytes and the sql_ ones apply); say: where
    the one-line notices go (default stderr: on stdio, stdout is the protocol's).
    """
    http = port is not None or sock is not None
    if api_key is not None and not http:
        raise InvalidInputError(
            "an API key guards HTTP (--port, or port=); over stdio only the client that started the server speaks to it"
        )
    if api_key is not None and (not isinstance(api_key, str) or len(api_key) < 8):
        raise InvalidInputError("the API key must be at least 8 characters (--api-key, or api_key=)")
    if sock is None and http and (not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535):
        raise InvalidInputError(f"port {port!r}: expected an integer in 0-65535 (0: any free port) (--port, or port=)")
    limits = limits or Limits()
    served = Served(db, name=name, write=write, limits=limits)
    access = "writable" if write else "read-only"
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops as Ctrl-C does
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if http:
            over_http(served, host=host, port=port, sock=sock, api_key=api_key, limits=limits, say=say, access=access)
        else:
            say(f"serving {served.kb.name!r} over MCP on stdio ({access})")
            anyio.run(over_stdio, served.server)
    except KeyboardInterrupt:
        say("stopped")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not served.stop(GRACE):
            say(f"warning: an answer was still being decoded {GRACE:g} s after the stop")


async def over_stdio(server) -> None:
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def over_http(served, *, host, port, sock, api_key, limits, say, access) -> None:
    import uvicorn

    own_socket = sock is None
    if own_socket:
        sock = listen(host, port)
    try:
        app = served.server.streamable_http_app(
            streamable_http_path=PATH, max_request_body_size=limits.max_body_bytes, host=host
        )
        if api_key:
            app = BearerAuth(app, api_key)
        shown = f"[{host}]" if ":" in host else host
        say(
            f"serving {served.kb.name!r} over MCP at http://{shown}:{sock.getsockname()[1]}{PATH} "
            f"({access}; {'API key required' if api_key else 'no API key'})"
        )
        if not api_key and not loopback(host):
            say(f"warning: listening on {host} without an API key: anyone who can reach it may use it (--api-key)")
        config = uvicorn.Config(
            app,
            lifespan="on",
            log_level="warning",
            timeout_keep_alive=5,
            timeout_graceful_shutdown=GRACE,  # an open event stream would otherwise hold the shutdown forever
            limit_concurrency=MAX_CONNECTIONS,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if own_socket:
            sock.close()


def loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

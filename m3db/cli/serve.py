"""`m3db serve`: run the OpenAI-compatible HTTP server (m3db.bindings.server) under uvicorn.

Opens the knowledge base (a database read-only unless --write, a package, or several packages
attached together), binds the model (the bundled one, your own transformers model, or a factory), serves until
SIGINT or SIGTERM, then stops generation and closes the database. The server's modules
(Starlette, uvicorn, torch) are imported inside `serve`, so `import m3db` stays light.
"""

import asyncio
import errno
import importlib
import ipaddress
import os
import signal
import socket
import threading

from ..database import attach, connect
from ..errors import DependencyError, InvalidInputError, M3DBError, SpecMismatchError
from .build import ADAPTER_ARGUMENT, PRECISION_ARGUMENT
from .models import say

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


def load_model(spec_text, adapter=None):
    """(model, embedder) that --model (and --adapter) name; either may be None (the bundled one)."""
    if adapter is not None and (spec_text is None or not os.path.exists(spec_text)):
        raise InvalidInputError(
            "--adapter needs --model PATH: it is a reader adapter for your own model, a checkpoint folder or "
            ".gguf file (a MODULE:FUNCTION factory attaches its own adapter)"
        )
    if spec_text is None:
        return None, None
    if os.path.exists(spec_text):  # what `m3db build --model PATH` built with: the same model here
        from .models import own_model

        return own_model(spec_text, adapter=adapter), None
    module_name, sep, attr = spec_text.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInputError(
            f"--model {spec_text!r}: no such file or folder; expected a transformers model (a local checkpoint "
            "folder or a .gguf file) or MODULE:FUNCTION (like my_models:load)"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidInputError(f"--model {spec_text!r}: cannot load {attr} from {module_name}: {e}") from e
    try:
        made = factory()
    except (M3DBError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 (the user's code: any failure is theirs to read)
        raise InvalidInputError(
            f"--model {spec_text!r}: {module_name}.{attr}() raised {type(e).__name__}: {e}; "
            "run it in Python to see the traceback, or pass --debug"
        ) from e
    return tuple(made) if isinstance(made, (tuple, list)) else (made, None)


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

        from ..bindings.server import Limits
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
    paths = [args.path, *args.more]
    for path in args.more:  # PATH itself was checked by the command line
        if not os.path.exists(path):
            raise InvalidInputError(f"no package at {path!r}")
    # the port first: a port in use fails at once, not after the model has loaded
    sock = listen(args.host, args.port)
    try:
        serve_on(sock, args, paths=paths, api_key=api_key, limits=limits)
    finally:
        sock.close()


def serve_on(sock, args, *, paths, api_key, limits) -> None:
    """Open the knowledge base, serve it on the bound socket until a signal, close it."""
    import uvicorn

    from ..bindings.server import app

    adapter = getattr(args, "adapter", None)
    model, embedder = load_model(args.model, adapter)
    try:
        db = open_kb(paths, write=args.write, model=model, embedder=embedder, precision=args.precision)
    except SpecMismatchError as e:
        from .models import explain_mismatch

        raise explain_mismatch(e, paths[0], model, adapter) from e
    application = None
    try:
        application = app(db, name=args.name, api_key=api_key, write=args.write, limits=limits)
        name = application.state.kb.name
        host = f"[{args.host}]" if ":" in args.host else args.host
        say(
            f"serving {', '.join(paths)} as model {name!r} at http://{host}:{sock.getsockname()[1]}/v1 "
            f"({'writable' if args.write else 'read-only'}; {'API key required' if api_key else 'no API key'})"
        )
        if not api_key and not loopback(args.host):
            say(f"warning: listening on {args.host} without an API key: anyone who can reach it may use it")
        files = raise_open_files_limit()
        # each connection holds a file descriptor: past the limit a connection is answered 503
        # at once, and descriptors stay free for what is open now (model, database) and a margin
        concurrency = args.max_connections
        if files is not None:
            concurrency = max(16, min(concurrency, files - open_files() - 64))
        config = uvicorn.Config(
            application,
            host=args.host,
            port=args.port,
            lifespan="on",
            timeout_graceful_shutdown=args.grace,
            log_level="info",
            http=header_timeout_protocol(args.header_timeout),
            limit_concurrency=concurrency,
            timeout_keep_alive=5,
        )
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with the
        # handlers it found: ours turn it into Stopped, so the database is closed below (the
        # default SIGTERM handler would end the process before it could be)
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            graceful(uvicorn, config, application.state, args.grace).run(sockets=[sock])
        except Stopped as e:
            say(f"stopped by {e}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if application is not None:
            application.state.sql.stop()  # a statement still running would hold the database's mutex
            application.state.batcher.stop()
        db.close()
        say(f"closed {', '.join(paths)}")
    return None


def graceful(uvicorn, config, state, grace: float):
    """uvicorn's server, but generation and SQL statements still running when the grace ends
    are answered 503 (shutting_down) first: uvicorn cancels what is left, which a client sees as
    a bare 500 (and a cancelled request's statement would go on running in its thread)."""

    def stop_beside():  # stop() waits for the worker: beside the loop, which must keep answering
        state.sql.stop()
        threading.Thread(target=state.batcher.stop, name="m3db-stop", daemon=True).start()

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            asyncio.get_running_loop().set_exception_handler(quiet_accept_errors())
            await super().startup(sockets)

        async def shutdown(self, sockets=None):
            timer = asyncio.get_running_loop().call_later(max(0.0, grace - 0.5), stop_beside)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return Server(config)


def raise_open_files_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit (each connection holds
    one; a low soft limit, often 1024 or less, lets a few hundred idle connections starve the
    server). Returns the soft limit now in force, or None where there is none to read."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    # an unlimited hard limit may still be over the kernel's own (nr_open): try smaller ones
    for target in (1 << 20, 65536) if hard == unlimited else (hard,):
        if soft == unlimited or target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            break
        except (ValueError, OSError):
            continue
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def open_files() -> int:
    """How many file descriptors this process holds now (64 where it cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def header_timeout_protocol(timeout: float):
    """uvicorn's HTTP protocol class, closing a connection that has not sent a whole request's
    headers `timeout` seconds after it opened (or after its last response): uvicorn itself waits
    for them forever, so slow or silent clients could hold every connection. A connection past
    uvicorn's limit_concurrency is answered 503 and closed at once (uvicorn would keep it open
    until its request came), so open connections never use up the open-files limit."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeout(AutoHTTPProtocol):
        _m3db_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            limit = self.limit_concurrency
            if limit is not None and len(self.connections) > limit:
                transport.write(BUSY)
                transport.close()
                return
            self._m3db_arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._m3db_arm()

        def connection_lost(self, exc):
            self._m3db_disarm()
            super().connection_lost(exc)

        def _m3db_arm(self):
            self._m3db_disarm()
            if not self.transport.is_closing():
                self._m3db_timer = self.loop.call_later(timeout, self._m3db_expire)

        def _m3db_disarm(self):
            if self._m3db_timer is not None:
                self._m3db_timer.cancel()
                self._m3db_timer = None

        def _m3db_expire(self):
            self._m3db_timer = None
            waiting = self.cycle is None or self.cycle.response_complete  # no request since it was armed
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeout


def quiet_accept_errors(every: float = 10.0):
    """An event-loop exception handler logging asyncio's "socket.accept() out of system resource"
    (out of open files) once per `every` seconds with a count, not once per attempt: Python 3.11
    retries the accept up to the listen backlog (2048) times per loop turn, each with a
    traceback, which filled the log with hundreds of thousands of lines."""
    import logging
    import time

    log = logging.getLogger("m3db.server")
    state = {"last": float("-inf"), "count": 0}

    def handler(loop, context):
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        state["count"] += 1
        now = time.monotonic()
        if now - state["last"] >= every:
            log.error(
                "cannot accept connections: %s (%d times since the last report); lower --max-connections, or "
                "raise the hard limit on open files (ulimit -Hn)",
                context.get("exception"),
                state["count"],
            )
            state["last"], state["count"] = now, 0

    return handler


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or an error that says why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise InvalidInputError(
            f"--host {host!r} is not an address this machine can listen on ({e.strerror}); "
            "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = {
            errno.EADDRINUSE: f"port {port} is already in use on {host} (another server, or an m3db serve "
            "still running): stop it, or choose another port with --port",
            errno.EADDRNOTAVAIL: f"{host!r} is not an address of this machine: use 127.0.0.1 or 0.0.0.0 with --host",
            errno.EACCES: f"port {port} needs privileges on this machine: choose one above 1023 with --port",
        }.get(e.errno, f"cannot listen on {host} port {port}: {e.strerror}")
        raise InvalidInputError(why) from None
    return sock


class Stopped(Exception):
    """SIGINT or SIGTERM arrived (uvicorn has already shut the server down)."""


def on_signal(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

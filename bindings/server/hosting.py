"""Hosting: `run(db, host=, port=, ...)` serves a knowledge base over HTTP from Python, hardened
as `m3db serve` is (the CLI only turns its arguments into this call); `run_tenants(dbs, keys)`
serves several, each to the keys given it (tenants.py), the keys file reread on SIGHUP.

uvicorn runs the app (app.py) on a socket bound first (a port in use fails at once), with: a
header timeout (uvicorn waits for headers forever, so silent clients could hold every
connection), a connection limit answered 503 at once, the open-files limit raised to its hard
limit, asyncio's accept errors logged once per 10 s instead of once per attempt, and a graceful
shutdown on SIGINT/SIGTERM in which generation, SQL and document ingests still running when the
grace ends are answered 503 (shutting_down) rather than cut. Imports: uvicorn (the server extra),
this package.
"""

import asyncio
import errno
import ipaddress
import logging
import os
import signal
import socket
import threading
import time

from m3db.errors import InvalidInputError

from .app import Limits, app
from .tenants import tenants

log = logging.getLogger("m3db.server")


def run(
    db,
    *,
    name: str | None = None,
    api_key: str | None = None,
    write: bool = False,
    limits: Limits | None = None,
    public_metrics: bool = False,
    **hosting,
) -> None:
    """Serve `db` (a Database, or a PackageSet from m3db.attach) at http://host:port/v1 until
    SIGINT or SIGTERM, then stop generation, SQL and document ingests; the caller closes `db`.

    name: the model id clients send (default: the file name); api_key: require
    `Authorization: Bearer KEY`; write: accept writes (a database opened for writing); limits:
    what one request may ask (app.Limits); public_metrics: GET /metrics without the key;
    hosting: how it is served (`serve_app`: host, port, grace, header_timeout,
    max_connections, sock, say).
    """

    def build():
        return app(db, name=name, api_key=api_key, write=write, limits=limits, public_metrics=public_metrics)

    access = f"{'writable' if write else 'read-only'}; {'API key required' if api_key else 'no API key'}"
    serve_app(build, access, keyed=bool(api_key), **hosting)


def run_tenants(
    dbs: dict,
    keys: str,
    *,
    write: bool = False,
    limits: Limits | None = None,
    public_metrics: bool = False,
    **hosting,
) -> None:
    """Serve several knowledge bases, `dbs` ({name: Database or PackageSet}), each to the keys
    the keys file at path `keys` gives it (tenants.py, keys.py), as `run` serves one (hosting:
    the same); SIGHUP rereads the keys file. The caller closes the databases."""

    def build():
        return tenants(dbs, keys, write=write, limits=limits, public_metrics=public_metrics)

    access = f"{'writes by the keys given them' if write else 'read-only'}; keys from {keys}"
    serve_app(build, access, keyed=True, **hosting)


def serve_app(
    build,
    access: str,
    *,
    keyed: bool,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace: float = 10.0,
    header_timeout: float = 10.0,
    max_connections: int = 1000,
    sock: socket.socket | None = None,
    say=print,
) -> None:
    """Bind (unless `sock` is given), build the app (`build()`), serve it under uvicorn until a
    signal, then stop what its knowledge bases run. grace: seconds running requests get on
    SIGTERM; header_timeout: seconds a connection may take to send a request's headers;
    max_connections: past it a new connection is answered 503; sock: a socket already bound (see
    `listen`), else one is bound at host:port; say: where the one-line notices go; access: what
    the notice says of writes and keys; keyed: whether a key is required (else a warning off
    loopback)."""
    import uvicorn

    if not (0 < header_timeout < float("inf")):
        raise InvalidInputError(f"header_timeout {header_timeout}: expected a positive number of seconds")
    if max_connections < 1:
        raise InvalidInputError(f"max_connections {max_connections}: expected a positive integer")
    if sock is None and (not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535):
        raise InvalidInputError(f"port {port!r}: expected an integer in 0-65535 (0: any free port)")
    own_socket = sock is None
    if own_socket:
        sock = listen(host, port)
    application = None
    try:
        application = build()
        shown = f"[{host}]" if ":" in host else host
        names = ", ".join(repr(srv.kb.name) for srv in application.state.served)
        say(f"serving {names} at http://{shown}:{sock.getsockname()[1]}/v1 ({access})")
        if not keyed and not loopback(host):
            say(f"warning: listening on {host} without an API key: anyone who can reach it may use it")
        files = raise_open_files_limit()
        # each connection holds a file descriptor: past the limit a connection is answered 503
        # at once, and descriptors stay free for what is open now (model, database) and a margin
        concurrency = max_connections
        if files is not None:
            concurrency = max(16, min(concurrency, files - open_files() - 64))
        config = uvicorn.Config(
            application,
            host=host,
            port=port,
            lifespan="on",
            timeout_graceful_shutdown=grace,
            log_level="info",
            http=header_timeout_protocol(header_timeout),
            limit_concurrency=concurrency,
            timeout_keep_alive=5,
        )
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with the
        # handlers it found: ours turn it into Stopped, so the caller closes the database (the
        # default SIGTERM handler would end the process before it could)
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        reload = getattr(application.state, "reload", None)
        if reload is not None:  # SIGHUP rereads the keys file; running requests go on
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, frame: say(reload()))
        try:
            graceful(uvicorn, config, application.state, grace).run(sockets=[sock])
        except Stopped as e:
            say(f"stopped by {e}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if application is not None:
            for srv in application.state.served:
                srv.stop()  # nothing runs on, or writes, once the caller closes the databases
        if own_socket:
            sock.close()


def graceful(uvicorn, config, state, grace: float):
    """uvicorn's server, but generation, SQL statements and document ingests still running when
    the grace ends are answered 503 (shutting_down) first: uvicorn cancels what is left, which a
    client sees as a bare 500 (and a cancelled request's statement or ingest would go on running
    in its thread, which the process waits for on exit)."""

    def stop_beside():  # stop() waits for the worker: beside the loop, which must keep answering
        for srv in state.served:
            srv.sql.stop()
            srv.kb.stop_ingests()  # each ends at its next stop point, the documents before it stored
            threading.Thread(target=srv.batcher.stop, name="m3db-stop", daemon=True).start()

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
            f"host {host!r} is not an address this machine can listen on ({e.strerror}); "
            "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface) (--host, or host=)"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = {
            errno.EADDRINUSE: f"port {port} is already in use on {host} (another server, or an m3db serve "
            "still running): stop it, or choose another port (--port, or port=)",
            errno.EADDRNOTAVAIL: f"{host!r} is not an address of this machine: use 127.0.0.1 or 0.0.0.0 "
            "(--host, or host=)",
            errno.EACCES: f"port {port} needs privileges on this machine: choose one above 1023 (--port, or port=)",
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

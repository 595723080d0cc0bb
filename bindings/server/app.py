"""The ASGI app: `app(db)` serves a database (a directory or a `.m3kb` package) or a PackageSet of
several packages: the OpenAI endpoints (openai.py), the memory endpoints (memory.py), the
batcher (batch.py), request checks (fields.py) and their OpenAPI document (schema.py). This
module composes them: routes, the API key, errors in OpenAI's shape, and shutdown. `served`
builds one knowledge base's app, which `app` wraps and tenants.py routes to (several knowledge
bases, a key each may reach). `run` (hosting.py) serves either under uvicorn; docs/server.md
describes the API.

Starlette (not FastAPI): a small, maintained ASGI toolkit with streaming responses and
lifespan events and nothing else; request checking and the OpenAPI document come from our own
field tables, so no pydantic models are needed. Needs the server extra: pip install 'm3db[server]'.
"""

import contextlib
import dataclasses
import hmac
import logging
import os
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import m3db
from m3db.errors import InvalidInputError, M3DBError

from .batch import Batcher
from .errors import ApiError, from_m3db
from .http import error_response
from .kb import KnowledgeBase
from .memory import ADD_FIELDS, SEARCH_FIELDS, SQL_FIELDS, MemoryEndpoints
from .metrics import Metrics
from .openai import EMBEDDING_FIELDS, OpenAIEndpoints
from .schema import openapi
from .sql import SqlRunner

log = logging.getLogger("m3db.server")

__all__ = ["Limits", "app"]

# seconds shutdown waits for a stopped ingest to reach its next stop point (a fraction of a
# second: a few chunks encoded), so nothing writes to the database once its owner closes it
INGEST_STOP = 30.0
# the scope key a router in front of the app sets (tenants.py): whether this request's API key
# may write the knowledge base it names (absent: the server's --write decides alone)
MAY_WRITE = "m3db.may_write"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much generation work may wait.

    max_body_bytes: the largest request body (413 past it); body_timeout: seconds a request's
    body may take to arrive once its headers have (408 past them). max_tokens: the largest
    max_tokens a request may ask; default_max_tokens: a chat request's when it names none.
    max_batch: rows decoded together; max_queue: generation requests queued or running (429
    past it). sql_timeout: seconds one /v1/sql statement may run (then it is interrupted: 400
    query_timeout); sql_max_rows, sql_max_bytes: the largest /v1/sql result, in rows and in
    bytes of JSON (400 result_too_large past them); sql_max_queue: /v1/sql statements waiting
    for the database or running (429 past it: each may hold the database up to sql_timeout).
    """

    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_batch: int = 8
    max_queue: int = 64
    body_timeout: float = 30.0
    sql_timeout: float = 30.0
    sql_max_rows: int = 10_000
    sql_max_bytes: int = 64 * 1024 * 1024
    sql_max_queue: int = 16

    def check(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in (float, "float"):
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                    raise InvalidInputError(f"{f.name} must be a positive number of seconds, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidInputError(f"{f.name} must be a positive integer, got {v!r}")
        if self.default_max_tokens > self.max_tokens:
            raise InvalidInputError(
                f"default_max_tokens={self.default_max_tokens} is over max_tokens={self.max_tokens}; lower it"
            )


class BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer <key>` (constant-time compare)."""

    def __init__(self, app, key: str, *, open_paths=()):
        self.app, self.key, self.open_paths = app, key.encode(), frozenset(open_paths)
        self.state = app.state  # the wrapped app's (what hosting stops on shutdown)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, token = header.partition(b" ")
            # compare even when the scheme is wrong, so the time taken says nothing about the key
            good = hmac.compare_digest(token.strip(), self.key)
            if scheme.lower() != b"bearer" or not good:
                what = "a wrong API key" if header else "no API key"
                error = ApiError(
                    401,
                    f"{what}: send the header `Authorization: Bearer <key>` with the server's key",
                    "invalid_api_key",
                )
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class State:
    """What the endpoints share: the knowledge base, the batcher, the limits."""

    def __init__(self, kb: KnowledgeBase, batcher: Batcher, limits: Limits):
        self.kb, self.batcher, self.limits = kb, batcher, limits
        self.sql = SqlRunner(kb, limits)
        self.started = int(time.time())

    def check_model(self, name) -> None:
        """A request's `model` names this knowledge base, or it is a 404."""
        if name != self.kb.name:
            raise ApiError(
                404, f"no model {name!r} is served here; this server serves {self.kb.name!r}", "model_not_found"
            )

    def may_write(self, request: Request) -> bool:
        return request.scope.get(MAY_WRITE, True)

    def require_writable(self, request: Request) -> None:
        """The server writes (--write) and the request's key may write this knowledge base."""
        self.kb.require_writable()
        if not self.may_write(request):
            raise ApiError(403, f"this API key may not write {self.kb.name!r}; it may read it", "permission_denied")

    def stop(self, ingest_stop: float | None = INGEST_STOP) -> None:
        """Stop what runs: a SQL statement (it would hold the database's mutex), generation, and
        an ingest at its next stop point, so nothing uses the database once its owner closes it."""
        self.sql.stop()
        self.batcher.stop()
        self.kb.stop_ingests(ingest_stop)


def checked_limits(limits: Limits | None) -> Limits:
    limits = limits or Limits()
    limits.check()
    return limits


def app(
    db,
    *,
    name: str | None = None,
    api_key: str | None = None,
    write: bool = False,
    limits: Limits | None = None,
    public_metrics: bool = False,
):
    """The ASGI app serving `db` (a Database, or a PackageSet from m3db.attach).

    name: the model id clients send (default: the database's file name without extension).
    api_key: when given, every request needs `Authorization: Bearer <api_key>`; public_metrics
    lets GET /metrics (Prometheus, metrics.py) through without it.
    write: accept writes (add documents, forget, writing SQL); the database must be open for
    writing. limits: see Limits. The app does not close the database: its owner does, after
    the server stops (the app's shutdown stops generation first).
    """
    limits = checked_limits(limits)
    if api_key is not None and (not isinstance(api_key, str) or len(api_key) < 8):
        raise InvalidInputError("api_key must be a string of at least 8 characters")
    application = served(db, name=name or default_name(db), write=write, limits=limits, auth=bool(api_key))
    metrics = Metrics(application.routes)
    metrics.serve(application.state.srv.kb, application.state.srv.batcher)
    # /metrics is Prometheus's text, not JSON: served beside the API, outside its OpenAPI document
    application.routes.append(Route("/metrics", metrics.endpoint, methods=["GET"]))
    application.state.metrics = metrics
    if api_key:
        application = BearerAuth(application, api_key, open_paths=("/metrics",) if public_metrics else ())
    return metrics.asgi(application)  # outside the key check: its 401s are counted too


def served(db, *, name: str, write: bool, limits: Limits, auth: bool) -> Starlette:
    """One knowledge base's app (no key check, no /metrics: `app` or a tenant router adds
    them); its state holds `srv` (the knowledge base, its batcher and SQL runner), `served`
    (the States to stop on shutdown) and `operations` (what its OpenAPI document describes)."""
    kb = KnowledgeBase(db, name=name, writable=write)
    batcher = Batcher(kb, max_batch=limits.max_batch, max_queue=limits.max_queue)
    srv = State(kb, batcher, limits)
    chat, memory = OpenAIEndpoints(srv), MemoryEndpoints(srv)
    table = [
        ("/v1/models", "GET", "the served model (the knowledge base)", None, chat.models),
        ("/v1/models/{model}", "GET", "one served model", None, chat.model),
        (
            "/v1/chat/completions",
            "POST",
            "chat with memory (OpenAI's API; stream: true for SSE)",
            chat.chat_fields,
            chat.chat,
        ),
        (
            "/v1/completions",
            "POST",
            "complete text with memory (OpenAI's API)",
            chat.completion_fields,
            chat.completions,
        ),
        ("/v1/embeddings", "POST", "the knowledge base's retrieval embeddings", EMBEDDING_FIELDS, chat.embeddings),
        (
            "/v1/memories/search",
            "POST",
            "recall memories by text or vector, with a SQL filter",
            SEARCH_FIELDS,
            memory.search,
        ),
        ("/v1/memories/{memory_id}", "GET", "one memory: text, document, metadata", None, memory.get),
        ("/v1/memories/{memory_id}", "DELETE", "forget one memory (--write)", None, memory.forget),
        ("/v1/documents", "POST", "add documents: chunk, embed, encode, commit (--write)", ADD_FIELDS, memory.add),
        (
            "/v1/sql",
            "POST",
            "one SQL statement (no generate()); writing ones only with --write; bounded in time and result size",
            SQL_FIELDS,
            memory.sql,
        ),
        ("/v1/server", "GET", "the server's state: knowledge base, limits, queue, batches", None, None),
        ("/health", "GET", "200 while the server runs", None, None),
        ("/openapi.json", "GET", "this document", None, None),
    ]
    schema = openapi(
        [(p, m, s, f) for p, m, s, f, _ in table],
        title=f"m3db: {kb.name}",
        version=m3db.__version__,
        auth=auth,
        model=kb.name,
        packages=bool(kb.packages),
    )

    async def server_state(request: Request) -> JSONResponse:
        size = await run_in_threadpool(len, kb.db)
        return JSONResponse(
            {
                "model": kb.name,
                "memories": size,
                "packages": kb.packages,
                "writable": kb.writable,
                "pid": os.getpid(),  # which process answered (a replica among several: bindings/ray/replicas.py)
                "limits": dataclasses.asdict(limits),
                "generation": batcher.stats(),
                "sql": srv.sql.stats(),
            }
        )

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def schema_doc(request: Request) -> JSONResponse:
        return JSONResponse(schema)

    extra = {"/v1/server": server_state, "/health": health, "/openapi.json": schema_doc}
    # one route per path, whatever its methods: a 405's Allow then lists them all (Starlette
    # names only the first route's when a path has several)
    handlers: dict = {}
    for p, m, _, _, h in table:
        handlers.setdefault(p, {})[m] = guarded(h or extra[p])
    routes = [Route(p, by_method(methods), methods=list(methods)) for p, methods in handlers.items()]

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        await run_in_threadpool(srv.stop)  # generation, SQL, ingests end before the owner closes the database

    application = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: on_api_error,
            M3DBError: on_m3db_error,
            HTTPException: on_http_error,
            Exception: on_crash,
        },
    )
    application.state.srv = srv  # the knowledge base, its batcher and SQL runner
    application.state.served = [srv]
    application.state.operations = [(p, m, s, f) for p, m, s, f, _ in table]  # what the document describes
    return application


def guarded(handler):
    """The endpoint, answering a bug as a 500 in OpenAI's shape itself. (Left to Starlette's
    `Exception` handler, the error would be re-raised after the answer, and uvicorn would close
    the connection: a client's next request on it would fail with a reset.)"""

    async def endpoint(request: Request):
        try:
            return await handler(request)
        except (ApiError, M3DBError, HTTPException):
            raise  # answered by their handlers below
        except Exception as e:
            return await on_crash(request, e)

    endpoint.__name__ = endpoint.__qualname__ = getattr(handler, "__name__", "endpoint")
    return endpoint


def default_name(db) -> str:
    if isinstance(db, m3db.PackageSet):
        return "+".join(db.names)
    base = os.path.basename(os.path.normpath(str(db.path)))
    return os.path.splitext(base)[0] or "m3db"


async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e)


async def on_m3db_error(request: Request, e: M3DBError) -> JSONResponse:
    error = from_m3db(e)
    if error.status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, e)
    return error_response(error)


async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {
        404: f"no endpoint {request.url.path}; see /openapi.json for the endpoints",
        405: f"{request.method} is not allowed on {request.url.path}; see /openapi.json",
    }.get(e.status_code, str(e.detail))
    response = error_response(ApiError(e.status_code, message, codes.get(e.status_code, "http_error")))
    response.headers.update(e.headers or {})  # a 405's Allow (RFC 9110), which Starlette puts there
    return response


def by_method(methods: dict):
    """One endpoint answering each method with its handler (HEAD with GET's, as Starlette does)."""

    async def endpoint(request: Request):
        return await methods["GET" if request.method == "HEAD" else request.method](request)

    return endpoint


async def on_crash(request: Request, e: Exception) -> JSONResponse:
    """A bug: the client gets a 500 without a traceback; the log keeps it."""
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(ApiError(500, f"the server failed ({type(e).__name__}); see its log", "server_error"))

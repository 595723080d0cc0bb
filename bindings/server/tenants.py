"""Several knowledge bases behind one server, each reached only by the keys given it
(`m3db serve --kb NAME=PATH ... --keys FILE`; keys.py reads the file).

Isolated by construction: each knowledge base is an app of its own (app.served: its database,
its decoded-memory cache, its batcher, its SQL runner), so no batch, cache or statement ever
holds two tenants' memories; this router only decides which app a request reaches. It checks
the key, reads the knowledge base a request names (the `model` field of a JSON body, `?model=`
on GET and DELETE, the path of /v1/models/{model}), and hands the request, its body replayed,
to that app, with whether the key may write it (app.MAY_WRITE). A name the key was not given is
the same 404 as a name that does not exist, so a key cannot even learn what else is served.
/v1/models lists the key's knowledge bases; /metrics (one registry, a label per knowledge base,
none per key) and /health are the server's. `reload` rereads the keys file (SIGHUP, hosting.py):
requests already routed finish as they were; a file that does not check out keeps the old keys.
"""

import logging

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse

import m3db
from m3db.errors import InvalidInputError

from .app import MAY_WRITE, Limits, checked_limits, served
from .errors import ApiError, bad_request
from .http import error_response, parse_json, read_body
from .keys import Keys
from .metrics import UNMATCHED, Metrics
from .schema import openapi

log = logging.getLogger("m3db.server")

__all__ = ["tenants"]

NAMED_IN_QUERY = ("GET", "HEAD", "DELETE")  # a request without a body names its knowledge base in ?model=
SERVER_PATHS = ("/metrics", "/health", "/openapi.json", "/v1/models")  # the router's own, GET only


def tenants(
    dbs: dict,
    keys: str,
    *,
    write: bool = False,
    limits: Limits | None = None,
    public_metrics: bool = False,
):
    """The ASGI app serving several knowledge bases, `dbs` ({name: Database or PackageSet}),
    to the keys of the keys file at path `keys` (keys.py). write: databases opened for writing
    accept writes from the keys given `write` on them. The app does not close the databases:
    their owner does, after the server stops."""
    if not isinstance(dbs, dict) or not dbs:
        raise InvalidInputError("tenants() serves a dict of {name: database}; got none")
    for name in dbs:
        if not isinstance(name, str) or not name or "/" in name or not name.isprintable():
            raise InvalidInputError(f"a knowledge base's name is a line of text without '/', got {name!r}")
    limits = checked_limits(limits)
    apps = {}
    for name, db in dbs.items():
        writable = write and not isinstance(db, m3db.PackageSet) and not db.read_only
        apps[name] = served(db, name=name, write=writable, limits=limits, auth=True)
    router = Router(apps, keys, limits=limits, public_metrics=public_metrics)
    return router.metrics.asgi(router)


class Router:
    """The ASGI app in front of one app per knowledge base."""

    def __init__(self, apps: dict, keys_path: str, *, limits: Limits, public_metrics: bool):
        self.apps, self.keys_path, self.limits, self.public_metrics = apps, keys_path, limits, public_metrics
        self.writable = {name: a.state.srv.kb.writable for name, a in apps.items()}
        self.keys = Keys.load(keys_path, self.writable)
        first = next(iter(apps.values()))
        self.metrics = Metrics(first.routes)  # every app has the same routes
        for a in apps.values():
            self.metrics.serve(a.state.srv.kb, a.state.srv.batcher)
        self.document = openapi(first.state.operations, title="m3db", version=m3db.__version__, auth=True)
        self.state = State()  # what hosting reads
        self.state.served = [a.state.srv for a in apps.values()]
        self.state.reload = self.reload

    def reload(self) -> str:
        """Reread the keys file; the keys it had stay if the new file does not check out."""
        try:
            keys = Keys.load(self.keys_path, self.writable)
        except InvalidInputError as e:
            log.error("the keys file was not reloaded, the keys read before stay: %s", e)
            return f"keys file not reloaded: {e}"
        self.keys = keys  # one assignment: a request sees the old keys or the new, never a mix
        log.info("the keys file was reloaded: %d keys", len(keys.keys))
        return f"keys file reloaded: {len(keys.keys)} keys"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            target = await self.route(scope, receive, send)
        except ApiError as e:
            await error_response(e)(scope, receive, send)
            return
        except Exception as e:  # a bug of the router's: a 500 in OpenAI's shape, the traceback in the log
            log.exception("%s %s failed", scope["method"], scope["path"])
            error = ApiError(500, f"the server failed ({type(e).__name__}); see its log", "server_error")
            await error_response(error)(scope, receive, send)
            return
        if target is not None:  # the knowledge base's app answers (its own errors included)
            app, receive_body = target
            await app(scope, receive_body, send)

    async def lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for srv in self.state.served:  # generation, SQL, ingests end before the owner closes the databases
                    await run_in_threadpool(srv.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def route(self, scope, receive, send):
        """Answer the router's own paths (returns None), or return the app that answers this
        request and the receive it reads the request through."""
        path, method = scope["path"], scope["method"]
        if path in SERVER_PATHS and method not in ("GET", "HEAD"):
            response = error_response(
                ApiError(405, f"{method} is not allowed on {path}; see /openapi.json", "method_not_allowed")
            )
            response.headers["Allow"] = "GET, HEAD"
            await response(scope, receive, send)
            return None
        if path == "/metrics":
            if not self.public_metrics:
                self.authenticate(scope)
            await (await self.metrics.endpoint(Request(scope)))(scope, receive, send)
            return None
        key = self.authenticate(scope)
        if path in SERVER_PATHS:
            body = {"/health": {"status": "ok"}, "/openapi.json": self.document}.get(path)
            if path == "/v1/models":
                cards = [self.card(n) for n in self.apps if n in key.read]
                body = {"object": "list", "data": cards}
            await JSONResponse(body)(scope, receive, send)
            return None
        if self.metrics.endpoint_of(path) == UNMATCHED:
            raise ApiError(404, f"no endpoint {path}; see /openapi.json for the endpoints", "not_found")
        request = Request(scope, receive)
        body = None
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]  # the ASGI path is decoded already
        elif method in NAMED_IN_QUERY:
            name = request.query_params.get("model")
            if name is None:
                raise bad_request(
                    f"name the knowledge base: {path}?model=NAME (GET /v1/models lists those this key may use)",
                    param="model",
                )
        else:
            body = await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout)
            value = parse_json(body)
            name = value.get("model") if isinstance(value, dict) else None
            if not isinstance(name, str):
                raise bad_request(
                    'name the knowledge base: send "model": NAME in the body (GET /v1/models lists those this '
                    "key may use)",
                    param="model",
                )
        if name not in key.read or name not in self.apps:  # one answer for both: nothing else is told
            raise ApiError(
                404,
                f"no model {name!r} is served here; GET /v1/models lists the ones this API key may use",
                "model_not_found",
            )
        scope["m3db.kb"] = name  # the metrics' label (the wrapper reads this same scope)
        scope[MAY_WRITE] = name in key.write
        return self.apps[name], replayed(body, receive) if body is not None else receive

    def authenticate(self, scope):
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        key = self.keys.match(token.strip())  # compared even when the scheme is wrong
        if scheme.lower() != b"bearer" or key is None:
            what = "a wrong API key" if header else "no API key"
            raise ApiError(
                401, f"{what}: send the header `Authorization: Bearer <key>` with your API key", "invalid_api_key"
            )
        return key

    def card(self, name: str) -> dict:
        srv = self.apps[name].state.srv
        return {"id": name, "object": "model", "created": srv.started, "owned_by": "m3db"}


def replayed(body: bytes, receive):
    """A receive that gives the body the router already read, then the client's own messages
    (a disconnect, which the app's streams watch for)."""
    sent = False

    async def receive_replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_replayed

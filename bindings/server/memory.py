"""The memory endpoints: search, get and forget one memory, add documents, SQL.

Reads run in Starlette's thread pool beside each other (each engine verb under the database's
mutex); writes run one at a time (`KnowledgeBase.write_lock`) and only on a server started
with `--write`. `srv` (the app's state: kb, limits) arrives as an argument.
"""

import logging

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from m3db.errors import M3DBError
from m3db.extend import MAX_K

from .errors import ApiError, bad_request, from_m3db
from .fields import Field, parse
from .http import read_json, unless_gone
from .kb import DocumentFailed, Ingest, IngestStopped, stored_source
from .openai import MEMORY_FIELDS, PARAMS_DEPTH
from .sql import Statement, jsonable

log = logging.getLogger("m3db.server")

# a knowledge base named like the OpenAI endpoints name theirs: optional with one served, the
# router's key to the knowledge base with several (tenants.py)
MODEL_FIELD = Field("model", ("string",), "the knowledge base (GET /v1/models); needed when several are served")

SEARCH_FIELDS = [
    MODEL_FIELD,
    Field("query", ("string",), "a text to search for (embedded by the knowledge base's embedder)"),
    Field("vector", ("array",), "a query vector of the embedder's dimension, instead of query", items="number"),
    Field("k", ("integer",), "how many memories (default 5)", minimum=1, maximum=min(MAX_K, 1000)),
    *[f for f in MEMORY_FIELDS if f.name in ("where", "params")],
]

DOCUMENT_FIELDS = [
    Field("text", ("string",), "the document's text (chunked into references)", required=True),
    Field("source", ("string", "null"), "a unique name for the document (default: a hash of its text)"),
    Field("title", ("string", "null"), "its title"),
    Field("uri", ("string", "null"), "where it came from"),
    Field("metadata", ("object",), "metadata columns of its memories: {name: value}"),
]

ADD_FIELDS = [
    MODEL_FIELD,
    Field(
        "documents",
        ("array",),
        "documents to add: [{text, source?, title?, uri?, metadata?}]",
        required=True,
        minimum=1,
        maximum=256,
        items="object",
    ),
    Field("cold", ("boolean",), "store text and embeddings only; encode each memory on first read"),
    Field("replace", ("boolean",), "a source already stored with other text is replaced, not refused"),
]

SQL_FIELDS = [
    MODEL_FIELD,
    Field("query", ("string",), "one SQL statement (docs/sql.md)", required=True),
    Field("params", ("array", "object"), "values for ? (an array) or $name (an object)", check=PARAMS_DEPTH),
    Field("package", ("string",), "the package whose catalog to query (a server of several packages)"),
]


def document_error(failed: DocumentFailed, request: Request) -> ApiError:
    """The error of a batch whose document `failed.index` failed: its status and code, its
    index first in the message, and the documents stored before it (`stored`, which stay)."""
    e = failed.error
    if isinstance(e, IngestStopped):  # shutdown, or the client left: at a stop point, before its commit
        error = ApiError(503 if e.reason == "shutting_down" else 499, str(e), e.reason)
    elif isinstance(e, M3DBError):
        error = from_m3db(e)
        if error.status >= 500:
            log.error("%s %s: documents[%d]: %s", request.method, request.url.path, failed.index, e)
    else:  # a bug: the log keeps the traceback
        log.error("%s %s: documents[%d] failed", request.method, request.url.path, failed.index, exc_info=e)
        error = ApiError(500, f"the server failed ({type(e).__name__}); see its log", "server_error")
    name = f"documents[{failed.index}]" + (f" (source {failed.source!r})" if failed.source is not None else "")
    if failed.stored:
        which = ", ".join(f"documents[{d['index']}]" for d in failed.stored)
        verbs = "was stored before it and stays" if len(failed.stored) == 1 else "were stored before it and stay"
        done = f"{which} {verbs} stored (each document is its own commit; see `stored`)"
    else:
        done = "no document of this request was stored"
    rest = f"; the {failed.untried} after it were not tried" if failed.untried else ""
    return ApiError(
        error.status,
        f"{name}: {error.message.rstrip('.')}. Nothing of {name} was stored; {done}{rest}",
        error.code,
        param=f"documents[{failed.index}]",
        extra={"stored": failed.stored},
    )


class MemoryEndpoints:
    """The handlers of /v1/memories, /v1/documents and /v1/sql."""

    def __init__(self, srv):
        self.srv = srv

    async def body(self, request, fields):
        limits = self.srv.limits
        body = parse(await read_json(request, limits.max_body_bytes, limits.body_timeout), fields)
        if "model" in body:
            self.srv.check_model(body["model"])
        return body

    async def search(self, request: Request) -> JSONResponse:
        """POST /v1/memories/search: recall by text or vector, with a filter."""
        body = await self.body(request, SEARCH_FIELDS)
        if ("query" in body) == ("vector" in body):
            raise bad_request("send either query (a text) or vector (numbers), one of them", param="query")
        query = body.get("query", body.get("vector"))
        if isinstance(query, str) and not query.strip():
            raise bad_request("query is empty; send the text to search for", param="query")
        kb = self.srv.kb
        where, params = body.get("where"), body.get("params")

        def recall():
            return kb.recall(query, k=body.get("k", 5), where=where, params=params)

        if where is None:
            matches = await run_in_threadpool(recall)
        else:  # a filter is SQL from the client: under the statement time limit
            matches = await run_in_threadpool(self.srv.sql.filtered, recall)
        data = await run_in_threadpool(self.describe, matches)
        return JSONResponse({"object": "list", "data": data, "plan": jsonable(matches.plan)})

    def describe(self, matches) -> list[dict]:
        out = []
        for m, (document, title) in zip(matches, self.srv.kb.db.documents_of(matches)):
            package = getattr(m, "package", None)
            item = {
                "id": m.id,
                "score": m.score,
                "text": m.text,
                "document": document,
                "title": title,
                "document_id": m.document_id,
                "metadata": jsonable(m.metadata),
            }
            if package is not None:
                item["package"] = package
            out.append(item)
        return out

    def memory_id(self, request) -> int:
        text = request.path_params["memory_id"]
        if text == "search":  # /v1/memories/search is POST's alone: its other methods land here
            raise HTTPException(405, headers={"Allow": "POST"})
        if not (text.isascii() and text.isdigit()) or len(text) > 19:  # not "٣", which int() reads as 3
            raise bad_request(f"a memory id is a non-negative integer, got {text!r}", param="memory_id")
        return int(text)

    def package(self, request):
        """?package= (a server of several packages), after ?model= (optional) is checked."""
        package = request.query_params.get("package")
        unknown = set(request.query_params) - {"package", "model"}
        if unknown:
            raise bad_request(f"unknown query parameter {sorted(unknown)[0]!r}; only package= and model= are accepted")
        if "model" in request.query_params:
            self.srv.check_model(request.query_params["model"])
        return package

    async def get(self, request: Request) -> JSONResponse:
        """GET /v1/memories/{id}[?package=NAME]: one memory's text, document and metadata."""
        memory_id, package = self.memory_id(request), self.package(request)
        kb = self.srv.kb

        def read():
            m = kb.get(memory_id, package)
            ((document, title),) = kb.database(package).documents_of([m])
            out = {
                "id": m.id,
                "text": m.text,
                "document": document,
                "title": title,
                "document_id": m.document_id,
                "ordinal": m.ordinal,
                "token_count": m.token_count,
                "metadata": jsonable(m.metadata),
                "shape": None if m.keys is None else list(m.keys.shape),
            }
            if package is not None:
                out["package"] = package
            return out

        return JSONResponse(await run_in_threadpool(read))

    async def forget(self, request: Request) -> JSONResponse:
        """DELETE /v1/memories/{id}: forget one memory (a server started with --write)."""
        memory_id = self.memory_id(request)
        self.package(request)
        self.srv.require_writable(request)
        await run_in_threadpool(self.srv.kb.forget, memory_id)
        return JSONResponse({"id": memory_id, "object": "memory", "deleted": True})

    async def add(self, request: Request) -> JSONResponse:
        """POST /v1/documents: chunk, embed, encode and commit documents (a server started with
        --write). Shutdown stops the ingest (kb.stop_ingests), and so does a client that
        disconnects (it would hold the only writer for the whole encoding): the document it was
        on is not stored, those before it stay, and the answer (to a shutdown) lists them."""
        kb = self.srv.kb
        self.srv.require_writable(request)  # before reading a large body
        body = await self.body(request, ADD_FIELDS)
        docs = []
        for i, doc in enumerate(body["documents"]):
            docs.append(parse(doc, DOCUMENT_FIELDS, what=f"documents[{i}]"))
        ingest = Ingest()
        work = run_in_threadpool(
            kb.add_documents, docs, cold=body.get("cold", False), replace=body.get("replace", False), ingest=ingest
        )

        def left(e: Exception) -> None:  # a write stopped half way: the operator may want to know
            if isinstance(e, DocumentFailed):
                log.warning(
                    "%s %s: the client closed the connection: documents[%d] was stopped before its commit; the %d "
                    "stored before it stay",
                    request.method,
                    request.url.path,
                    e.index,
                    len(e.stored),
                )

        try:
            ids = await unless_gone(request, work, ingest.stop, "ingest", left=left)
        except DocumentFailed as failed:
            raise document_error(failed, request) from failed.error
        data = [
            {"index": i, "source": stored_source(d), "memory_ids": list(m), "added": bool(m)}
            for i, (d, m) in enumerate(zip(docs, ids))
        ]
        return JSONResponse({"object": "list", "data": data})

    async def sql(self, request: Request) -> Response:
        """POST /v1/sql: one statement (statements that write only on a server started with
        --write), under the server's SQL limits (sql.py). A client that disconnects
        stops its statement."""
        body = await self.body(request, SQL_FIELDS)
        if not body["query"].strip():
            raise bad_request("query is empty; send one SQL statement", param="query")
        statement = Statement()
        query, params, package = body["query"], body.get("params"), body.get("package")
        may_write = self.srv.may_write(request)
        work = run_in_threadpool(self.srv.sql.run, statement, query, params, package, may_write=may_write)
        return Response(await unless_gone(request, work, statement.stop, "statement"), media_type="application/json")

"""The tools an agent calls: recall, ask, sql and add_documents, each a translation of MCP
arguments into the engine's public verbs, under the HTTP server's bounds.

- recall: `kb.recall` (a `where` filter runs under the SQL time limit);
- ask: the engine's answer plan checks the mode, k and filter at once (the plan's own words),
  the filter runs once under the SQL time limit, then `db.generate` answers in the generation
  queue (generation.py): the one road, so the answer and its sources equal Python's;
- sql: the HTTP server's SQL runner (a time limit, row and byte caps, a queue, no generate());
- add_documents: the server's knowledge base, whose writes run one at a time (only with --write:
  the tool is not listed without it, and a call is refused with the fix).

Every result is a JSON object (the structured content, and the same JSON as text); every
failure an error result (`isError`) saying what was wrong and what to do, never a protocol
error or a traceback. The engine's verbs block, so each runs in a worker thread; a call the
client cancels stops its statement, or its question before its turn. Imports: the SDK's types,
anyio, the server binding's Statement and jsonable, this binding's modules.
"""

import functools
import json

import anyio
import mcp_types as types
from mcp.shared.exceptions import MCPError

from m3db.bindings.server import Statement, jsonable

from .errors import READ_ONLY, Refusal, explain
from .generation import Generation, Ticket
from .schemas import check_arguments, tables, tool


async def in_thread(fn, *args, stop=None, **kwargs):
    """fn(*args, **kwargs) in a worker thread. When the call is cancelled, `stop()` is called and
    the thread is left to end by itself; without `stop` the call waits for it (a write)."""
    call = functools.partial(fn, *args, **kwargs)
    if stop is None:
        return await anyio.to_thread.run_sync(call)
    try:
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        stop()
        raise


def result(value: dict) -> types.CallToolResult:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], structured_content=value)


def failure(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


class Tools:
    """The tools of one served knowledge base (`kb`, the server binding's KnowledgeBase)."""

    def __init__(self, kb, runner, generation: Generation, limits):
        self.kb, self.runner, self.generation, self.limits = kb, runner, generation, limits
        self.table = tables(
            max_tokens=limits.max_tokens,
            default_max_tokens=limits.default_max_tokens,
            packages=kb.packages,
            write=kb.writable,
        )
        self.listed = [name for name in self.table if kb.writable or name != "add_documents"]

    def list(self) -> list[types.Tool]:
        return [tool(name, *self.table[name]) for name in self.listed]

    async def call(self, name: str, arguments: dict | None) -> types.CallToolResult:
        """The result of one call; a bad call is an error result, an unknown tool a protocol error."""
        if name not in self.table:
            raise MCPError(types.INVALID_PARAMS, f"no tool named {name!r}; the tools: {', '.join(self.listed)}")
        try:
            if name not in self.listed:
                raise Refusal(f"{name} writes: {READ_ONLY}")
            arguments = check_arguments(name, arguments or {}, self.table[name][1])
            return result(await getattr(self, name)(**arguments))
        except Exception as e:  # noqa: BLE001 (every failure is the agent's to read, as an error result)
            return failure(explain(e, name))

    # -- the tools ---------------------------------------------------------------------------

    async def recall(self, text, k=5, where=None, params=None) -> dict:
        def recall():
            matches = self.kb.recall(text, k=k, where=where, params=params)
            return [self.memory(m, names) for m, names in zip(matches, self.kb.db.documents_of(matches))]

        if where is None and params is None:
            return {"memories": await in_thread(recall)}
        return {"memories": await in_thread(self.runner.filtered, recall)}  # SQL from the client: timed

    async def ask(self, question, memory="memory", k=None, where=None, params=None, max_tokens=None) -> dict:
        kb = self.kb
        plan = await in_thread(kb.plan, memory=memory, k=k, where=where, params=params)  # refused before the queue
        if plan.mode != "none" and (where is not None or params is not None):
            # run once under the SQL time limit; the recalls while decoding read the filter cache
            await in_thread(self.runner.filtered, kb.check_filter, where, params)
        ticket = Ticket()
        answer = await in_thread(
            self.generation.answer,
            ticket,
            question,
            memory=memory,
            k=k,
            where=where,
            params=params,
            max_tokens=self.limits.default_max_tokens if max_tokens is None else max_tokens,
            stop=ticket.cancel,
        )
        return {
            "answer": answer.text,
            "finish_reason": answer.finish_reason,
            "memory": answer.mode,
            "sources": [self.source(s) for s in answer.sources],
        }

    async def sql(self, query, params=None, package=None) -> dict:
        statement = Statement()
        data = await in_thread(
            self.runner.run, statement, query, params, package, stop=lambda: statement.stop("client_closed")
        )
        return json.loads(data)

    async def add_documents(self, documents, cold=False, replace=False) -> dict:
        ids = await in_thread(self.kb.add_documents, documents, cold=cold, replace=replace)
        stored = [
            {"index": i, "source": doc.get("source"), "memory_ids": list(new), "added": bool(new)}
            for i, (doc, new) in enumerate(zip(documents, ids))
        ]
        return {"documents": stored}

    # -- results -----------------------------------------------------------------------------

    @staticmethod
    def memory(match, names) -> dict:
        """A recalled memory as the agent reads it; `names`: its document's (source, title)."""
        out = {
            "id": match.id,
            "score": match.score,
            "text": match.text,
            "document": names[0],
            "title": names[1],
            "document_id": match.document_id,
            "metadata": jsonable(match.metadata),
        }
        return out | ({"package": match.package} if getattr(match, "package", None) is not None else {})

    @staticmethod
    def source(s) -> dict:
        """A memory an answer read (an m3db Source)."""
        out = {"id": s.id, "document": s.document, "title": s.title, "text": s.text}
        return out | ({"package": s.package} if s.package is not None else {})

"""A knowledge base as an MCP server: the SDK's low-level `Server` with the tools (tools.py) and
the documents as resources (documents.py) wired to it.

The low-level Server, not MCPServer: the tools' schemas are this binding's own table (checked
and listed from one place), the document list is paged with a cursor, and every failure is
worded here. What the HTTP server already owns is reused through its package: the knowledge
base with its single-writer rule (`KnowledgeBase`), SQL under a time limit and caps
(`SqlRunner`), and the limits (`Limits`). Imports: the SDK, m3db, the server binding, this
binding's modules.
"""

import os

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server

import m3db
from m3db.bindings.server import KnowledgeBase, Limits, SqlRunner

from .documents import Documents
from .generation import Generation
from .tools import Tools

INSTRUCTIONS = """An m3db knowledge base, {name!r}: documents chunked into memories that a small decoder reads \
while it answers. Tools: recall (find memories by meaning, with SQL filters), ask (answer a question from \
the knowledge base, with the memories it read as sources), sql (DuckDB SQL over the tables memories and \
documents){writes}. The documents are resources ({template})."""


class Served:
    """One knowledge base behind an MCP server: `server` (the SDK's Server) and `stop()`."""

    def __init__(self, db, *, name: str | None = None, write: bool = False, limits: Limits | None = None):
        limits = limits or Limits()
        limits.check()
        self.kb = KnowledgeBase(db, name=name or default_name(db), writable=write)
        self.runner = SqlRunner(self.kb, limits)
        self.generation = Generation(db, max_queue=limits.max_queue)
        self.tools = Tools(self.kb, self.runner, self.generation, limits)
        self.documents = Documents(self.kb, limits)
        writes = "; add_documents (add documents; this server accepts writes)" if write else ""
        template = self.documents.templates()[0].uri_template
        self.server = Server(
            self.kb.name,
            version=m3db.__version__,
            title=f"m3db: {self.kb.name}",
            instructions=INSTRUCTIONS.format(name=self.kb.name, writes=writes, template=template),
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
            on_list_resources=self.list_resources,
            on_list_resource_templates=self.list_resource_templates,
            on_read_resource=self.read_resource,
        )

    async def list_tools(self, ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.tools.list())

    async def call_tool(self, ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        return await self.tools.call(params.name, params.arguments)

    async def list_resources(self, ctx, params) -> types.ListResourcesResult:
        cursor = params.cursor if params is not None else None
        resources, following = await anyio.to_thread.run_sync(self.documents.page, cursor)
        return types.ListResourcesResult(resources=resources, next_cursor=following)

    async def list_resource_templates(self, ctx, params) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=self.documents.templates())

    async def read_resource(self, ctx, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        contents = await anyio.to_thread.run_sync(self.documents.read, str(params.uri))
        return types.ReadResourceResult(contents=[contents])

    def stop(self, grace: float) -> bool:
        """Interrupt running SQL, refuse new questions and wait up to `grace` seconds for the one
        being answered (False when it still runs); then the owner may close the database."""
        self.runner.stop()
        return self.generation.stop(grace)


def server(db, *, name: str | None = None, write: bool = False, limits: Limits | None = None) -> Server:
    """The MCP server (the SDK's low-level `Server`) of `db`: a Database, or a PackageSet from
    m3db.attach. name: the server's name (default: the file name without extension); write:
    list add_documents and allow writing SQL (a database opened for writing); limits: the HTTP
    server's Limits (max_tokens, max_queue, sql_timeout, sql_max_rows, sql_max_bytes,
    sql_max_queue apply here). Run it on a transport of the SDK yourself, or use `run`."""
    return Served(db, name=name, write=write, limits=limits).server


def default_name(db) -> str:
    """The knowledge base's file name without extension; several packages' names joined by +."""
    if isinstance(db, m3db.PackageSet):
        return "+".join(db.names)
    return os.path.splitext(os.path.basename(os.path.normpath(str(db.path))))[0] or "m3db"

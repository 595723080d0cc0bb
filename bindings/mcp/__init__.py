"""m3db.bindings.mcp: a knowledge base as an MCP server (Model Context Protocol), for agents.

    import m3db
    from m3db.bindings.mcp import run
    with m3db.connect("kb.m3db", read_only=True) as db:
        run(db)                       # on stdio, until the client closes it; `m3db mcp kb.m3db` does the same
        run(db, port=8000)            # streamable HTTP at http://127.0.0.1:8000/mcp

Tools: recall, ask, sql, and add_documents (with write=True); the documents are resources
(m3db://documents/{id}). The rooms: `server` (`server(db)`: the SDK's low-level Server with the
tools and resources wired), `tools` (the four tools), `schemas` (their arguments and results, and
the check of a call), `documents` (the resources), `generation` (the queue answers wait in),
`errors` (a failure as the agent reads it) and `hosting` (`run`: stdio or HTTP). Answers go
through the engine's one answer plan (db.generate); the knowledge base, SQL's time limit and
caps, and the API key are the HTTP server's (m3db.bindings.server). docs/mcp.md describes it.
Needs the mcp extra: pip install 'm3db[mcp]'.
"""

from m3db.errors import DependencyError

try:
    import mcp  # noqa: F401 (the official MCP SDK: the import fails here, with the fix, when it is missing)
except ImportError as e:
    raise DependencyError(f"the MCP server needs the mcp extra ({e}): pip install 'm3db[mcp]'") from e

from .hosting import run
from .server import server

__all__ = ["run", "server"]

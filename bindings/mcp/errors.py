"""A tool's failure as the agent reads it: one line saying what was wrong and what to do.

MCP reports a tool that failed as a result with `isError: true` (the agent reads it and can
try again), never as a protocol error or a traceback. `Refusal` is this binding's own refusal
(a full queue, a write without --write); `explain(e)` words any failure: m3db's errors keep
their code, the HTTP server's refusals (the SQL runner's time limit and caps, which this
binding reuses) are reworded for MCP, and anything else is a bug, logged with its traceback on
stderr and answered without it. Imports: m3db's errors, the server binding's ApiError and DocumentFailed.
"""

import logging

from m3db.bindings.server import ApiError, DocumentFailed
from m3db.errors import M3DBError, ReadOnlyError

log = logging.getLogger("m3db.mcp")

READ_ONLY = (
    "this MCP server is read-only (started without --write, or serving packages): to add documents or run "
    "INSERT INTO documents / DELETE FROM memories, serve a database directory with `m3db mcp PATH --write`"
)

# the server binding names its own surface in its refusals; here the same limits are MCP's
REWORDING = (
    ("m3db serve --", "m3db mcp --"),
    ("/v1/sql statements", "sql tool calls"),
    ("/v1/sql", "the sql tool"),
)


class Refusal(Exception):
    """A call this server refuses, with the reason and the fix as its message."""


def explain(e: BaseException, tool: str) -> str:
    """The message of the error result for `tool`'s failure `e`."""
    if isinstance(e, DocumentFailed):
        return explain_document(e, tool)
    if isinstance(e, Refusal):
        return str(e)
    if isinstance(e, ReadOnlyError):  # the engine's words name Python's and the shell's fix
        return f"[{e.code}] {READ_ONLY}"
    if isinstance(e, M3DBError):
        return reword(str(e))
    if isinstance(e, ApiError):
        if e.code == "unsupported_function":  # generate() in SQL: generation has its own tool
            return (
                "[unsupported_function] generate() is not available in the sql tool: answer with the ask tool, "
                "where max_tokens, k, the generation queue and the same memory modes (memory, rag, none) and "
                "where filters apply. recall() is available in SQL"
            )
        return f"[{e.code}] {reword(e.message)}"
    log.error("the %s tool failed", tool, exc_info=e)
    return f"the {tool} tool failed ({type(e).__name__}): a bug in the m3db MCP server; its log (stderr) has details"


def explain_document(failed: DocumentFailed, tool: str) -> str:
    """A failed document of add_documents: which one, why, and what was stored before it."""
    name = f"documents[{failed.index}]" + (f" (source {failed.source!r})" if failed.source is not None else "")
    if failed.stored:
        which = ", ".join(f"documents[{d['index']}]" for d in failed.stored)
        done = f"{which} {'was' if len(failed.stored) == 1 else 'were'} stored before it and stay stored"
    else:
        done = "no document of this call was stored"
    rest = f"; the {failed.untried} after it were not tried" if failed.untried else ""
    return f"{name}: {explain(failed.error, tool)}. Nothing of {name} was stored; {done}{rest}: send the rest again"


def reword(message: str) -> str:
    for old, new in REWORDING:
        message = message.replace(old, new)
    return message

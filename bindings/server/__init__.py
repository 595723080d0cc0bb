"""m3db.bindings.server: an OpenAI-compatible HTTP API over a knowledge base.

    import m3db
    from m3db.bindings.server import run
    with m3db.connect("kb.m3db", read_only=True) as db:
        run(db, port=8000)                        # until Ctrl-C; `m3db serve kb.m3db` does the same

The rooms: `app` (the ASGI app: routes, the API key, errors, shutdown; `app(db)` for your own
ASGI server), `openai` (models, chat completions, completions, embeddings), `memory` (search,
get, forget, add documents, SQL), `batch` (concurrent requests decoded together), `kb` (one
database or several packages behind one set of verbs), `sql` (statements under a time limit
and caps), `fields` and `schema` (request checks and their OpenAPI document), `http` (bodies,
events, disconnects), `errors` (OpenAI's error shape), `tenants` and `keys` (several knowledge
bases, each reached only by the API keys given it), and `hosting` (`run`, `run_tenants`: uvicorn,
hardened).
Generation itself goes through the engine's one answer plan (m3db.extend.AnswerPlan): this
package only translates HTTP, batches and streams. docs/server.md describes the API. Needs the
server extra: pip install 'm3db[server]'.
"""

from .app import BearerAuth, Limits, app
from .errors import ApiError
from .hosting import listen, run, run_tenants
from .kb import DocumentFailed, KnowledgeBase
from .keys import Keys
from .sql import SqlRunner, Statement, jsonable
from .tenants import tenants

# the parts another binding reuses rather than copies (m3db.bindings.mcp: the knowledge base and
# its single-writer rule, SQL under the time limit and caps, the API key, the port bound first)
__all__ = [
    "ApiError",
    "BearerAuth",
    "DocumentFailed",
    "Keys",
    "KnowledgeBase",
    "Limits",
    "SqlRunner",
    "Statement",
    "app",
    "jsonable",
    "listen",
    "run",
    "run_tenants",
    "tenants",
]

"""The LangChain dependency: importing this room without `langchain-core` is a DependencyError
naming the extra that installs it, not a bare ModuleNotFoundError from deep inside a module.

Imports: m3db.errors and langchain_core (checked here, before the room's modules import it).
"""

from m3db.errors import DependencyError

INSTALL = "pip install 'm3db[langchain]'"

try:
    import langchain_core  # noqa: F401
except ImportError as e:
    raise DependencyError(f"m3db.bindings.langchain needs LangChain ({e}): {INSTALL}") from e

"""The engine's public names for bindings: what an adapter to another ecosystem (the HTTP server,
a Hugging Face model, a Ray build, and those still to come) needs beyond `m3db`'s own verbs.

`import m3db` is the user's API; this module is the integrator's. Every name here is public on
purpose and documented (docs/architecture.md, "Bindings use the public API"): a binding imports
`m3db`, `m3db.errors`, this module and `m3db.model`, never a module of storage/, search/, sql/,
package/ or knowledge/ (tests/test_layering.py enforces it). A name moves here when a binding
needs it, with its docstring saying what it promises.

Imports: the layers below the facade (re-exports only).
"""

from .knowledge.answer import GENERATION_MODES, AnswerPlan, Reading, Source, generation_mode
from .knowledge.bundled import bind, bundled, bundled_embedder
from .knowledge.chunk import chunk_text
from .knowledge.ingest import check_document, document_source
from .knowledge.protocols import Embedder, MemoryModel, spec_fields
from .progress import progress_bar
from .search.plan import MAX_K
from .sql.check import function_name, parse_statement
from .storage.catalog import MAX_JSON_DEPTH, check_metadata_key  # whether a key can be a metadata column
from .storage.codec import EncodedArray, codec_class
from .storage.store import holds_catalog
from .testing import HashEmbedder  # the Ray binding's TinyModels: an Embedder that needs no weights

__all__ = [
    "AnswerPlan",
    "Embedder",
    "EncodedArray",
    "MAX_JSON_DEPTH",
    "MAX_K",
    "MemoryModel",
    "GENERATION_MODES",
    "HashEmbedder",
    "Reading",
    "Source",
    "bind",
    "bundled",
    "bundled_embedder",
    "check_document",
    "check_metadata_key",
    "chunk_text",
    "document_source",
    "codec_class",
    "function_name",
    "generation_mode",
    "holds_catalog",
    "parse_statement",
    "progress_bar",
    "spec_fields",
]

"""The two interfaces through which the engine reaches a model, so `import m3db` never imports torch.

- a `MemoryModel` (m3db.model.MemoryModel is the bundled one): `memory_spec_fields()`,
  `count_tokens(text)`, `encode(texts) -> [{positions, keys, values, token_count}]`,
  `generate(prompt, retriever=..., mode=..., **sampling)`;
- an `Embedder` (m3db.model.embedder.Embedder): `dim`, `fingerprint`, `embed(texts)`.
Imports errors only.
"""

from typing import Protocol

import numpy as np

from ..errors import InvalidInputError


class MemoryModel(Protocol):
    def memory_spec_fields(self) -> dict: ...
    def count_tokens(self, text: str) -> int: ...
    def encode(self, texts: list) -> list: ...
    def generate(self, prompt, *, retriever=None, mode="memory", **sampling) -> object: ...


class Embedder(Protocol):
    dim: int
    fingerprint: str

    def embed(self, texts: list) -> np.ndarray: ...


def spec_fields(model: MemoryModel, embedder: Embedder, codec: str) -> dict:
    """The memory spec (as MemorySpec's fields) of a database bound to `model` and `embedder`."""
    require_protocols(model, embedder)
    return dict(
        model.memory_spec_fields(), embedding_dim=embedder.dim, embedder_fingerprint=embedder.fingerprint, codec=codec
    )


HINTS = {
    MemoryModel: "model=m3db.model.memory_model.MemoryModel.load() or "
    "m3db.bindings.transformers.HFMemoryModel.from_pretrained(PATH)",
    Embedder: "embedder=m3db.model.embedder.Embedder() (the bundled MiniLM) or m3db.testing.HashEmbedder()",
}


def require_protocols(model, embedder) -> None:
    """A model or embedder given as something else (a name string, say) fails here, naming what
    is missing, rather than deep inside the first verb. None means the bundled one."""
    # what binding to a database reads (the rest is asked for when a verb needs it)
    for name, obj, protocol, wanted in (
        ("model", model, MemoryModel, ("memory_spec_fields",)),
        ("embedder", embedder, Embedder, ("dim", "fingerprint")),
    ):
        missing = [a for a in wanted if not hasattr(obj, a)]
        if obj is not None and missing:
            raise InvalidInputError(
                f"{name}={_shown(obj)} is not a loaded {protocol.__name__} (it has no {', '.join(missing)}): pass one, "
                f"e.g. {HINTS[protocol]}, or leave {name}= out for the bundled one"
            )


def _shown(obj) -> str:
    """A short name for what was passed: a string as written, anything else by its type (a torch
    module's repr is its whole architecture)."""
    return repr(obj) if isinstance(obj, (str, bytes, int, float)) else f"<{type(obj).__module__}.{type(obj).__name__}>"

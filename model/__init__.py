"""m3db.model: the bundled memory-augmented decoder (PyTorch).

Importing this package imports torch; the engine (`m3db`) reaches it only lazily, through
`MemoryModel`'s verbs and the `Retriever` callback. See docs/decoder.md.
"""

from .decoder import Decoder, DecoderConfig
from .encoder import ReferenceTooLong
from .generate import ChunkMemories, Generation, Sampling
from .gguf_loader import WeightsNotFound
from .memory import EncodedMemory, MemoryItem, Retriever
from .memory_model import MemoryModel
from .settings import MemorySettings

__all__ = [
    "ChunkMemories",
    "Decoder",
    "DecoderConfig",
    "Generation",
    "EncodedMemory",
    "MemoryItem",
    "MemoryModel",
    "MemorySettings",
    "ReferenceTooLong",
    "Retriever",
    "Sampling",
    "WeightsNotFound",
]

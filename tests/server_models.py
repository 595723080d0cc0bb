"""Models for the server's tests, loaded by `m3db serve --model tests.server_models:tiny`: the tiny
random decoder of the real architecture and the feature-hashing embedder (fast, no weights)."""

from m3db.model.memory_model import MemoryModel
from m3db.testing import HashEmbedder

# weights this large make the random decoder's greedy text vary (bytes, not one repeated token),
# so answers to different prompts differ and a mix-up between batched rows would show
STD = 0.3


def tiny():
    return MemoryModel.tiny(seed=0, std=STD), HashEmbedder()

"""Models for the server's tests, loaded by `m3db serve --model tests.server_models:tiny`: the tiny
random decoder of the real architecture and the feature-hashing embedder (fast, no weights)."""

from m3db.model.memory_model import MemoryModel
from m3db.testing import HashEmbedder

# weights this large make the random decoder's greedy text vary (bytes, not one repeated token),
# so answers to different prompts differ and a mix-up between batched rows would show
STD = 0.3


def tiny():
    return MemoryModel.tiny(seed=0, std=STD), HashEmbedder()


# faults on demand, for the server's failure tests: a prompt holding BEL (\x07) makes the
# decoder raise when it reads the prompt (one row of a batch poisons the batch's forward), and
# one holding BS (\x08) makes the tokenizer raise (a bug in a request handler)
POISON, BUG = "\x07", "\x08"


def faulty():
    model, embedder = tiny()
    poison = model.tokenizer.encode(POISON)[0]
    forward, encode = model.decoder.forward, model.tokenizer.encode

    def poisoned_forward(idx, **kw):
        if idx.shape[1] > 1 and bool((idx == poison).any()):  # a prompt (B, T>1), not a decoding step
            raise RuntimeError("poisoned prompt")
        return forward(idx, **kw)

    def buggy_encode(text, *a, **kw):
        if BUG in text:
            raise RuntimeError("tokenizer bug")
        return encode(text, *a, **kw)

    model.decoder.forward = poisoned_forward
    model.tokenizer.encode = buggy_encode
    return model, embedder

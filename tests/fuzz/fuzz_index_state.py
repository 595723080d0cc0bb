"""Fuzz index.state: the state file VectorIndex.load and verify_file read beside the saved index
(its commit, vector count, size and crc32), which decides whether USearch is handed the file.

A valid index of three vectors is saved once; each input is written as its state file. The
first byte: bit 0 set, the rest tweaks the fields of the valid state (harness.tweak), written as
JSON; clear, the rest is the file as it is. Bit 1: load read-only (a view). Allowed: nothing. A
damaged index is not an error (docs/errors.md): a state that does not check out is -1 (rebuild
from the catalog), and one that loads holds the saved index.
"""

import json
import os

import numpy as np
from harness import Target, instrumented, main, scratch, structured

with instrumented("m3db.storage.index"):
    from m3db.storage import index

DIRECTORY = scratch("index")
STATE = os.path.join(DIRECTORY, index.STATE_FILE)


def saved_state() -> dict:
    """Save the index every input is checked against (once); its state as saved."""
    if not os.path.exists(os.path.join(DIRECTORY, index.INDEX_FILE)):
        vi = index.VectorIndex(4, DIRECTORY)
        vi.add(np.array([1, 2, 3]), np.eye(3, 4, dtype=np.float32) + 0.1, threads=1)
        vi.save(7)
        with open(STATE, "rb") as f:
            saved_state.bytes = f.read()
    return json.loads(saved_state.bytes)


def one_input(data: bytes) -> None:
    if not data:
        return
    saved_state()
    with open(STATE, "wb") as f:
        f.write(state_of(data))
    vi = index.VectorIndex(4, DIRECTORY, read_only=bool(data[0] & 2))
    seq = vi.load()
    assert type(seq) is int and seq >= -1, seq
    if seq >= 0:
        assert len(vi) == 3 and sorted(vi.keys().tolist()) == [1, 2, 3]
    problem = vi.verify_file()
    assert problem is None or isinstance(problem, str)


def state_of(data: bytes) -> bytes:
    if data[0] & 1:
        return json.dumps(structured([saved_state()], data[1:], json=True)).encode()
    return data[1:]


def as_raw(data: bytes) -> bytes:
    """The input of mode 0 (the file as it is) that loads as `data` does."""
    return bytes([data[0] & 2]) + state_of(data)


def seeds():
    text = json.dumps(saved_state()).encode()
    yield b"\x00" + text
    yield b"\x02" + text
    yield b"\x01"
    yield b"\x03"


TARGET = Target("index_state", one_input, (), seeds)

if __name__ == "__main__":
    main(TARGET)

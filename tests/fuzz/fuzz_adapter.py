"""Fuzz a reader adapter's header: model/adapter.py read_header, what `m3db ... --adapter FILE`
reads of a safetensors file before anything else (the JSON header in its metadata, whose
settings the CLI turns into the memory settings to read with: cli/models.adapter_settings).

The first byte's bits 0-1: 0, the rest is the whole file; 1, the rest is the adapter header's
JSON text, in a valid safetensors file made here; 2, the rest is the safetensors JSON header
(after its u64 length, made right here); 3, the rest tweaks the fields of a valid adapter
header (harness.tweak), written as JSON. Allowed: AdapterError (the adapter's own ValueError).
A header that reads is an object whose settings (when present) are what the CLI takes.
"""

import json
import os
import struct

import numpy as np
from harness import Target, instrumented, main, scratch, structured

with instrumented("m3db.model.adapter"):
    from m3db.model.adapter import AdapterError, read_header

DIRECTORY = scratch("adapter")
PATH = os.path.join(DIRECTORY, "adapter.safetensors")
HEADER = {
    "alpha": 16.0,
    "base_fingerprint": "sha256:" + "ab" * 32,
    "decoder": {"n_embd": 8, "n_head": 2, "n_kv_head": 1, "n_layer": 2},
    "format": "m3db-reader-adapter",
    "rank": 2,
    "settings": {
        "memory_layers": [1],
        "position_policy": "parallel",
        "reference_prefix": "Reference:",
        "tokens_per_head": 8,
    },
    "targets": ["q", "k", "v", "o"],
    "version": 1,
}


def safetensors_file(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def with_metadata(text: str) -> bytes:
    """A safetensors file of one tiny tensor whose metadata holds `text` as the adapter header."""
    from safetensors.numpy import save

    return save({"layers.0.down.q": np.zeros((2, 2), np.float32)}, metadata={"m3db_adapter": text})


def file_of(data: bytes) -> bytes:
    mode, body = data[0] & 3, data[1:]
    if mode == 0:
        return body
    if mode == 2:
        return safetensors_file(body)
    return with_metadata(header_text(data))


def header_text(data: bytes) -> str:
    """The adapter header that an input of mode 1 or 3 stands for."""
    if data[0] & 3 == 3:
        return json.dumps(structured([HEADER], data[1:], json=True))
    return data[1:].decode("utf-8", "replace")


def as_raw(data: bytes) -> bytes:
    """The input of mode 0, 1 or 2 that reads as `data` does: what the committed corpus keeps, so
    that it means the same whatever harness.tweak becomes."""
    return b"\x01" + header_text(data).encode() if data[0] & 3 == 3 else data


def one_input(data: bytes) -> None:
    if not data:
        return
    with open(PATH, "wb") as f:
        f.write(file_of(data))
    header = read_header(PATH)
    assert isinstance(header, dict), type(header)
    settings = header.get("settings") or {}
    assert isinstance(settings, dict), type(settings)
    layers = settings.get("memory_layers") or ()
    assert all(type(i) is int and i >= 0 for i in layers), layers
    assert type(settings.get("tokens_per_head", 1)) is int and settings.get("tokens_per_head", 1) >= 1
    for key in ("reference_prefix", "position_policy"):
        assert isinstance(settings.get(key, ""), str)


def seeds():
    text = json.dumps(HEADER, sort_keys=True)
    yield b"\x00" + with_metadata(text)
    yield b"\x01" + text.encode()
    yield b"\x02" + with_metadata(text)[8:]
    yield b"\x03"


TARGET = Target("adapter", one_input, (AdapterError,), seeds)

if __name__ == "__main__":
    main(TARGET)

"""Fuzz spec.json: MemorySpec.from_json, what reads the memory spec a database stores (spec.json,
read by repair; the catalog's meta; a package's catalog head).

The first byte: bit 0 set, the rest tweaks the fields of a valid spec (harness.tweak), written
as JSON; clear, the rest is the text as it is. Bit 1 set: handed over as bytes, else as text
(a byte that is not UTF-8 read as U+FFFD). Allowed: InvalidInputError (a bad field), FormatError
(not a JSON object). A spec that reads must write itself back and read back the same.
"""

import json

from harness import Target, instrumented, main, structured

with instrumented("m3db.storage.spec", "m3db.storage.codec"):
    from m3db.errors import FormatError, InvalidInputError
    from m3db.storage.spec import MemorySpec

import samples  # noqa: E402


def one_input(data: bytes) -> None:
    if not data:
        return
    text = text_of(data)
    spec = MemorySpec.from_json(text if data[0] & 2 else text.decode("utf-8", "replace"))
    again = MemorySpec.from_json(spec.to_json())
    assert again.to_json() == spec.to_json()
    assert isinstance(spec.layers, int) and spec.layers >= 1


def text_of(data: bytes) -> bytes:
    if data[0] & 1:
        specs = [samples.spec().to_dict(), samples.spec(codec="pq").to_dict()]
        return json.dumps(structured(specs, data[1:], json=True)).encode()
    return data[1:]


def as_raw(data: bytes) -> bytes:
    """The input of mode 0 (the text as it is) that reads as `data` does."""
    return bytes([data[0] & 2]) + text_of(data)


def seeds():
    text = samples.spec().to_json().encode()
    yield b"\x00" + text
    yield b"\x02" + text
    yield b"\x01"


TARGET = Target("spec", one_input, (InvalidInputError, FormatError), seeds)

if __name__ == "__main__":
    main(TARGET)

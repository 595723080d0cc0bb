"""Fuzz a segment record: record.decode_record, the frame and the msgpack payload behind it.

The first byte picks how the rest is read. Bits 0-1: 0, the rest is a whole record, as a
segment holds it; 1, the rest is a payload, framed here with its checksums (so mutations reach
the payload, not only the checksum that guards it); 2, the same, zstd-compressed first; 3, the
rest tweaks the fields of a valid payload (harness.tweak), framed (zstd-compressed if bit 4 is
set). Bit 2: decode without the arrays. Bit 3: decode with a pq codec (a trained codec's
records decode only with their codebook). Allowed: FormatError. A record that decodes must
hold what its fields say (types, shapes).
"""

import functools

import msgpack
import numpy as np
import zstandard
from harness import Target, instrumented, main, structured

with instrumented("m3db.storage.record", "m3db.storage.codec", "m3db.storage.codec_base", "m3db.storage.pq"):
    from m3db.errors import FormatError
    from m3db.storage import record

import samples  # noqa: E402


def one_input(data: bytes) -> None:
    if not data:
        return
    mode = data[0]
    codec = samples.tiny_pq() if mode & 8 else None
    m = record.decode_record(blob_of(data), "fuzz", arrays=not mode & 4, codec=codec)
    check_memory(m, arrays=not mode & 4)


def blob_of(data: bytes) -> bytes:
    """The record that input `data` stands for."""
    mode, body = data[0], data[1:]
    if mode & 3 == 0:
        return body
    if mode & 3 == 3:
        body = msgpack.packb(structured(seed_payloads(), body), use_bin_type=True)
    if mode & 3 == 2 or (mode & 3 == 3 and mode & 16):
        return record.frame(zstandard.ZstdCompressor().compress(body), record.FLAG_ZSTD)
    return record.frame(body)


def as_raw(data: bytes) -> bytes:
    """The input of mode 0 that decodes as `data` does: what the committed corpus keeps, so that
    it means the same whatever harness.tweak becomes."""
    return bytes([data[0] & 12]) + blob_of(data)


@functools.cache
def seed_payloads():
    return [record.read_payload(blob, "seed") for blob in samples.records()]


def check_memory(m, *, arrays):
    """What a decoded record promises its readers."""
    assert type(m.id) is int and m.id >= 0, m.id
    assert isinstance(m.text, str), type(m.text)
    assert isinstance(m.metadata, dict), type(m.metadata)
    for value in (m.document_id, m.ordinal, m.token_count):
        assert value is None or type(value) is int, value
    if m.cold or not arrays:
        assert m.keys is None and m.values is None and m.positions is None
        return
    assert m.keys.dtype == np.float32 and m.values.dtype == np.float32 and m.positions.dtype == np.uint8
    assert m.keys.ndim == 4 and m.keys.shape == m.values.shape and m.positions.shape == m.keys.shape[:3]


def seeds():
    for blob in samples.records():
        yield b"\x00" + blob
        payload = record.read_payload(blob, "seed")
        body = msgpack.packb(payload, use_bin_type=True)
        yield b"\x01" + body
        yield b"\x02" + body
        yield b"\x09" + body  # with the pq codec
    yield b"\x03"
    yield b"\x0b"


TARGET = Target("record", one_input, (FormatError,), seeds)

if __name__ == "__main__":
    main(TARGET)

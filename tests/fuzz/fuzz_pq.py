"""Fuzz a pq codebook: codec.load_codec("pq", bytes), what reads a trained codec's parameters
from the catalog's `codecs` row, a package's catalog or `codebook.msgpack` (repair).

The first byte: bit 0 set, the rest is msgpack whose crc32 field is recomputed here when it is a
map (so mutations reach the checks behind the checksum); bit 2 set, the rest tweaks the fields
of a valid codebook (harness.tweak), which is packed and its crc32 recomputed; bit 1 set, load
at blob version 1, else 2. Allowed: FormatError. A codebook that loads must encode and decode an array of its shape.
"""

import msgpack
import numpy as np
from harness import Target, instrumented, main, structured

with instrumented("m3db.storage.pq", "m3db.storage.codec", "m3db.storage.codec_base"):
    from m3db.errors import FormatError
    from m3db.storage import codec, pq

import samples  # noqa: E402


def with_crc(body: bytes) -> bytes:
    """`body` with its crc32 field made right, when it unpacks to a map that has the fields."""
    try:
        params = msgpack.unpackb(body, raw=False, strict_map_key=True)
        described = {k: v for k, v in params.items() if k not in ("keys", "values", "crc32")}
        params["crc32"] = pq.params_crc(described, params["keys"], params["values"])
        return msgpack.packb(params, use_bin_type=True)
    except Exception:  # not a codebook's shape: fuzz it as it is
        return body


def one_input(data: bytes) -> None:
    if not data:
        return
    c = codec.load_codec("pq", body_of(data), version=1 if data[0] & 2 else 2)
    assert isinstance(c, pq.PQCodec)
    shape = (c.layers, c.heads, 2, c.dim)
    x = np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    for part in pq.PARTS:
        y = c.decode(c.encode(x, part=part), shape, part=part)
        assert y.shape == shape and y.dtype == np.float32


def body_of(data: bytes) -> bytes:
    """The codebook bytes that input `data` stands for."""
    if data[0] & 4:
        params = structured([samples.tiny_pq(v).params() for v in (1, 2)], data[1:])
        return with_crc(msgpack.packb(params, use_bin_type=True))
    return with_crc(data[1:]) if data[0] & 1 else data[1:]


def as_raw(data: bytes) -> bytes:
    """The input of mode 0 (the bytes as they are) that loads as `data` does: what the committed
    corpus keeps, so that it means the same whatever harness.tweak becomes."""
    return bytes([data[0] & 2]) + body_of(data)


def seeds():
    for version in (1, 2):
        params = msgpack.packb(samples.tiny_pq(version).params(), use_bin_type=True)
        yield bytes([0 if version == 2 else 2]) + params
        yield bytes([1 if version == 2 else 3]) + params
    yield b"\x04"
    yield b"\x06"


TARGET = Target("pq", one_input, (FormatError,), seeds, max_len=8192)

if __name__ == "__main__":
    main(TARGET)

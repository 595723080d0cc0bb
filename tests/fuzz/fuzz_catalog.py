"""Fuzz a package's catalog section: export.read_catalog, the msgpack stream of a head, chunks of
documents and memories, and an end marker (what opening and verifying a package read), with
what its readers do next (package/store.py, verify.py: the head's commit and next id as
integers, the codec loaded from the head's codecs table).

The first byte: bits 0-1 0, the rest is the stream as it is; 1, the rest tweaks the objects of a
valid stream (harness.tweak), each packed again. Bit 2: the manifest the stream is checked
against agrees with the head's spec, counts and codec as far as they can be read (so mutations
get past those checks); clear, the manifest of the package the seed stream came from. Bits
4-7: the stream is fed in pieces of 2**n bytes (section_pieces reads READ_STEP pieces).
Allowed: FormatError.
"""

import copy
import functools
import hashlib
import os
import tempfile

import msgpack
import numpy as np
from harness import Target, instrumented, main, structured

MODULES = ("m3db.package.export", "m3db.storage.catalog", "m3db.storage.spec", "m3db.storage.codec", "m3db.storage.pq")
with instrumented(*MODULES):
    from m3db.errors import FormatError
    from m3db.package import export
    from m3db.package import manifest as mf
    from m3db.storage.codec import stored_codec
    from m3db.storage.spec import MemorySpec

import samples  # noqa: E402


@functools.cache
def seed() -> tuple[bytes, dict]:
    """(the catalog section of the seed package, its manifest)."""
    with tempfile.TemporaryDirectory(prefix="m3db-fuzz-catalog-") as tmp:
        path = os.path.join(tmp, "seed.m3kb")
        with open(path, "wb") as f:
            f.write(samples.package_file())
        with open(path, "rb") as f:
            frame = mf.Frame(f, "seed")
    offset, length, _ = frame.sections["catalog"]
    return samples.package_file()[offset : offset + length], frame.manifest


@functools.cache
def seed_objects() -> list:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
    unpacker.feed(seed()[0])
    return list(unpacker)


def stream_of(data: bytes) -> bytes:
    if data[0] & 3 == 1:
        objects = structured([seed_objects()], data[1:])
        if not isinstance(objects, list):
            objects = [objects]
        return b"".join(msgpack.packb(o, use_bin_type=True) for o in objects)
    return data[1:]


def as_raw(data: bytes) -> bytes:
    """The input of mode 0 (the stream as it is) that reads as `data` does."""
    return bytes([data[0] & ~3 & 0xFF]) + stream_of(data)


def agreeing_manifest(stream: bytes) -> dict:
    """The seed's manifest, with the spec, counts and codec of the stream's head where it has them."""
    manifest = copy.deepcopy(seed()[1])
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(stream) + 1)
        unpacker.feed(stream)
        head = next(unpacker)
        spec = MemorySpec.from_json(head["meta"]["spec"])
        manifest["spec"] = spec.to_dict()
        manifest["counts"].update(memories=head["memories"], documents=head["documents"])
        name, version, params = next(c for c in head["codecs"] if c[0] == spec.codec)
        digest = hashlib.sha256(params or b"").hexdigest()
        manifest["codec"] = {"name": name, "version": version, "params_sha256": digest}
    except Exception:
        pass
    return manifest


def one_input(data: bytes) -> None:
    if not data:
        return
    stream = stream_of(data)
    manifest = agreeing_manifest(stream) if data[0] & 4 else seed()[1]
    step = 1 << (data[0] >> 4)
    pieces = (stream[i : i + step] for i in range(0, len(stream), step))
    for item in export.read_catalog(pieces, "fuzz", manifest):
        if item[0] == "head":
            head = item[1]
            assert isinstance(head["spec"], MemorySpec)
            int(head["meta"]["commit_seq"]), int(head["meta"]["next_id"])  # package/store.py reads them
            for name, sql_type in head["memory_columns"]:
                assert isinstance(name, str) and isinstance(sql_type, str)
            try:
                stored_codec(head["spec"].codec, head["codecs"])  # what verify.py does next
            except FormatError:
                pass
        elif item[0] == "documents":
            assert len({len(v) for v in item[1].values()}) == 1
        else:
            _, columns, vectors = item
            assert vectors.dtype == np.float32 and vectors.shape == (len(columns["id"]), head["embedding_dim"])
            for key in ("id", "segment", "offset", "length", "checksum", "created_at"):
                np.asarray(columns[key], dtype=np.uint64 if key == "checksum" else np.int64)


def seeds():
    stream = seed()[0]
    for mode in (0x00, 0x04, 0x34, 0xA0):
        yield bytes([mode]) + stream
    yield b"\x01"
    yield b"\x05"


TARGET = Target("catalog", one_input, (FormatError,), seeds)

if __name__ == "__main__":
    main(TARGET)

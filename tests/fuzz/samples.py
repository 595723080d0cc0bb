"""Valid inputs the fuzz targets start from (their seeds), made by m3db itself so that they
follow the formats as they change: records, a segment, a tiny pq codebook, a spec, a package.
Import this only after the target has imported m3db in its instrumented() block."""

import functools
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: its conftest
from conftest import small_spec  # noqa: E402


def spec(**overrides):
    """The tests' small memory spec (conftest.py)."""
    return small_spec(**overrides)


@functools.cache
def tiny_pq(version=2):
    """A pq codec of one layer, one head, head dim 1 and one byte per vector: its codebook is
    2 KiB of centroids (keys and values), small enough to fuzz."""
    from m3db.storage.pq import PQCodec

    rng = np.random.default_rng(0)
    centroids = {p: rng.standard_normal((1, 1, 1, 256, 1)).astype(np.float32) for p in ("keys", "values")}
    return PQCodec(centroids, codebook=1, error={"keys": 0.1, "values": 0.2}, vectors=1024, version=version)


def memory_arrays(shape, seed=0):
    rng = np.random.default_rng(seed)
    L, H, n, _ = shape
    keys = rng.standard_normal(shape).astype(np.float32)
    values = rng.standard_normal(shape).astype(np.float32)
    positions = np.stack([np.stack([np.sort(rng.choice(128, n, replace=False)) for _ in range(H)]) for _ in range(L)])
    return keys, values, positions.astype(np.uint8)


def records() -> list[bytes]:
    """Framed records: each codec, a cold record, with and without the repair fields."""
    from m3db.storage.codec import codec_class
    from m3db.storage.record import encode_record, repair_fields

    out = []
    document = {"source": "a.md", "title": "A", "uri": None, "metadata": {"lang": "en"}}
    for i, name in enumerate(("f32", "f16", "int8", "int4")):
        keys, values, positions = memory_arrays((1, 2, 2, 8), seed=i)
        repair = repair_fields(np.ones(16, np.float32), 3, 0, 12, document) if i % 2 else None
        out.append(
            encode_record(
                i, codec_class(name)(), keys, values, positions, "Paris is in France.", {"lang": "en"}, 1, i, 5, repair
            )
        )
    keys, values, positions = memory_arrays((1, 1, 3, 1))
    for version in (1, 2):
        out.append(encode_record(9, tiny_pq(version), keys, values, positions, "pq", {}, None, None, 2))
    repair = repair_fields(np.ones(16, np.float32), 4, None, None, None)
    out.append(encode_record(11, codec_class("int8")(), None, None, None, "cold text", {"k": 1}, None, None, 3, repair))
    long_text = "the same words again " * 40  # compressible: written zstd-compressed
    keys, values, positions = memory_arrays((1, 1, 1, 8))
    out.append(encode_record(12, codec_class("f32")(), keys, values, positions, long_text, {}, 2, 0))
    return out


def segment_file() -> bytes:
    from m3db.storage.segment import segment_header

    return segment_header(1) + b"".join(records()[:3])


@functools.cache
def package_file() -> bytes:
    """The bytes of a small package (three memories, one document) as `m3db pack` writes it."""
    import m3db

    with tempfile.TemporaryDirectory(prefix="m3db-fuzz-") as tmp:
        db = m3db.connect(os.path.join(tmp, "kb.m3db"), spec=spec())
        try:
            items = []
            for i in range(3):
                keys, values, positions = memory_arrays((2, 2, 2, 8), seed=i)
                items.append(
                    dict(
                        keys=keys,
                        values=values,
                        positions=positions,
                        embedding=np.arange(1, 17, dtype=np.float32) * (i + 1),
                        text=f"memory {i}",
                        metadata={"lang": "en", "year": 1990 + i},
                    )
                )
                if i < 2:  # two memories of one document, one without
                    items[-1].update(document={"source": "a.md", "title": "A", "metadata": {"k": [1]}}, ordinal=i)
            db.add_memories(items)
            out = os.path.join(tmp, "kb.m3kb")
            db.pack(out, name="fuzz", description="a package to fuzz")
        finally:
            db.close()
        with open(out, "rb") as f:
            return f.read()

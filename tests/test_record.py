"""Record framing: round trips, every corruption caught, and a golden file per format version."""

import os
import struct

import numpy as np
import pytest

from m3db.errors import FormatError
from m3db.storage.codec import codec_class
from m3db.storage.record import HEADER_SIZE, MAX_PAYLOAD, decode_record, encode_record, frame

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "record_v1.bin")


def golden_inputs():
    rng = np.random.default_rng(42)
    keys = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
    values = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
    positions = np.arange(16, dtype=np.uint8).reshape(2, 2, 4)
    return keys, values, positions


def make(codec="f32", text="Paris is the capital of France.", metadata=None):
    keys, values, positions = golden_inputs()
    blob = encode_record(7, codec_class(codec)(), keys, values, positions, text, metadata or {"lang": "en"}, 3, 0)
    return blob, keys, values, positions


def test_round_trip_every_field():
    blob, keys, values, positions = make()
    m = decode_record(blob, "test", expect_id=7)
    assert m.id == 7 and m.text.startswith("Paris") and m.metadata == {"lang": "en"}
    assert m.document_id == 3 and m.ordinal == 0
    assert np.array_equal(m.keys, keys) and np.array_equal(m.values, values)
    assert np.array_equal(m.positions, positions)


def test_cold_record_holds_everything_but_the_arrays():
    blob = encode_record(9, codec_class("int8")(), None, None, None, "Ölüdeniz, Türkiye.", {"lang": "tr"}, 4, 2, 17)
    m = decode_record(blob, "test", expect_id=9)
    assert m.cold and m.keys is None and m.values is None and m.positions is None
    assert (m.text, m.metadata, m.document_id, m.ordinal, m.token_count) == (
        "Ölüdeniz, Türkiye.",
        {"lang": "tr"},
        4,
        2,
        17,
    )
    assert "cold" in repr(m) and not decode_record(make()[0], "test").cold
    for i in range(len(blob)):  # a cold record is checked like any other
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(FormatError):
            decode_record(bytes(bad), "test", expect_id=9)


def test_any_flipped_byte_is_caught():
    blob, *_ = make(codec="int8")
    rng = np.random.default_rng(0)
    for i in rng.choice(len(blob), size=min(len(blob), 200), replace=False):
        bad = bytearray(blob)
        bad[i] ^= 1 << int(rng.integers(8))
        with pytest.raises(FormatError):
            decode_record(bytes(bad), "flipped")


def test_truncation_is_caught():
    blob, *_ = make()
    for cut in (0, 5, HEADER_SIZE - 1, HEADER_SIZE, len(blob) - 1):
        with pytest.raises(FormatError):
            decode_record(blob[:cut], "truncated")


def test_wrong_id_or_checksum_is_caught():
    blob, *_ = make()
    with pytest.raises(FormatError, match="expected 8"):
        decode_record(blob, "x", expect_id=8)
    with pytest.raises(FormatError, match="checksum"):
        decode_record(blob, "x", expect_crc=1)


def test_huge_declared_length_is_refused_before_allocating():
    head = struct.pack("<4sHHII", b"M3MR", 1, 0, MAX_PAYLOAD + 1, 0)
    import zlib

    bad = head + struct.pack("<I", zlib.crc32(head))
    with pytest.raises(FormatError, match="limit"):
        decode_record(bad, "bomb")


def test_unknown_version_is_refused():
    import zlib

    head = struct.pack("<4sHHII", b"M3MR", 2, 0, 0, zlib.crc32(b""))
    with pytest.raises(FormatError, match="version 2"):
        decode_record(head + struct.pack("<I", zlib.crc32(head)), "future")


def test_payload_that_is_not_a_record_map():
    with pytest.raises(FormatError, match="malformed"):
        decode_record(frame(b"\x93\x01\x02\x03"), "junk")


def test_text_in_any_script_round_trips():
    text = "東京は日本の首都です。 Ελληνικά. العربية. emoji 🚀"
    blob, *_ = make(text=text, metadata={"title": "多言語", "tags": ["a", "ü"]})
    m = decode_record(blob, "x")
    assert m.text == text and m.metadata == {"title": "多言語", "tags": ["a", "ü"]}


def test_golden_file_of_format_version_1():
    """Bytes written by format version 1 must stay readable forever."""
    if os.environ.get("M3DB_WRITE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "wb") as f:
            f.write(make()[0])
    with open(GOLDEN, "rb") as f:
        blob = f.read()
    keys, values, positions = golden_inputs()
    m = decode_record(blob, "golden", expect_id=7)
    assert np.array_equal(m.keys, keys) and np.array_equal(m.values, values)
    assert np.array_equal(m.positions, positions) and m.text == "Paris is the capital of France."

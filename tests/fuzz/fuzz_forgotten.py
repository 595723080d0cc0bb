"""Fuzz forgotten.log: ForgottenLog.read and high_water, what repair reads to know which
memories were forgotten (frames of u32 length, u32 crc32, msgpack {"seq", "ids", "next_id"}).

The first byte: bit 0 set, the rest tweaks the frames of a valid log (harness.tweak: a list of
their maps), each packed and framed with its checksum here; clear, the rest is the file as it is.
Allowed: FormatError (a frame whose checksum holds but whose map is malformed). What reads back
must be {id: commit} and (commit, next id), integers all.
"""

import msgpack
from harness import Target, instrumented, main, scratch, structured

with instrumented("m3db.storage.forgotten"):
    from m3db.errors import FormatError
    from m3db.storage import forgotten

DIRECTORY = scratch("forgotten")
LOG = forgotten.ForgottenLog(DIRECTORY)
ENTRIES = [
    [{"seq": 3, "ids": [1, 2]}, {"seq": 5, "ids": [7]}],
    [{"seq": 9, "ids": [], "next_id": 12}, {"seq": 10, "ids": [12, 13]}],
]


def frame(payload: bytes) -> bytes:
    return forgotten.FRAME.pack(len(payload), forgotten.zlib.crc32(payload)) + payload


def log_of(data: bytes) -> bytes:
    if data[0] & 1:
        entries = structured(ENTRIES, data[1:])
        if not isinstance(entries, list):
            entries = [entries]
        return b"".join(frame(msgpack.packb(e, use_bin_type=True)) for e in entries)
    return data[1:]


def as_raw(data: bytes) -> bytes:
    """The input of mode 0 (the file as it is) that reads as `data` does."""
    return b"\x00" + log_of(data)


def one_input(data: bytes) -> None:
    if not data:
        return
    with open(LOG.path, "wb") as f:
        f.write(log_of(data))
    ids = LOG.read()
    assert all(type(k) is int and type(v) is int for k, v in ids.items()), ids
    seq, next_id = LOG.high_water()
    assert type(seq) is int and type(next_id) is int and seq >= -1 and next_id >= 0, (seq, next_id)


def seeds():
    for entries in ENTRIES:
        yield b"\x00" + b"".join(frame(msgpack.packb(e)) for e in entries)
    yield b"\x01"


TARGET = Target("forgotten", one_input, (FormatError,), seeds)

if __name__ == "__main__":
    main(TARGET)

"""Fuzz a segment file: its header (segment.check_segment_header) and SegmentStore.scan, which
walks its records front to back and skips damaged stretches (what repair and recovery read).

The first byte's bit 0 set: the rest follows a valid header of segment 1 (mutations reach the
records); clear: the rest is the whole file. Allowed: FormatError (a damaged segment header).
Every record scan yields must decode (or be refused with a FormatError) and read back.
"""

import os

from harness import Target, instrumented, main, scratch

with instrumented("m3db.storage.segment", "m3db.storage.record"):
    from m3db.errors import FormatError
    from m3db.storage import record, segment

import samples  # noqa: E402

DIRECTORY = scratch("segment")
PATH = os.path.join(DIRECTORY, segment.segment_name(1))


def one_input(data: bytes) -> None:
    if not data:
        return
    body = segment.segment_header(1) + data[1:] if data[0] & 1 else data[1:]
    with open(PATH, "wb") as f:
        f.write(body)
    store = segment.SegmentStore(DIRECTORY, read_only=True)
    try:
        last = segment.HEADER_SIZE - 1
        for offset, blob, payload in store.scan(1):
            assert offset > last, (offset, last)
            last = offset
            if blob is None:
                assert payload is None
                continue
            assert type(payload["id"]) is int
            assert store.read(1, offset, len(blob)) == blob
            try:
                record.decode_record(blob, "scanned", arrays=False)
            except FormatError:
                pass
    finally:
        store.close()


def seeds():
    good = samples.segment_file()
    yield b"\x00" + good
    yield b"\x01" + good[segment.HEADER_SIZE :]
    damaged = bytearray(good)
    damaged[segment.HEADER_SIZE + 30] ^= 0xFF  # the first record's payload: skipped to the next
    yield b"\x00" + bytes(damaged)


TARGET = Target("segment", one_input, (FormatError,), seeds)

if __name__ == "__main__":
    main(TARGET)

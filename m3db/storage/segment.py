"""Segment files: append-only files of framed records, sealed at a size limit.

The store owns the `segments/` directory of a database: `NNNNNN.seg` files, each a 16-byte
header (magic b"M3SG", u16 version, u16 reserved, u32 segment number, u32 crc32 of the
previous 12 bytes) then records back to back. Appends go to the newest segment until it
would pass `segment_size`, then a new one starts. Reads go through mmap and never trust a
byte: every record's checksums are verified by record.decode_record.

Durability is the caller's protocol (writer.py): append, then `sync()`, then commit the
catalog rows that point at the bytes. Bytes past the last committed record are garbage
and `truncate()` cuts them on recovery (store.py, after `scan()` has shown what they hold).

Appends are unbuffered: each record goes to the OS in the append that wrote it, so a failed
write (a full disk) leaves nothing in a Python buffer that a later read, seal or close would
write after the rollback has cut the file, and a rollback cuts with ftruncate, which a full
disk does not refuse (no slower: docs/engine.md, "I/O faults", has the figures).
"""

import errno
import mmap
import os
import struct
import zlib
from collections.abc import Iterator

from ..errors import FormatError
from .durable import fsync_path
from .record import HEADER_SIZE as RECORD_HEADER_SIZE
from .record import MAGIC as RECORD_MAGIC
from .record import read_header, read_payload

MAGIC = b"M3SG"
VERSION = 1
HEADER = struct.Struct("<4sHHI")
HEADER_SIZE = HEADER.size + 4  # 16
DEFAULT_SEGMENT_SIZE = 256 << 20


def segment_name(number) -> str:
    return f"{number:06d}.seg"


def segment_header(number: int) -> bytes:
    """The 16-byte header that starts segment `number` (a package's segment sections too)."""
    head = HEADER.pack(MAGIC, VERSION, 0, number)
    return head + struct.pack("<I", zlib.crc32(head))


def check_segment_header(head, number: int, where: str) -> None:
    """A FormatError, prefixed with `where`, unless `head` starts segment `number` of this version."""
    if len(head) < HEADER_SIZE:
        raise FormatError(f"{where}: {len(head)} bytes, shorter than a segment header")
    magic, version, _, stored = HEADER.unpack_from(head)
    (crc,) = struct.unpack_from("<I", head, HEADER.size)
    if magic != MAGIC or zlib.crc32(bytes(head[: HEADER.size])) != crc:
        raise FormatError(f"{where}: corrupt segment header (not an m3db segment)")
    if version != VERSION:
        raise FormatError(f"{where}: segment format version {version}; this m3db reads version {VERSION}")
    if stored != number:
        raise FormatError(f"{where}: the header says it is segment {stored}, expected {number}")


class SegmentStore:
    def __init__(self, directory, *, segment_size=DEFAULT_SEGMENT_SIZE, read_only=False):
        self.directory = directory
        self.segment_size = segment_size
        self.read_only = read_only
        if not read_only:
            os.makedirs(directory, exist_ok=True)
        self._maps = {}  # number -> (mmap, mapped length)
        self._files = {}  # number -> file object kept open for reading
        self._active = None  # (number, file object opened for append)
        self._dirty = set()  # segment numbers written since the last sync

    # -- listing ---------------------------------------------------------------------------

    def numbers(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        out = []
        for name in os.listdir(self.directory):
            if name.endswith(".seg") and name[:-4].isdigit():
                out.append(int(name[:-4]))
        return sorted(out)

    def path(self, number) -> str:
        return os.path.join(self.directory, segment_name(number))

    def size(self, number) -> int:
        return os.path.getsize(self.path(number))

    # -- writing ---------------------------------------------------------------------------

    def append(self, blob) -> tuple[int, int]:
        """Append one framed record; return (segment number, offset). Not durable until sync()."""
        number, f = self._active_for(len(blob))
        offset = f.seek(0, os.SEEK_END)
        self._dirty.add(number)
        _write_all(f, blob)
        return number, offset

    def _active_for(self, nbytes):
        if self._active is not None:
            number, f = self._active
            if f.seek(0, os.SEEK_END) + nbytes <= self.segment_size or f.tell() == HEADER_SIZE:
                return self._active
            self._seal()
        numbers = self.numbers()
        if numbers and self._active is None:
            last = numbers[-1]
            if self.size(last) + nbytes <= self.segment_size:
                f = open(self.path(last), "r+b", buffering=0)
                try:
                    check_segment_header(f.read(HEADER_SIZE), last, f"segment {segment_name(last)}")
                except FormatError:
                    f.close()
                    raise
                self._active = (last, f)
                return self._active
        return self._create((numbers[-1] + 1) if numbers else 1)

    def _create(self, number):
        f = open(self.path(number), "x+b", buffering=0)
        _write_all(f, segment_header(number))
        self._dirty.add(number)
        self._active = (number, f)
        fsync_path(self.directory)
        return self._active

    def new_segment(self) -> int:
        """Seal the active segment and start a fresh one (compaction writes into these)."""
        self._seal()
        numbers = self.numbers()
        return self._create((numbers[-1] + 1) if numbers else 1)[0]

    def _seal(self):
        if self._active is not None:
            number, f = self._active
            if number in self._dirty:
                os.fsync(f.fileno())
                self._dirty.discard(number)
            f.close()
            self._active = None

    def sync(self) -> None:
        """Make every append so far durable."""
        if self._active is not None:
            os.fsync(self._active[1].fileno())
        self._dirty.clear()

    def tail(self) -> tuple[int, int] | None:
        """(active segment number, its size) or None: where a rollback must cut back to."""
        if self._active is None:
            return None
        number, f = self._active
        return number, f.seek(0, os.SEEK_END)

    def mark(self) -> tuple[int, int]:
        """(segment number, size) of the newest segment now: what rollback_to() returns to."""
        if self._active is not None:
            return self.tail()
        numbers = self.numbers()
        return (numbers[-1], self.size(numbers[-1])) if numbers else (0, 0)

    def rollback_to(self, mark) -> None:
        """Drop every byte appended since `mark` (segments created since are removed)."""
        number, size = mark
        for n in self.numbers():
            if n > number:
                self.remove(n)
        if number:
            self.truncate(number, size)

    def truncate(self, number, size) -> None:
        """Cut segment `number` back to `size` bytes (uncommitted garbage after it). A cut needs
        no free space: it works on the full disk that failed the append it undoes."""
        self._unmap(number)
        if self._active is not None and self._active[0] == number:
            fd = self._active[1].fileno()
            os.ftruncate(fd, size)
            os.fsync(fd)
        else:
            with open(self.path(number), "r+b", buffering=0) as f:
                os.ftruncate(f.fileno(), size)
                os.fsync(f.fileno())

    def remove(self, number) -> None:
        self._unmap(number)
        if self._active is not None and self._active[0] == number:
            self._active[1].close()
            self._active = None
        os.remove(self.path(number))
        fsync_path(self.directory)

    # -- reading ---------------------------------------------------------------------------

    def read(self, number, offset, length) -> bytes:
        """The bytes [offset, offset+length) of a segment, copied out of its mmap (appends are
        unbuffered: the map sees them, and a read never writes)."""
        m, mapped = self._maps.get(number, (None, 0))
        if m is None or offset + length > mapped:
            m, mapped = self._map(number)
        if offset < HEADER_SIZE or offset + length > mapped:
            raise FormatError(
                f"segment {segment_name(number)}: bytes [{offset}, {offset + length}) lie outside the "
                f"file ({mapped} bytes); the segment was truncated or the catalog is damaged"
            )
        return m[offset : offset + length]

    def scan(self, number, start=HEADER_SIZE) -> Iterator[tuple[int, bytes | None, dict | None]]:
        """Every record of segment `number` from byte `start` on, front to back: (offset, blob,
        payload map) for each whose frame and checksums check out and whose payload has an id,
        (offset, None, None) for each damaged stretch, skipped up to the next record magic. A
        damaged segment header raises FormatError (nothing in the file can be trusted)."""
        m, size = self._map(number)
        pos = max(start, HEADER_SIZE)
        while pos + RECORD_HEADER_SIZE <= size:
            where = f"{segment_name(number)} @ {pos}"
            try:
                _, length, _ = read_header(m[pos : pos + RECORD_HEADER_SIZE], where)
                blob = m[pos : pos + RECORD_HEADER_SIZE + length]
                payload = read_payload(blob, where)
                int(payload["id"])
            except (FormatError, KeyError, TypeError, ValueError):
                yield pos, None, None
                pos = m.find(RECORD_MAGIC, pos + 1)  # on to the next frame that checks out
                if pos < 0:
                    return
                continue
            yield pos, blob, payload
            pos += len(blob)

    def _map(self, number):
        self._unmap(number)
        try:
            f = open(self.path(number), "rb")
        except FileNotFoundError as e:
            raise FormatError(f"segment {segment_name(number)} is missing; restore it from a backup or package") from e
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE:
            f.close()
            raise FormatError(f"segment {segment_name(number)} is truncated ({size} bytes, header is {HEADER_SIZE})")
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        try:
            check_segment_header(m[:HEADER_SIZE], number, f"segment {segment_name(number)}")
        except FormatError:
            m.close()
            f.close()
            raise
        self._files[number] = f
        self._maps[number] = (m, size)
        return m, size

    def _unmap(self, number):
        m, _ = self._maps.pop(number, (None, 0))
        if m is not None:
            m.close()
        f = self._files.pop(number, None)
        if f is not None:
            f.close()

    def close(self) -> None:
        self._seal()
        for number in list(self._maps):
            self._unmap(number)


def _write_all(f, data) -> None:
    """Write all of `data` to the unbuffered file `f` (a raw write may take only part of it)."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.EIO, f"a segment write accepted none of {len(view)} bytes")
        view = view[n:]

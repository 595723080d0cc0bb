"""The forgotten log: which memories were forgotten, by which commit, outside the catalog.

A forgotten memory's record stays in its segment until compact() rewrites the segments; the
catalog alone says it is gone. If the catalog is lost, repair (repair.py) rebuilds it from the
records, and this log is how it knows which of them were forgotten (a record carries its
commit number, so an id forgotten and later added again is told apart).

Each forget commit appends one frame, fsynced before the catalog commits:
    u32 payload length | u32 crc32(payload) | msgpack {"seq": commit, "ids": [id, ...]}
A torn or damaged frame ends the log (everything after it is ignored). A rolled-back forget
cuts its frame again; if that fails, the frame names a forget that never committed, and
repair drops those memories (what was being asked for anyway). compact() empties the log once
no segment holds a forgotten record, leaving one frame with no ids and the next id: the high
water mark a repair must not go below. Imports: errors, durable.
"""

import os
import struct
import zlib

import msgpack

from ..errors import FormatError
from .durable import fsync_path, replace_file

FORGOTTEN_FILE = "forgotten.log"
FRAME = struct.Struct("<II")
MAX_FRAME = 64 << 20


class ForgottenLog:
    def __init__(self, directory):
        self.path = os.path.join(directory, FORGOTTEN_FILE)
        self.extent = None  # set by each read: see frames()

    def append(self, seq: int, ids) -> int:
        """Append one commit's forgotten ids, durably; return the size before (the rollback mark)."""
        payload = msgpack.packb({"seq": int(seq), "ids": [int(i) for i in ids]})
        created = not os.path.exists(self.path)
        with open(self.path, "ab") as f:
            mark = f.seek(0, os.SEEK_END)
            f.write(FRAME.pack(len(payload), zlib.crc32(payload)) + payload)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_path(os.path.dirname(self.path))
        return mark

    def truncate(self, mark: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(mark)
            os.fsync(f.fileno())

    def clear(self, seq: int, next_id: int) -> None:
        """Empty the log (no segment holds a forgotten record any more), keeping one frame with no
        ids: the commit and the next id so far, so that a repair after the catalog is lost never
        hands out again an id that was forgotten (and its commit numbers keep rising)."""
        self.rewrite({}, seq, next_id)

    def rewrite(self, forgotten: dict[int, int], seq: int, next_id: int) -> None:
        """Write the log anew, whole, in one atomic replace: a frame per commit of `forgotten`
        ({id: the commit that forgot it}) in commit order, then the high water frame (no ids,
        the commit and the next id so far) that clear() leaves (repair, after it found the log
        damaged or missing, writes what it kept out)."""
        commits = {}
        for i, s in forgotten.items():
            commits.setdefault(int(s), []).append(int(i))
        entries = [{"seq": s, "ids": sorted(ids)} for s, ids in sorted(commits.items())]
        entries.append({"seq": int(seq), "ids": [], "next_id": int(next_id)})
        payloads = [msgpack.packb(entry) for entry in entries]
        replace_file(self.path, b"".join(FRAME.pack(len(p), zlib.crc32(p)) + p for p in payloads))

    def frames(self) -> list[dict]:
        """Every whole frame's map, in order, up to a damaged tail; `extent` then says how far
        they reach: (bytes read as whole frames, the file's size), or None when there is no file."""
        return list(self._entries())

    def high_water(self) -> tuple[int, int]:
        """(the last commit, the next id) that the log has seen; (-1, 0) for none."""
        seq, next_id = -1, 0
        for entry in self._entries():
            seq = max(seq, entry["seq"])
            next_id = max(next_id, entry.get("next_id", 0), *(i + 1 for i in entry["ids"]))
        return seq, next_id

    def read(self) -> dict[int, int]:
        """{memory id: the last commit that forgot it}; a damaged tail is ignored."""
        out = {}
        for entry in self._entries():
            seq = entry["seq"]
            for i in entry["ids"]:
                out[i] = max(seq, out.get(i, -1))
        return out

    def _entries(self):
        """Each frame's map, in order, up to a damaged tail."""
        self.extent = None
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        pos = 0
        while pos + FRAME.size <= len(data):
            length, crc = FRAME.unpack_from(data, pos)
            payload = data[pos + FRAME.size : pos + FRAME.size + length]
            if length > MAX_FRAME or len(payload) != length or zlib.crc32(payload) != crc:
                break  # a torn append (a crash, a full disk): nothing after it committed
            try:
                entry = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            except (ValueError, msgpack.UnpackException):
                entry = None
            # what append and clear write: a commit, a list of ids and perhaps the next id, all
            # non-negative integers (a float, a string of digits or a bool is not one)
            if not (
                isinstance(entry, dict)
                and _is_count(entry.get("seq"))
                and isinstance(entry.get("ids"), list)
                and all(_is_count(i) for i in entry["ids"])
                and _is_count(entry.get("next_id", 0))
            ):
                raise FormatError(f"{self.path}: a frame at byte {pos} has a valid checksum but is malformed")
            yield entry
            pos += FRAME.size + length
        self.extent = (pos, len(data))  # pos < len(data): a damaged or torn tail was not read


def _is_count(value) -> bool:
    """A non-negative integer that fits a BIGINT (an id, a commit number)."""
    return type(value) is int and 0 <= value < 1 << 63

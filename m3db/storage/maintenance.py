"""Maintenance of a store: `check` (read and verify everything) and `compact` (reclaim the bytes
of forgotten memories). Imports: storage modules only.
"""

import contextlib

import numpy as np

from ..errors import FormatError, M3DBError, rolled_back
from .record import decode_record
from .segment import segment_name


class CheckReport:
    """What check() found: `ok`, the number of memories read, and a list of problems."""

    def __init__(self, checked, problems):
        self.checked = checked
        self.problems = problems
        self.ok = not problems

    def __repr__(self):
        return f"<CheckReport ok={self.ok} checked={self.checked} problems={len(self.problems)}>"


def check(store) -> CheckReport:
    """Read and verify every memory's checksums and arrays, and the index against the
    catalog. Nothing is changed."""
    problems = []
    cat = store.catalog.locations()
    ids = cat["id"]
    uniq, counts = np.unique(ids, return_counts=True)
    for dup in uniq[counts > 1][:20]:
        problems.append(f"memory id {dup} appears {counts[uniq == dup][0]} times in the catalog")
    for i in range(len(ids)):
        mid, seg, off, length, crc = (int(cat[c][i]) for c in ("id", "segment", "offset", "length", "checksum"))
        where = f"memory {mid} ({segment_name(seg)} @ {off})"
        try:
            decode_record(store.segments.read(seg, off, length), where, expect_id=mid, expect_crc=crc)
        except FormatError as e:
            problems.append(str(e))
    index_keys = np.sort(store.index.keys())
    if not np.array_equal(index_keys, uniq):
        missing = np.setdiff1d(uniq, index_keys)
        extra = np.setdiff1d(index_keys, uniq)
        problems.append(f"index differs from catalog: {len(missing)} ids missing from it, {len(extra)} extra")
    damaged = store.index.verify_file()
    if damaged:
        problems.append(damaged)
    if store.spec_file() not in (None, store.catalog.meta()["spec"]):
        problems.append("spec.json differs from the catalog's spec (repair would use it); a writable open rewrites it")
    if not np.array_equal(store.locations.ids, uniq):
        problems.append("the in-memory location table differs from the catalog")
    return CheckReport(len(ids), problems)


def compact(store) -> dict:
    """Rewrite live records into fresh segments and delete the old ones. Returns
    {"bytes_before", "bytes_after"}. The new segments are fsynced before the catalog points
    at them, and the old ones are deleted only after: a crash leaves one whole copy."""
    segments = store.segments
    old = segments.numbers()
    before = sum(segments.size(n) for n in old)
    mark = segments.mark()
    ids = store.locations.ids.copy()
    new_seg, new_off = np.zeros(len(ids), np.int32), np.zeros(len(ids), np.int64)
    try:
        segments.new_segment()
        for i, mid in enumerate(ids.tolist()):
            seg, off, length, _ = store.locations.find(mid)
            new_seg[i], new_off[i] = segments.append(segments.read(seg, off, length))
        segments.sync()
        store.catalog.begin()
        store.catalog.move_memories(ids, new_seg, new_off)
        store.catalog.commit()
    except BaseException as e:
        store.catalog.rollback()
        with contextlib.suppress(OSError):  # copies it cannot remove point nowhere: the next open removes them
            segments.rollback_to(mark)
        if isinstance(e, M3DBError) or not isinstance(e, Exception):
            raise
        raise rolled_back(e, "compact()") from e
    store.locations.move(ids, new_seg, new_off)
    removed = 0
    for n in old:
        # committed: the old segments are garbage now. One that cannot be removed (a permission,
        # an I/O error) is harmless and the next writable open removes it: compact still succeeded
        with contextlib.suppress(OSError):
            segments.remove(n)
            removed += 1
    if removed == len(old):  # no segment holds a forgotten record now: repair needs no log
        with contextlib.suppress(OSError):
            store.forgotten.clear()
    after = sum(segments.size(n) for n in segments.numbers())
    return {"bytes_before": before, "bytes_after": after}

"""Maintenance of a store: `check` (read and verify everything), `compact` (reclaim the bytes
of forgotten memories), `train` (a trained codec from a sample of the store's own memories) and
`recompress` (every record re-encoded into another codec, in one atomic swap). Imports: storage
modules, errors and progress.
"""

import contextlib
import dataclasses
import math

import msgpack
import numpy as np

from ..errors import FormatError, InvalidInputError, M3DBError, rolled_back
from ..progress import progress_bar
from .codec import codec_class
from .durable import replace_file
from .index import INDEX_FILE, STATE_FILE
from .memcache import MemoryCache
from .pq import MAX_TRAIN_VECTORS, MIN_TRAIN_VECTORS, check_m, train_pq
from .record import REPAIR_FIELDS, decode_record, encode_record, read_payload
from .segment import segment_name
from .store import CODEBOOK_FILE
from .writer import payload_crc

# a sample is read up to this many vectors per (layer, head): training fits MAX_TRAIN_VECTORS of them,
# an eighth of what is read is held out to measure the stated error, the rest is unused
READ_VECTORS = 2 * MAX_TRAIN_VECTORS


class CheckReport:
    """What check() found: `ok`, the number of memories read, a list of problems, and a list of
    warnings: conditions that lose nothing but want attention (ok stays True)."""

    def __init__(self, checked, problems, warnings=()):
        self.checked = checked
        self.problems = problems
        self.warnings = list(warnings)
        self.ok = not problems

    def __repr__(self):
        shown = f" warnings={len(self.warnings)}" if self.warnings else ""
        return f"<CheckReport ok={self.ok} checked={self.checked} problems={len(self.problems)}{shown}>"


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
            decode_record(
                store.segments.read(seg, off, length), where, expect_id=mid, expect_crc=crc, codec=store.codec
            )
        except FormatError as e:
            problems.append(str(e))
    index_keys = np.sort(store.index.keys())
    if not np.array_equal(index_keys, uniq):
        missing = np.setdiff1d(uniq, index_keys)
        extra = np.setdiff1d(index_keys, uniq)
        problems.append(f"index differs from catalog: {len(missing)} ids missing from it, {len(extra)} extra")
    else:
        problems += _index_vectors_differ(store, uniq)
    damaged = store.index.verify_file()
    if damaged:
        problems.append(damaged)
    if store.spec_file() not in (None, store.catalog.meta()["spec"]):
        problems.append("spec.json differs from the catalog's spec (repair would use it); a writable open rewrites it")
    if not np.array_equal(store.locations.ids, uniq):
        problems.append("the in-memory location table differs from the catalog")
    problems += _forgotten_log_problems(store)
    warnings = []
    if store.index_save_error is not None:
        # every commit is in the catalog; only the index file on disk is behind it
        warnings.append(
            f"the vector index could not be saved ({store.index_save_error}); every commit is in the catalog and the "
            "next open rebuilds the index from it, but until a save succeeds an open pays that rebuild: free space "
            "or fix the directory's permissions (each commit retries the save)"
        )
    return CheckReport(len(ids), problems, warnings)


def _forgotten_log_problems(store) -> list[str]:
    """forgotten.log must read whole: a damaged tail hides the forgets written there, and every
    later one (appended after it), from a repair of a lost catalog (repair.py)."""
    try:
        store.forgotten.frames()
    except FormatError as e:
        return [str(e)]
    except OSError as e:
        return [f"{store.forgotten.path} cannot be read ({e.strerror})"]
    extent = store.forgotten.extent
    if extent is None or extent[0] == extent[1]:
        return []
    return [
        f"{store.forgotten.path} is damaged from byte {extent[0]} of {extent[1]}: a repair could not read the "
        "forgets written there or after it (it would refuse, or bring those memories back); `m3db compact` writes "
        "the log anew"
    ]


def _index_vectors_differ(store, ids, block=4096) -> list[str]:
    """The index holds the right ids but other vectors (another database's index files copied in:
    an open rebuilds such an index when the few vectors it compares differ, but not when those
    happen to agree): every vector against the catalog's embedding it is built from."""
    bad, first = 0, None
    for lo in range(0, len(ids), block):
        part = ids[lo : lo + block]
        got, emb = store.catalog.embeddings(ids=part)
        off = store.index.differs(got, emb)
        bad += int(off.sum())
        if first is None and off.any():
            first = int(got[np.argmax(off)])
    if not bad:
        return []
    return [
        f"the index's vectors differ from the catalog's embeddings for {bad} memories (the first: {first}): "
        f"its files are not this database's; delete {INDEX_FILE} and {STATE_FILE} and the next open rebuilds them"
    ]


@contextlib.contextmanager
def rolling_back(store, mark, verb):
    """Around the copy-then-commit of a rewrite of records (compact, recompress, reencode): on
    any failure, the catalog transaction is rolled back and the new segments' bytes cut back
    to `mark`, leaving the old state; an error that is not m3db's becomes a StorageError saying
    `verb` was rolled back. A cut that fails is left for the next writable open (the copies
    point nowhere)."""
    try:
        yield
    except BaseException as e:
        store.catalog.rollback()
        with contextlib.suppress(OSError):
            store.segments.rollback_to(mark)
        if isinstance(e, M3DBError) or not isinstance(e, Exception):
            raise
        raise rolled_back(e, verb) from e


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
    with rolling_back(store, mark, "compact()"):
        segments.new_segment()
        for i, mid in enumerate(ids.tolist()):
            seg, off, length, _ = store.locations.find(mid)
            new_seg[i], new_off[i] = segments.append(segments.read(seg, off, length))
        segments.sync()
        store.catalog.begin()
        store.catalog.move_memories(ids, new_seg, new_off)
        store.catalog.commit()
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
            store.forgotten.clear(store.commit_seq, store.next_id)
    after = sum(segments.size(n) for n in segments.numbers())
    return {"bytes_before": before, "bytes_after": after}


def train_codec(store, name, *, sample=None, m=8, seed=0, progress=False) -> dict:
    """Database.train_codec: train `name` on `sample` memories when it is a trained codec, then
    recompress into it. The report adds "error" (pq: relative error on its sample, per part)."""
    if codec_class(name).trained:
        if sample is None:
            raise InvalidInputError(f"codec {name!r} is trained: pass sample= (how many memories to train it on)")
        codec = train(store, name, sample=sample, m=m, seed=seed, progress=progress)
    elif sample is not None:
        raise InvalidInputError(f"codec {name!r} is not trained: omit sample=")
    else:
        codec = codec_class(name)()
    report = recompress(store, codec, progress=progress)
    report["error"] = dict(getattr(codec, "error", {}))
    return report


def train(store, name, *, sample, m=8, seed=0, progress=False):
    """Train codec `name` (a trained codec: "pq") on `sample` memories of the store picked at
    random (seeded); return the codec, not yet used by anything. Its codebook number follows the
    store's current one. Refuses a sample too small to train on, naming the number needed."""
    if codec_class(name).name != "pq":
        raise InvalidInputError(f"codec {name!r} is not trained; recompress into it without a sample")
    spec = store.spec
    check_m(m, spec.head_dim)  # before the sample is read, and before "too few memories" hides it
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
    needed = math.ceil(MIN_TRAIN_VECTORS / spec.tokens_per_head)
    if not isinstance(sample, int) or isinstance(sample, bool) or sample < needed:
        raise InvalidInputError(
            f"codec pq needs a sample of at least {needed} memories ({MIN_TRAIN_VECTORS} vectors per (layer, head) "
            f"at {spec.tokens_per_head} tokens per head), got sample={sample!r}"
        )
    ids = store.locations.ids
    rng = np.random.default_rng(seed)
    picked = rng.choice(ids, min(sample, len(ids)), replace=False) if len(ids) else ids
    # k-means fits at most MAX_TRAIN_VECTORS vectors per (layer, head): memories past READ_VECTORS
    # only cost RAM (a sample of 100k sparse memories is 18 GB of float32 arrays, twice over when
    # joined), so the sample is read in its random order up to that many vectors; what was read
    # is joined in id order (a sample under the cap trains exactly as before the cap)
    keys, values = {}, {}
    vectors = 0
    reads = min(len(picked), math.ceil(READ_VECTORS / spec.tokens_per_head))
    with progress_bar(progress, "memories", total=reads, desc="sample") as bar:
        for mid in picked.tolist():
            if vectors >= READ_VECTORS:
                break
            memory = store.read(mid)
            if not memory.cold:
                keys[mid], values[mid] = memory.keys, memory.values  # (L, H, n, D)
                vectors += memory.keys.shape[2]
            bar.update(1)
    keys, values = [keys[i] for i in sorted(keys)], [values[i] for i in sorted(values)]
    if vectors < MIN_TRAIN_VECTORS:
        raise InvalidInputError(
            f"codec pq: the database holds {vectors} vectors per (layer, head) in {len(keys)} encoded memories; a "
            f"codebook needs at least {MIN_TRAIN_VECTORS} (about {needed} memories): add memories first"
        )
    number = store.codec.codebook + 1 if store.codec.name == "pq" else 1
    total = 2 * spec.layers * spec.kv_heads
    with progress_bar(progress, "codebooks", total=total, desc="train") as bar:
        return train_pq(
            np.concatenate(keys, axis=2),  # (L, H, V, D)
            np.concatenate(values, axis=2),
            m=m,
            codebook=number,
            seed=seed,
            progress=lambda done: bar.update(1),
        )


def recompress(store, codec, *, progress=False) -> dict:
    """Re-encode every memory from its decoded arrays into `codec` (a Codec instance; a trained
    one with its parameters), as one swap: the new records go into fresh segments, fsynced; then
    one catalog transaction points every memory at its new record, stores the codec's
    parameters and switches the spec's codec; the old segments are removed after. A crash
    before the catalog commits leaves the old state (the next open removes the new segments), a
    crash after it the new one (the next open removes the old segments). Cold memories (text
    only) are copied as they are. Returns {"bytes_before", "bytes_after", "memories", "codec"}."""
    segments = store.segments
    old = segments.numbers()
    before = sum(segments.size(n) for n in old)
    spec = dataclasses.replace(store.spec, codec=codec.name)
    params = msgpack.packb(codec.params(), use_bin_type=True) if codec.trained else None
    mark = segments.mark()
    ids = store.locations.ids.copy()
    places = {"segment": [], "offset": [], "length": [], "checksum": []}
    moved = {"id": [], "segment": [], "offset": []}  # cold records, copied unchanged
    encoded = []
    with rolling_back(store, mark, "recompress()"):
        segments.new_segment()
        with progress_bar(progress, "memories", total=len(ids), desc="recompress") as bar:
            for mid in ids.tolist():
                seg, off, length, crc = store.locations.find(mid)
                buf = segments.read(seg, off, length)
                where = f"memory {mid} ({segment_name(seg)} @ {off})"
                memory = decode_record(buf, where, expect_id=mid, expect_crc=crc, codec=store.codec)
                if memory.cold:
                    new_seg, new_off = segments.append(buf)
                    for key, value in (("id", mid), ("segment", new_seg), ("offset", new_off)):
                        moved[key].append(value)
                else:
                    codec.check(memory.keys), codec.check(memory.values)
                    payload = read_payload(buf, where, expect_crc=crc)
                    blob = encode_record(
                        mid,
                        codec,
                        memory.keys,
                        memory.values,
                        memory.positions,
                        memory.text,
                        memory.metadata,
                        memory.document_id,
                        memory.ordinal,
                        memory.token_count,
                        repair={key: payload[key] for key in REPAIR_FIELDS if key in payload},
                    )
                    new_seg, new_off = segments.append(blob)
                    encoded.append(mid)
                    for key, value in zip(places, (new_seg, new_off, len(blob), payload_crc(blob))):
                        places[key].append(value)
                bar.update(1)
        segments.sync()
        if params is not None:
            # beside spec.json before the catalog switches: repair of either state finds the codebook
            replace_file(store.path(CODEBOOK_FILE), params)
        store.catalog.begin()
        if params is not None:
            store.catalog.replace_codec(codec.name, codec.version, params)
        if encoded:
            store.catalog.relocate_memories(encoded, *places.values(), codec.name)
        if moved["id"]:
            store.catalog.move_memories(moved["id"], moved["segment"], moved["offset"])
        store.catalog.set_meta("spec", spec.to_json())
        store.catalog.commit()
    if encoded:
        store.locations.move(encoded, *places.values())
    if moved["id"]:
        store.locations.move(moved["id"], moved["segment"], moved["offset"])
    after = take_rewrite(store, spec, codec, old)
    return {"bytes_before": before, "bytes_after": after, "memories": len(ids), "codec": codec.name}


def take_rewrite(store, spec, codec, old) -> int:
    """After the commit of a rewrite of every record (recompress, reencode) and the move of its
    locations: the store reads with the new spec and codec, forgets the old decoded arrays,
    and removes the old segments `old`. Nothing here may fail the committed rewrite: what
    cannot be removed or rewritten now, the next writable open does. Returns the segments'
    bytes after."""
    store.spec, store.codec = spec, codec
    store.cache = MemoryCache(store.cache.max_bytes)  # decoded arrays of the old codec or model
    with contextlib.suppress(OSError):  # a stale spec.json is rewritten by the next writable open
        store.write_spec_file()
    segments, removed = store.segments, 0
    for n in old:
        with contextlib.suppress(OSError):  # as in compact(): the next writable open removes it
            segments.remove(n)
            removed += 1
    if removed == len(old):
        with contextlib.suppress(OSError):
            store.forgotten.clear(store.commit_seq, store.next_id)
    return sum(segments.size(n) for n in segments.numbers())

"""The vector index: a USearch HNSW graph (cosine over f16 vectors) keyed by memory id.

Only this module talks to USearch. The index is a cache of the catalog's embeddings: it is
saved by write-temp-then-rename together with a small state file naming the last commit it
holds and the file's crc32; an index file that fails it is never loaded (USearch trusts its
bytes: a damaged graph can crash the process) but rebuilt from the catalog. On open it is
caught up from the catalog (adds after that commit, removals from the `forgotten`
tombstones), or fully reconciled when the state file does not match.

USearch reports every failure as RuntimeError or ValueError, an operating system's error only
as its text ("Operation not permitted"; a write that fell short, a full disk or a file-size
limit, as "Failed to serialize into stream", leaving a partial file). This module is where
they enter m3db: a save that fails raises StorageError (the errno read from the text where it
names one) and leaves no temporary file; a load or view that fails is a rebuild, never an
error (docs/errors.md has the table of what each really raised).

USearch has no predicate filter in Python, so filtered recall (m3db.search.plan) asks this module
for exact scores over an allowed set or for an over-fetched candidate list.
Never `add()` to an index opened as a view (it can crash the process): a view is only used
read-only and is copied into memory before any change.
"""

import json
import os
import zlib
from typing import Self

import numpy as np
from usearch.index import Index

from ..errors import StorageError, storage_error
from .durable import fsync_path, os_error, remove_quietly

INDEX_FILE = "index.usearch"
STATE_FILE = "index.state"
# HNSW knobs. connectivity is what the HNSW paper calls M; expansion_* its ef parameters.
CONNECTIVITY = 16
EXPANSION_ADD = 64
# The search's candidate list, chosen at a million embedding-like vectors (docs/engine.md):
# recall@5 0.929 / 0.950 / 0.971 / 0.987 at 64 / 128 / 256 / 512, HNSW search 0.55-0.65 /
# 0.86 / 1.19 / 1.40 ms; at 200k every value finds >= 0.997 (search 0.26 ms at 64, 0.39 at 256).
EXPANSION_SEARCH = 256
# exact_all fetches this many more than asked, so equal scores at the cut rank by id
TIE_MARGIN = 16
# the state file's fields, each an integer of at least this (index.state, read_state)
STATE_FIELDS = {"seq": -1, "count": 0, "bytes": 0, "crc32": 0}
MAX_STATE_BYTES = 4096  # a state file is ~70 bytes: a longer one is not one
# a stored vector is a unit vector in float16: its cosine with the float32 one is 1 within ~1e-3
F16_COSINE_TOLERANCE = 1e-2


class VectorIndex:
    def __init__(self, dim, directory=None, *, read_only=False):
        self.dim = dim
        self.directory = directory
        self.read_only = read_only
        self.is_view = False
        self.index = self._empty()
        self.saved_seq = -1  # the commit the file on disk holds; -1: none

    def _empty(self):
        return Index(
            ndim=self.dim,
            metric="cos",
            dtype="f16",
            connectivity=CONNECTIVITY,
            expansion_add=EXPANSION_ADD,
            expansion_search=EXPANSION_SEARCH,
        )

    # -- files -------------------------------------------------------------------------------

    def _path(self, name):
        return os.path.join(self.directory, name)

    def load(self) -> int:
        """Load the saved index if it is intact; return the commit it holds (-1 if none)."""
        if self.directory is None:
            return -1
        path, state_path = self._path(INDEX_FILE), self._path(STATE_FILE)
        if not os.path.exists(path):
            return -1
        state = read_state(state_path)
        if state is None:
            return -1
        try:
            if os.path.getsize(path) != state["bytes"] or file_crc32(path) != state["crc32"]:
                # damaged, or saved before checksums: never hand USearch bytes it did not write
                # (a damaged graph can crash the process); the catalog rebuilds it
                return -1
            meta = Index.metadata(path)
            if meta is None or meta.get("dimensions") != self.dim:
                return -1
            index = self._empty()
            if self.read_only:
                index.view(path)  # memory-mapped: opening costs nothing for a large index
                self.is_view = True
            else:
                index.load(path)
            if len(index) != state["count"]:
                self.is_view = False
                return -1
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            # a damaged or foreign index is only a cache: rebuild it from the catalog
            self.is_view = False
            return -1
        self.index = index
        self.saved_seq = state["seq"]
        return self.saved_seq

    def save(self, seq) -> None:
        """Write temp, fsync, rename; then the state file the same way. A failure raises
        StorageError and leaves the saved files as they were (or the index file new and its
        state file old: a mismatch the next open rebuilds), and no temporary file."""
        if self.directory is None or self.read_only:
            return
        self._materialize()
        tmp, state_tmp = self._path(INDEX_FILE + ".tmp"), self._path(STATE_FILE + ".tmp")
        try:
            self._write(seq, tmp, state_tmp)
        except (OSError, RuntimeError, ValueError) as e:
            remove_quietly(tmp, state_tmp)  # a partial file on a full disk holds the space it took
            raise save_error(e, tmp) from e
        self.saved_seq = int(seq)

    def _write(self, seq, tmp, state_tmp) -> None:
        self.index.save(tmp)
        fsync_path(tmp)
        path = self._path(INDEX_FILE)
        os.replace(tmp, path)
        state = {"seq": int(seq), "count": len(self.index), "bytes": os.path.getsize(path), "crc32": file_crc32(path)}
        with open(state_tmp, "w") as f:
            f.write(json.dumps(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(state_tmp, self._path(STATE_FILE))

    def verify_file(self) -> str | None:
        """None when the saved index file matches the checksum in its state file (or nothing is
        saved), else what is wrong. The index in RAM was checked when it was loaded."""
        if self.directory is None or not os.path.exists(self._path(INDEX_FILE)):
            return None
        state = read_state(self._path(STATE_FILE))
        try:
            if state is not None and file_crc32(self._path(INDEX_FILE)) == state["crc32"]:
                return None
        except OSError:
            pass
        return f"{INDEX_FILE} does not match the checksum in {STATE_FILE}; the next open rebuilds it from the catalog"

    def _materialize(self):
        """Copy a view into memory before any change (adding to a view can crash USearch)."""
        if self.is_view:
            copy = self._empty()
            keys = np.asarray(self.index.keys, dtype=np.uint64)
            if len(keys):
                copy.add(keys, self.vectors(keys))
            self.index = copy
            self.is_view = False

    # -- changes ---------------------------------------------------------------------------

    def add(self, ids, vectors, *, threads=0) -> None:
        """Add (or replace) vectors. threads=1 inserts in the given order on one thread, so
        the same ids and vectors always build the same graph (packages are byte-identical);
        0 uses every core."""
        if len(ids) == 0:
            return
        self._materialize()
        keys = np.asarray(ids, dtype=np.uint64)
        present = self.index.contains(keys) if len(self.index) else np.zeros(len(keys), bool)
        if np.any(present):  # re-adding after a crash, or an id forgotten and reused
            self.index.remove(keys[present])
        self.index.add(keys, unit_rows(vectors), threads=threads)

    def remove(self, ids) -> None:
        if len(ids) == 0:
            return
        self._materialize()
        self.index.remove(np.asarray(ids, dtype=np.uint64))

    def to_bytes(self) -> bytes:
        """The index serialized as USearch saves it (a package's index section)."""
        return bytes(self.index.save())

    @classmethod
    def from_bytes(cls, buffer) -> Self | None:
        """The index held in `buffer` (any dimension: compare `.dim`), or None when USearch
        cannot read it. Hand it only bytes whose checksum was verified."""
        try:
            index = Index.restore(buffer)
        except (ValueError, RuntimeError, TypeError):
            return None
        if index is None:
            return None
        out = cls(index.ndim)
        out.index = index
        return out

    def keys(self) -> np.ndarray:
        return np.asarray(self.index.keys, dtype=np.uint64).astype(np.int64)

    def __len__(self):
        return len(self.index)

    # -- search ----------------------------------------------------------------------------

    def search(self, vector, count, *, expansion=None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate nearest neighbours: (ids int64, cosine similarities), best first.
        `expansion`: HNSW's candidate list for this search (its ef; None: EXPANSION_SEARCH)."""
        if len(self.index) == 0 or count <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        expansion = expansion or EXPANSION_SEARCH
        if self.index.expansion_search != expansion:  # a property of the loaded index, not its file
            self.index.expansion_search = expansion
        m = self.index.search(unit_rows(vector), count=min(count, len(self.index)))
        return np.asarray(m.keys, dtype=np.int64), (1.0 - np.asarray(m.distances, dtype=np.float32))

    def exact_all(self, vector, count) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine top-`count` over the whole index, ranked as `exact` ranks (by the
        similarity returned, ties by id).
        USearch's own brute-force scan: 0.11 ms over 2,048 384-dim vectors, where gathering
        them for `exact` takes 3 ms. It ranks ties in slot order, which differs between two
        indexes built in different orders, so it over-fetches and re-ranks; a tie that runs past
        what was fetched is ranked by `exact`."""
        if len(self.index) == 0 or count <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        fetch = min(count + TIE_MARGIN, len(self.index))
        m = self.index.search(unit_rows(vector), count=fetch, exact=True)
        ids = np.asarray(m.keys, dtype=np.int64)
        sims = 1.0 - np.asarray(m.distances, dtype=np.float32)
        order = np.lexsort((ids, -sims))
        if len(ids) == fetch < len(self.index) and sims[order[min(count, len(ids)) - 1]] <= sims.min():
            return self.exact(vector, self.keys(), count)
        order = order[:count]
        return ids[order], sims[order]

    def contains(self, ids) -> np.ndarray:
        """Which of `ids` the index holds (bool per id)."""
        ids = np.asarray(ids, dtype=np.uint64)
        return (
            np.asarray(self.index.contains(ids), bool).reshape(len(ids))
            if len(self.index)
            else np.zeros(len(ids), bool)
        )

    def differs(self, ids, embeddings) -> np.ndarray:
        """Which of `ids` (all held) store another vector than their `embeddings` made unit length
        (in float16: cosine 1 within F16_COSINE_TOLERANCE; an all-zero embedding stays zero)."""
        want = unit_rows(embeddings)
        cos = (self.vectors(ids) * want).sum(axis=1)
        return np.abs(cos - (want * want).sum(axis=1)) > F16_COSINE_TOLERANCE

    def vectors(self, ids) -> np.ndarray:
        """The stored (f16-rounded) vectors of `ids`, float32 (n, dim)."""
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        got = self.index.get(np.asarray(ids, dtype=np.uint64), dtype=np.float32)
        return np.stack(got) if isinstance(got, tuple) else np.asarray(got).reshape(len(ids), self.dim)

    def exact(self, vector, ids, count) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine top-`count` over the given ids: (ids, similarities), best first."""
        if len(ids) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        mat = self.vectors(ids)
        q = np.asarray(vector, dtype=np.float32)
        # equal vectors (repeated text) must tie exactly, but a matmul may round equal rows
        # differently (BLAS blocks rows unevenly): a row-wise sum does the same work for equal
        # rows. Ranked by the similarity returned (float32), ties by id: a key coarser than the
        # score (it was rounded to 1e-6) put a lower id before a higher score, so SQL's ORDER BY
        # score DESC reordered the rows, and a better id could lose its place at the cut.
        norms = np.sqrt((mat * mat).sum(axis=1, dtype=np.float64))
        sims = (mat * q).sum(axis=1, dtype=np.float64) / (norms * np.linalg.norm(q.astype(np.float64)) + 1e-30)
        sims = sims.astype(np.float32)
        count = min(count, len(ids))
        # every id scoring at least the count-th best, so that a tie at the cut goes by id too
        cut = -np.partition(-sims, count - 1)[count - 1]
        top = np.nonzero(sims >= cut)[0]
        top = top[np.lexsort((ids[top], -sims[top]))][:count]
        return ids[top], sims[top]

    def close(self) -> None:
        self.index = None


def read_state(path) -> dict[str, int] | None:
    """The state file saved with the index: {"seq": the commit it holds (-1 or more), "count":
    its vectors, "bytes": the index file's size, "crc32": its checksum}, or None when the file
    is missing, unreadable or not such an object (then the index is rebuilt from the catalog)."""
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read(MAX_STATE_BYTES + 1))
    except (OSError, ValueError, RecursionError):  # not JSON, not UTF-8 (a ValueError), nesting too deep
        return None
    if not isinstance(state, dict) or not all(
        type(state.get(key)) is int and low <= state[key] < 1 << 64 for key, low in STATE_FIELDS.items()
    ):
        return None
    return {key: state[key] for key in STATE_FIELDS}


def unit_rows(vectors) -> np.ndarray:
    """Vectors scaled to unit length (float32), as they are stored: the index keeps float16, and
    a vector finite in float32 but past float16's range (65504) would become inf, then NaN
    scores. Cosine similarity does not change with scale; all-zero rows stay zero."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v.astype(np.float64), axis=-1, keepdims=True)
    return (v / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def save_error(e: Exception, tmp) -> StorageError:
    """What saving the index raised, as a StorageError: an OSError of the Python side, or
    USearch's RuntimeError or ValueError, whose text names the OS error when it has one."""
    if isinstance(e, StorageError):
        return e
    if not isinstance(e, OSError):
        text = f"USearch: {e}"
        if "serialize" in str(e):  # its fwrite fell short: the errno is not kept
            text += " (a write fell short: a full disk or a file-size limit)"
        e = os_error(str(e), tmp) or OSError(None, text, tmp)
    return storage_error(e, "saving the vector index")


def file_crc32(path, block=8 << 20) -> int:
    """crc32 of a whole file, read in blocks (measured on open: about 0.35 s per GB of index)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc

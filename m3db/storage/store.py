"""The store: the storage of one open database, opened, recovered, read and closed.

A database directory holds `catalog.duckdb` (catalog.py), `segments/NNNNNN.seg` (segment.py),
`index.usearch` + `index.state` (index.py), `lock` (lock.py), and for repair (repair.py)
`spec.json`, `codebook.msgpack` (a trained codec's) and `forgotten.log` (forgotten.py). A store owns them all, plus
the in-RAM location table (locations.py) and the decoded-memory cache (memcache.py).

Opening is recovery: bytes in segments past the last committed record are garbage of a killed
write and are cut (only a writable open cuts) once their records show that a crash can have
left them (every open checks; a catalog behind its segments is refused: see `_garbage`), and
the vector index, a cache of the catalog, is caught up from the catalog's stored embeddings.
A package (a `.m3kb` file) is a store too: m3db.package.store opens one read-only over its
extracted catalog and index, handing in its own segment reader, catalog class and no lock;
nothing here knows about packages.

The store does not write records (writer.py), check input (validate.py), or check and compact
(maintenance.py). Imports: storage modules only.
"""

import contextlib
import os
import warnings

import numpy as np

from ..errors import FormatError, InvalidInputError, NotFoundError, StorageError, storage_error
from .catalog import CATALOG_ERRORS, Catalog, damaged
from .codec import stored_codec
from .durable import replace_file
from .forgotten import FORGOTTEN_FILE, ForgottenLog
from .index import INDEX_FILE, STATE_FILE, VectorIndex
from .locations import LocationTable
from .lock import LOCK_FILE, DatabaseLock
from .memcache import MemoryCache
from .record import Memory, decode_record, read_payload
from .segment import DEFAULT_SEGMENT_SIZE, SegmentStore, segment_name
from .spec import MemorySpec

CATALOG_FILE = "catalog.duckdb"
SPEC_FILE = "spec.json"  # the catalog's spec, written once: what repair rebuilds the catalog with
CODEBOOK_FILE = "codebook.msgpack"  # a trained codec's parameters (the catalog's codecs row), for repair
SEGMENTS_DIR = "segments"
DEFAULT_CACHE_BYTES = 256 << 20
# save the index once this many changes (or a quarter of its size) are unsaved: a crash then
# costs at most that much catch-up on the next open
INDEX_SAVE_EVERY = 50_000
INDEX_PROBES = 16  # vectors compared with the catalog's at open: another database's index is caught


class IndexSaveWarning(RuntimeWarning):
    """Saving the vector index failed after a commit, at an open or at close (a full disk, a
    permission, a read-only mount). Nothing is lost and no write failed: the index is a cache of
    the catalog, which holds every commit; the save is tried again after as many changes again
    and at close, and an open catches the index up from the catalog. `Store.index_save_error`
    holds the StorageError until a save succeeds."""


def holds_catalog(directory: str) -> bool:
    """Is there an m3db catalog in `directory`?"""
    return os.path.exists(os.path.join(directory, CATALOG_FILE))


def require_catalog_if_data(directory: str) -> None:
    """Refuse a directory whose segments outlived its catalog: opening it would make a new, empty
    catalog and recovery would then delete every segment as unreferenced. Nothing is changed."""
    if not holds_catalog(directory):
        require_no_segments(directory, "is missing")


def require_no_segments(directory: str, what: str) -> None:
    """Refuse to make a new catalog beside segment files: `what` says what became of the old one
    ("is missing"; "holds no tables": its catalog.duckdb.wal, which held them, was lost)."""
    segments = os.path.join(directory, SEGMENTS_DIR)
    found = sorted(n for n in os.listdir(segments) if n.endswith(".seg")) if os.path.isdir(segments) else []
    if found:
        raise FormatError(
            f"{os.path.join(directory, CATALOG_FILE)} {what}, but {SEGMENTS_DIR}/ holds {len(found)} segment "
            "file(s) of memories. Nothing was changed: rebuild it from them with `m3db check --repair` (or "
            "m3db.repair(path)), restore catalog.duckdb from a backup, or move the directory away to start a new "
            "database there"
        )


# what a database directory holds (and their temporary or journal names, which start the same):
# a folder holding anything else is the user's, not a database to create files in
OWN_NAMES = (CATALOG_FILE, SPEC_FILE, CODEBOOK_FILE, SEGMENTS_DIR, INDEX_FILE, STATE_FILE, LOCK_FILE, FORGOTTEN_FILE)
OWN_NAMES += ("reencode",)  # staging.STAGING_DIR (staging imports maintenance, which imports this module)


def require_place_for_new(directory: str, shown: str) -> None:
    """Refuse to create a database where it would mix with other files: in a folder that holds
    files of its own (a typo'd path, a folder of databases) or inside another database (its
    segments/ folder, say). A folder left by an interrupted creation holds only m3db's names."""
    parent = os.path.dirname(directory)
    while parent != os.path.dirname(parent):
        if holds_catalog(parent):
            raise InvalidInputError(
                f"{shown!r} is inside the m3db database {parent!r}; a database cannot hold another: choose a path "
                "outside it"
            )
        parent = os.path.dirname(parent)
    if os.path.isdir(directory):
        foreign = sorted(n for n in os.listdir(directory) if not n.startswith(OWN_NAMES))
        if foreign:
            listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise InvalidInputError(
                f"{shown!r} is a folder of other files ({listed}) with no m3db database in it; a new database is "
                f"made in a new or empty folder: name one (e.g. {os.path.join(shown, 'kb.m3db')!r}), or check the path"
            )


class Store:
    """The storage of one open database.

    directory: the database directory (it exists). spec: required to create a catalog; given
    for an existing one, it must equal the stored spec. config: checked connect() settings.
    segments: a segment reader to use instead of the directory's SegmentStore (a package's);
    catalog_class: the Catalog subclass to open with; lock: False takes no lock (a package is
    immutable). On any failure the store closes what it opened and re-raises.
    """

    def __init__(
        self,
        directory,
        *,
        spec=None,
        read_only=False,
        config=None,
        segments=None,
        catalog_class=Catalog,
        lock=True,
        lock_timeout=0,
    ):
        self.directory = directory
        self.read_only = read_only
        self.config = dict(config or {})
        self.catalog = self.segments = self.index = None
        require_catalog_if_data(directory)
        self.lock = DatabaseLock(directory, read_only=read_only, timeout=lock_timeout) if lock else None
        try:
            try:
                self._open(spec, segments, catalog_class)
            except CATALOG_ERRORS as e:
                raise damaged(os.path.join(directory, CATALOG_FILE), e) from e
        except BaseException:
            self.close(save=False)
            if segments is not None:
                segments.close()
            raise

    def _open(self, spec, segments, catalog_class):
        self.catalog = catalog_class(os.path.join(self.directory, CATALOG_FILE), read_only=self.read_only)
        if self.catalog.is_new():
            if segments is None:  # a package's catalog is its own (made from the package)
                require_no_segments(self.directory, "holds no tables (lost with its catalog.duckdb.wal?)")
            if spec is None:
                raise InvalidInputError(
                    f"{self.directory!r} holds no m3db catalog; pass spec= or a model to create one"
                )
            self.catalog.create(spec.to_json(), spec.embedding_dim)
        meta = self.catalog.meta()
        stored = MemorySpec.from_json(meta["spec"])
        if spec is not None:
            stored.require_same(spec)
        self.spec = stored
        # trained codecs (pq) keep their parameters in the catalog's `codecs` table, at the version they write
        self.codec = stored_codec(stored.codec, self.catalog.codec_rows())
        if not self.read_only:
            self.write_spec_file()
        self.forgotten = ForgottenLog(self.directory)
        self.commit_seq = int(meta["commit_seq"])
        self.segments = segments or SegmentStore(
            os.path.join(self.directory, SEGMENTS_DIR),
            segment_size=self.config.get("segment_size", DEFAULT_SEGMENT_SIZE),
            read_only=self.read_only,
        )
        self.locations = LocationTable(self.catalog.locations())
        if segments is None:  # a package's segments are immutable and match its catalog
            self._recover_segments()
        self.next_id = max(int(meta["next_id"]), self.locations.max_id() + 1)
        self.index = VectorIndex(stored.embedding_dim, self.directory, read_only=self.read_only)
        self._catch_up_index()
        self.cache = MemoryCache(self.config.get("cache_bytes", DEFAULT_CACHE_BYTES))

    def path(self, name) -> str:
        """The path of the file `name` in the database directory."""
        return os.path.join(self.directory, name)

    def write_spec_file(self) -> None:
        """Write `spec.json` (and a trained codec's `codebook.msgpack`) where they differ from the
        catalog: repair rebuilds a lost catalog from them and the records."""
        text = self.catalog.meta()["spec"]
        if self.spec_file() != text:
            replace_file(self.path(SPEC_FILE), text)
        if self.codec.trained:
            params = self.catalog.codec_bytes(self.codec.name, self.codec.version)
            try:
                with open(self.path(CODEBOOK_FILE), "rb") as f:
                    same = f.read() == params
            except OSError:
                same = False
            if not same:
                replace_file(self.path(CODEBOOK_FILE), params)

    def spec_file(self) -> str | None:
        """The text of `spec.json`, or None when it cannot be read."""
        try:
            with open(os.path.join(self.directory, SPEC_FILE), encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError):
            return None

    def _recover_segments(self):
        """Cut bytes past the last committed record; drop segments nothing points at (a
        writable open; every open checks first that only a crash's leftovers are there)."""
        garbage = self._garbage()
        if self.read_only:
            return
        for number, end in garbage:
            if end is None:
                self.segments.remove(number)
            else:
                self.segments.truncate(number, end)
        for name in (INDEX_FILE + ".tmp", STATE_FILE + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, name))

    def _garbage(self) -> list[tuple[int, int | None]]:
        """[(segment, end)]: the bytes of each segment past the last record the catalog points at
        (end None: the whole segment), once shown to be what a crash or a failed rollback leaves.

        Such bytes hold the records of the one commit a crash cut short (commit_seq + 1), copies
        of committed records (compact, recompress, a cold memory's encoding) and records a commit
        dropped (added and forgotten in one transaction): all of seq <= commit_seq + 1. A whole
        record of a later commit proves the catalog lost commits (its WAL deleted or cut short,
        an older copy restored); a segment the catalog points at that is missing, that it is not
        the catalog of these segments. Either way cutting would destroy the only copy of those
        memories: a FormatError names repair, and nothing is changed."""
        ends = self.locations.segment_ends()  # loaded from the catalog just before: no second query
        present = self.segments.numbers()
        garbage = [(n, ends.get(n)) for n in present if n not in ends or self.segments.size(n) > ends[n]]
        if not garbage:
            return []
        missing = sorted(set(ends) - set(present))
        if missing:
            first = garbage[0][0]
            raise self._mismatch(
                f"it points at {SEGMENTS_DIR}/{segment_name(missing[0])}, which is missing, while "
                f"{SEGMENTS_DIR}/{segment_name(first)} holds bytes it does not point at"
            )
        for number, end in garbage:
            try:
                records = list(self.segments.scan(number, end or 0))
            except FormatError:
                continue  # a damaged segment header: none of it is a record to keep
            for offset, _, payload in records:
                seq = payload.get("seq") if payload is not None else None
                if isinstance(seq, int) and seq > self.commit_seq + 1:
                    raise self._mismatch(
                        f"{SEGMENTS_DIR}/{segment_name(number)} @ {offset} holds a whole record (memory "
                        f"{payload['id']}) of commit {seq}, past the catalog's last commit {self.commit_seq}: the "
                        "catalog lost commits (its catalog.duckdb.wal deleted or cut short, or an older copy "
                        "restored)"
                    )
        return garbage

    def _mismatch(self, why) -> FormatError:
        return FormatError(
            f"the catalog {self.path(CATALOG_FILE)!r} does not match the segments: {why}. Opening it would cut "
            "records that no other file holds. Nothing was changed: rebuild the catalog from the segments with "
            "`m3db check --repair` (the old catalog is kept aside), or restore the catalog.duckdb (and "
            "catalog.duckdb.wal) that belong to these segments"
        )

    def _catch_up_index(self):
        self.unsaved = 0  # changes the saved index lacks
        self.since_save = 0  # changes since the last save was tried (a failed one waits this long)
        self.index_save_error = None  # the StorageError of the last save, until one succeeds
        seq = self.index.load()
        if seq >= 0 and not self._index_is_this_catalogs():
            # another database's index files (their state agrees with itself): rebuilt, as a damaged one
            self.index, seq = VectorIndex(self.index.dim, self.directory, read_only=self.read_only), -1
        if seq == self.commit_seq and len(self.index) == len(self.locations):
            return
        if 0 <= seq < self.commit_seq:
            # the fast path: apply the commits the saved index has not seen
            self.index.remove(self.catalog.forgotten_after(seq))
            ids, emb = self.catalog.embeddings(after_seq=seq)
            self.index.add(ids, emb)
        if seq < 0 or len(self.index) != len(self.locations) or seq > self.commit_seq:
            # no usable state: reconcile the whole key set against the catalog
            have = self.index.keys()
            extra = np.setdiff1d(have, self.locations.ids)
            self.index.remove(extra)
            missing = np.setdiff1d(self.locations.ids, have)
            ids, emb = self.catalog.embeddings(ids=missing)
            self.index.add(ids, emb)
        self.unsaved = len(self.index)
        if not self.read_only:
            self.try_save_index("opened (the index in memory is caught up), but")

    def _index_is_this_catalogs(self) -> bool:
        """Do a few of the loaded index's vectors equal the catalog's embeddings of their ids
        (unit length, float16)? An id the index lacks proves nothing here (catch-up adds it)."""
        ids = self.locations.ids
        if not len(ids):
            return True
        sample = np.unique(ids[np.linspace(0, len(ids) - 1, min(INDEX_PROBES, len(ids))).astype(np.int64)])
        sample = sample[self.index.contains(sample)]
        if not len(sample):
            return True
        return not self.index.differs(*self.catalog.embeddings(ids=sample)).any()

    # -- reading -------------------------------------------------------------------------------

    def read(self, memory_id, *, arrays: bool = True) -> Memory:
        """The memory with this id, from the cache or its segment, checksums checked. A cold
        memory comes back cold (text only): encoding it is the knowledge layer's job."""
        if not isinstance(memory_id, (int, np.integer)) or isinstance(memory_id, bool):
            raise InvalidInputError(f"memory ids are integers, got {memory_id!r}")
        loc = self.locations.find(int(memory_id))
        if loc is None:
            raise NotFoundError(f"no memory with id {memory_id}")
        cached = self.cache.get(int(memory_id))
        if cached is not None:
            return cached
        segment, offset, length, checksum = loc
        where = f"memory {memory_id} ({segment_name(segment)} @ {offset})"
        buf = self.segments.read(segment, offset, length)
        memory = decode_record(
            buf, where, expect_id=int(memory_id), expect_crc=checksum, arrays=arrays, codec=self.codec
        )
        if arrays and not memory.cold:
            self.cache.put(memory)
        return memory

    def read_payload(self, memory_id) -> dict:
        """The checked payload map of a memory's record (what re-encoding it must carry over)."""
        segment, offset, length, checksum = self.locations.find(int(memory_id))
        where = f"memory {memory_id} ({segment_name(segment)} @ {offset})"
        return read_payload(self.segments.read(segment, offset, length), where, expect_crc=checksum)

    # -- the index, a cache of the catalog -------------------------------------------------------

    def index_changed(self, n: int) -> None:
        """Count `n` changes the saved index lacks; save it when enough have piled up (after a
        failed save, once as many changes again have: a disk that stays full does not pay a
        whole index write at every commit)."""
        self.unsaved += n
        self.since_save += n
        every = self.config.get("index_save_every", INDEX_SAVE_EVERY)
        if self.since_save >= max(every, len(self.index) // 4):
            self.try_save_index(f"commit {self.commit_seq} stands, but")

    def save_index(self) -> None:
        """Save the index now; a failure raises StorageError (index.py)."""
        self.since_save = 0
        self.index.save(self.commit_seq)
        self.unsaved = 0
        self.index_save_error = None

    def try_save_index(self, context: str) -> bool:
        """Save the index; a failure (StorageError) is kept in `index_save_error` and warned as
        an IndexSaveWarning starting with `context`, never raised: it runs after a commit, at an
        open that has caught the index up, or at close, and the commit stands whatever happens
        here (the saved index stays behind; the next save or open catches it up)."""
        try:
            self.save_index()
            return True
        except OSError as e:  # index.py raises StorageError (an OSError) for whatever failed
            error = e if isinstance(e, StorageError) else storage_error(e, "saving the vector index")
            self.index_save_error = error
            warnings.warn(
                f"{context} the vector index could not be saved: {error}. Nothing is lost: the catalog holds every "
                f"commit, and the index, a cache of it, is saved again after more changes and at close; an open "
                f"catches it up from the catalog ({self.unsaved} changes behind)",
                IndexSaveWarning,
                stacklevel=3,
            )
            return False

    def close(self, *, save: bool = True) -> None:
        """Save the index if it is behind (writable stores), then release every file. A save
        that fails (a full disk, a permission) does not fail the close: it warns (an
        IndexSaveWarning); every commit is in the catalog already, and the next open catches the
        index up from it."""
        try:
            if save and not self.read_only and self.index is not None and self.unsaved:
                self.try_save_index("closed, but")
        finally:
            for part in (self.segments, self.catalog, self.index, self.lock):
                if part is None:
                    continue
                with contextlib.suppress(Exception):
                    part.release() if part is self.lock else part.close()
            self.segments = self.catalog = self.index = self.lock = None

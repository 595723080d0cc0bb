"""Attaching packages: a `.m3kb` file opened read-only in place, and several recalled together.

`m3db.connect("kb.m3kb")` lands here (database.py recognizes the file's magic): `Package(path)`
reads and checks the frame and the shipped memory spec, then `open_store()` gives a read-only
`Store` (m3db.storage.store) over the package, the same interface as a database directory's. Segments are
never copied: `PackageSegments` reads records from a memory map of the package file, and no
segment byte is touched until a memory is read (a record's checksums are checked on every
read; `verify` checks the section hashes). The catalog and the index cannot be used in place
(DuckDB wants a database file, USearch a file of its own), so the first open extracts them
into a cache directory keyed by the manifest's sha256 (which covers every section's hash):

    <cache>/packages/<manifest sha256>-catalog<N>-index<M>/catalog.duckdb, index.usearch, index.state

(N: the catalog format version this m3db writes, M the index state's, so an upgrade never
reads an old entry).

<cache> is config["cache_dir"], else $M3DB_CACHE_DIR, else $XDG_CACHE_HOME/m3db, else
~/.cache/m3db. Extraction writes a temporary directory there and renames it into place, so
processes racing to open the same package each see a complete entry or none; the loser of the
race drops its copy. Nothing outside the cache directory is ever written; entries are never
changed once renamed, so any number of processes may read them. Then a store opens read-only
over the entry, reading segments through `PackageSegments` and taking no lock. An entry that
fails to open, or whose index file fails its state's checksum (a disk error, a cache cleaner
that deleted a file), is renamed aside, deleted and extracted again: it is only a copy of the
package's sections, so damage there never outlives the next open.
Imports: storage's public names, and this package's manifest, export and pack modules.
"""

import contextlib
import hashlib
import json
import mmap
import os
import secrets
import shutil
import tempfile
import time
from typing import NoReturn

import numpy as np

from ..errors import FormatError, InvalidInputError, M3DBError, ReadOnlyError
from ..storage.catalog import CATALOG_VERSION, Catalog
from ..storage.index import INDEX_FILE, STATE_FILE, VectorIndex, file_crc32
from ..storage.segment import HEADER_SIZE as SEG_HEADER_SIZE
from ..storage.spec import MemorySpec
from ..storage.store import CATALOG_FILE, Store
from ..storage.validate import CONFIG_KEYS, check_config
from .export import BUILTIN_TYPES, read_catalog
from .manifest import Frame, check_segment_section, section_name, section_pieces

CACHE_ENV = "M3DB_CACHE_DIR"
# entries made before the index state held a checksum would rebuild the index in RAM on every
# open: a new version gives them a new name, so they are extracted afresh once
INDEX_STATE_VERSION = 2
STALE_SECONDS = 24 * 3600
# connect()'s settings for writing: a package is read-only, so they are refused
WRITING_KEYS = ("index_save_every", "segment_size")
PACKAGE_CONFIG_KEYS = sorted([*(k for k in CONFIG_KEYS if k not in WRITING_KEYS), "cache_dir"])


def cache_root(config=None) -> str:
    """The directory package extractions live in (see the module docstring)."""
    base = (config or {}).get("cache_dir") or os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "m3db")
    return os.path.join(os.path.abspath(os.fspath(base)), "packages")


class PackageSegments:
    """The segment sections of a package, read in place through one mmap of the file.

    Same verbs as SegmentStore for reading (`read`, `numbers`, `size`, `close`); no writes.
    """

    def __init__(self, path, frame):
        self.path = path
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        if size != frame.size:
            self._file.close()
            raise FormatError(f"{path!r} changed size while it was being opened ({frame.size} -> {size} bytes)")
        self.map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ)
        self._sections = {
            int(n.split("/")[1]): (off, length)
            for n, (off, length, _) in frame.sections.items()
            if n.startswith("segment/")
        }
        self._checked = set()

    def numbers(self) -> list[int]:
        return sorted(self._sections)

    def size(self, number) -> int:
        return self._sections[number][1]

    def read(self, number, offset, length) -> bytes:
        """The bytes [offset, offset+length) of segment `number`, copied out of the package's mmap."""
        name = section_name(number) if number in self._sections else f"segment {number}"
        if number not in self._sections:
            raise FormatError(
                f"{self.path!r}: the catalog points into {name}, which the package does not have; run `m3db verify`"
            )
        base, size = self._sections[number]
        if number not in self._checked:
            check_segment_section(self.map, base, size, number, f"{self.path!r} section {name!r}")
            self._checked.add(number)
        if offset < SEG_HEADER_SIZE or length < 0 or offset + length > size:
            raise FormatError(
                f"{self.path!r} section {name!r}: bytes [{offset}, {offset + length}) lie outside the {size}-byte "
                "segment; the package is damaged, run `m3db verify`"
            )
        return self.map[base + offset : base + offset + length]

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self._file.close()
            self.map = None


class PackageCatalog(Catalog):
    """The catalog extracted from a package: read-only, with an error that says why."""

    def require_writable(self) -> NoReturn:
        raise ReadOnlyError("a package (.m3kb) is read-only; make changes in a database directory and pack it again")


class Package:
    """A package file, its frame read and checked: `manifest`, and `spec`, the memory spec it ships."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self.frame = Frame(f, self.path)
        self.manifest = self.frame.manifest
        try:
            self.spec = MemorySpec.from_dict(self.manifest["spec"])
        except (M3DBError, TypeError, ValueError) as e:
            raise FormatError(f"{self.path}: the manifest's memory spec is invalid ({str(e)[:300]})") from None

    def open_store(self, config=None) -> Store:
        """A read-only Store over this package: the catalog and index extracted to the cache
        entry (once), segments read in place. config: connect()'s reading settings, plus
        "cache_dir". A damaged entry (a file deleted, truncated, changed) is extracted again."""
        cache_dir, config = _package_config(config)
        # keyed by content, and by the catalog format this m3db materializes it in
        entry = os.path.join(
            cache_root({"cache_dir": cache_dir}),
            f"{self.frame.manifest_sha256}-catalog{CATALOG_VERSION}-index{INDEX_STATE_VERSION}",
        )
        replaced = False
        while True:
            fresh = not os.path.isdir(entry)
            segments = PackageSegments(os.path.abspath(self.path), self.frame)
            try:
                if fresh:
                    _extract(self.path, segments.map, self.frame, entry)
            except BaseException:
                segments.close()
                raise
            store, problem = self._open_entry(entry, segments, config)
            if problem is None:
                return store
            if fresh or replaced:  # what was just extracted does not open: not a damaged cache
                raise FormatError(
                    f"{self.path!r}: its freshly extracted cache entry {entry!r} {problem}. Run "
                    f"`m3db verify {self.path}`; if the package is intact, report this with that output"
                )
            # the cache is only a copy of the package's sections: a damaged entry (a disk error,
            # a cleaner that deleted one file) is replaced, never reported on every open
            _discard(entry)
            replaced = True

    def _open_entry(self, entry, segments, config) -> tuple[Store | None, str | None]:
        """(the store over `entry`, None), or (None, what is wrong with the entry). The Store
        closes `segments` when it fails to open."""
        try:
            store = Store(
                entry, read_only=True, config=config, segments=segments, catalog_class=PackageCatalog, lock=False
            )
        except (M3DBError, OSError) as e:
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            return None, f"cannot be opened ({first_line[:300]})"
        if store.spec != self.spec or len(store.locations) != self.manifest["counts"]["memories"]:
            problem = "does not match the package's spec and counts"
        elif store.index.saved_seq != store.commit_seq:
            # the entry's index file failed its state's checksum (or was gone), so the store
            # rebuilt the index in RAM, as it does on every open of this entry until it is replaced
            problem = f"holds an {INDEX_FILE} that does not match its {STATE_FILE}"
        else:
            return store, None
        store.close()
        return None, problem


def _package_config(config) -> tuple[object, dict]:
    """(cache_dir, the checked reading settings) of connect()'s config for a package."""
    if config is not None and not isinstance(config, dict):
        raise InvalidInputError(f"config must be a dict, got {type(config).__name__}")
    config = dict(config or {})
    cache_dir = config.pop("cache_dir", None)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise InvalidInputError(f"config 'cache_dir' must be a path, got {cache_dir!r}")
    if any(k in WRITING_KEYS for k in config):
        raise InvalidInputError(
            "config 'segment_size' and 'index_save_every' are for writing; a package is read-only. A package "
            f"takes {PACKAGE_CONFIG_KEYS}"
        )
    unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
    if unknown:
        # check_config would list the writing keys too, which a package refuses, and not cache_dir
        raise InvalidInputError(f"unknown config key {unknown[0]!r}; a package takes {PACKAGE_CONFIG_KEYS}")
    return cache_dir, check_config(config)


def _discard(entry) -> None:
    """Move a damaged cache entry aside (one rename: a process opening it next sees it whole or
    not at all, and extracts afresh), then delete it. Another process may have moved it first."""
    aside = os.path.join(os.path.dirname(entry), f".tmp-damaged-{secrets.token_hex(8)}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return
    # a process with the old entry open keeps reading its files (POSIX); what rmtree cannot
    # remove now, _remove_stale removes after a day
    shutil.rmtree(aside, ignore_errors=True)


def _extract(where, mm, frame, entry):
    """Materialize the catalog and index of a package into `entry`, atomically."""
    root = os.path.dirname(entry)
    os.makedirs(root, exist_ok=True)
    _remove_stale(root)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        off, length, digest = frame.sections["index"]
        h = hashlib.sha256()
        index_path = os.path.join(tmp, INDEX_FILE)
        with open(index_path, "wb") as out:
            for piece in section_pieces(mm, off, length, h):
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != digest:
            raise FormatError(
                f"{where}: section 'index' fails its sha256; the package is damaged, run `m3db verify {where}`"
            )
        ids, seq = _materialize_catalog(where, mm, frame, os.path.join(tmp, CATALOG_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as out:
            json.dump({"seq": seq, "count": len(ids), "bytes": length, "crc32": file_crc32(index_path)}, out)
            out.flush()
            os.fsync(out.fileno())
        _check_index(where, tmp, frame.manifest["spec"]["embedding_dim"], ids)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isdir(entry):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(root):
    """Drop temporary directories that killed extractions left behind (a day old: no live
    extraction takes that long)."""
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        with contextlib.suppress(OSError):
            if name.startswith(".tmp-") and now - os.stat(path).st_mtime > STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)


def _materialize_catalog(where, mm, frame, target):
    off, length, digest = frame.sections["catalog"]
    h = hashlib.sha256()
    cat = Catalog(target)
    try:
        ids, seq = [], 0
        for item in read_catalog(section_pieces(mm, off, length, h), f"{where}: section 'catalog'", frame.manifest):
            if item[0] == "head":
                head = item[1]
                spec = head["spec"]
                cat.create(spec.to_json(), spec.embedding_dim)
                seq = int(head["meta"]["commit_seq"])
                cat.set_meta("commit_seq", seq)
                cat.set_meta("next_id", int(head["meta"]["next_id"]))
                for name, sql_type in head["memory_columns"]:
                    if name not in BUILTIN_TYPES:
                        cat.add_metadata_column(name, sql_type)
                cat.begin()
                for name, version, params in head["codecs"]:
                    cat.insert_codec(name, version, params)
            elif item[0] == "documents":
                _insert_documents(cat, item[1])
            else:
                _, cols, vectors = item
                batch = {k: _column(v) for k, v in cols.items()}
                batch["created_at"] = np.asarray(cols["created_at"], dtype=np.int64).astype("datetime64[us]")
                batch["checksum"] = np.asarray(cols["checksum"], dtype=np.uint64)
                emb = np.empty(len(vectors), dtype=object)
                for i, v in enumerate(vectors):
                    emb[i] = v
                batch["embedding"] = emb
                cat.insert_memories(batch)
                ids.append(cols["id"])
        cat.commit()
        cat.checkpoint()
    except M3DBError:
        raise
    except Exception as e:  # DuckDB refusing a value (say, a JSON column holding non-JSON)
        raise FormatError(f"{where}: the catalog section cannot be loaded ({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        cat.close()
    if h.hexdigest() != digest:
        raise FormatError(
            f"{where}: section 'catalog' fails its sha256; the package is damaged, run `m3db verify {where}`"
        )
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), seq


def _check_index(where, directory, dim, ids):
    """The shipped index must load and hold exactly the catalog's ids: a hash proves the bytes
    are the packer's, not that they make an index of this catalog."""
    index = VectorIndex(dim, directory, read_only=True)
    try:
        if index.load() < 0:
            raise FormatError(
                f"{where}: section 'index' is not a USearch index of {len(ids)} vectors of dimension {dim}; "
                f"the package is damaged or was not made by m3db pack, run `m3db verify {where}`"
            )
        if not np.array_equal(np.sort(index.keys()), ids):
            raise FormatError(f"{where}: section 'index' holds other ids than the catalog; run `m3db verify {where}`")
    finally:
        index.close()


def _insert_documents(cat, cols):
    batch = {k: _column(v) for k, v in cols.items()}
    batch["created_at"] = np.asarray(cols["created_at"], dtype=np.int64).astype("datetime64[us]")
    cat.insert_documents(batch)


def _column(values):
    """A checked column (numpy array, or a list that may hold None) as something DuckDB can scan."""
    if isinstance(values, np.ndarray):
        return values
    if values and all(v is not None for v in values):
        arr = np.array(values)
        if arr.dtype.kind in "iufb":
            return arr
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out

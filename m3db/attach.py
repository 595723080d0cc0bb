"""Attaching packages: a `.m3kb` file opened read-only in place, and several recalled together.

`m3db.connect("kb.m3kb")` lands here (database.py recognizes the file's magic). Segments are
never copied: `PackageSegments` reads records from a memory map of the package file, and no
segment byte is touched until a memory is read (a record's checksums are checked on every
read; `verify` checks the section hashes). The catalog and the index cannot be used in place
(DuckDB wants a database file, USearch a file of its own), so the first open extracts them
into a cache directory keyed by the manifest's sha256 (which covers every section's hash):

    <cache>/packages/<manifest sha256>-catalog<N>/catalog.duckdb, index.usearch, index.state

(N: the catalog format version this m3db writes, so an upgrade never reads an old entry).

<cache> is config["cache_dir"], else $M3DB_CACHE_DIR, else $XDG_CACHE_HOME/m3db, else
~/.cache/m3db. Extraction writes a temporary directory there and renames it into place, so
processes racing to open the same package each see a complete entry or none; the loser of the
race drops its copy. Nothing outside the cache directory is ever written; entries are never
changed once renamed, so any number of processes may read them. Then the database's own open
runs read-only over the entry, and its segment store is swapped for `PackageSegments`.

`PackageSet` (from `m3db.attach([...])` or `m3db.connect([...])`) recalls from several
packages at once, merging by score; each match names its package. Their memory specs must match.
"""

import contextlib
import dataclasses
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time

import numpy as np

from .catalog import CATALOG_VERSION, Catalog
from .catalog_export import BUILTIN_TYPES, read_catalog
from .errors import FormatError, InvalidInputError, M3DBError, NotFoundError, ReadOnlyError
from .index import INDEX_FILE, STATE_FILE, VectorIndex
from .manifest import Frame, is_package, section_name
from .package import check_segment_header, section_pieces
from .recall import Match, Matches
from .segment import HEADER_SIZE as SEG_HEADER_SIZE
from .spec import MemorySpec

CACHE_ENV = "M3DB_CACHE_DIR"
CATALOG_FILE = "catalog.duckdb"
STALE_SECONDS = 24 * 3600


def cache_root(config=None):
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
        self._map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ)
        self._sections = {int(n.split("/")[1]): (off, length) for n, (off, length, _) in frame.sections.items()
                          if n.startswith("segment/")}
        self._checked = set()

    def numbers(self):
        return sorted(self._sections)

    def size(self, number):
        return self._sections[number][1]

    def read(self, number, offset, length):
        """The bytes [offset, offset+length) of segment `number`, copied out of the package's mmap."""
        name = section_name(number) if number in self._sections else f"segment {number}"
        if number not in self._sections:
            raise FormatError(f"{self.path!r}: the catalog points into {name}, which the package does not have; run `m3db verify`")
        base, size = self._sections[number]
        if number not in self._checked:
            check_segment_header(self._map, base, size, number, f"{self.path!r} section {name!r}")
            self._checked.add(number)
        if offset < SEG_HEADER_SIZE or length < 0 or offset + length > size:
            raise FormatError(
                f"{self.path!r} section {name!r}: bytes [{offset}, {offset + length}) lie outside the {size}-byte "
                "segment; the package is damaged, run `m3db verify`"
            )
        return self._map[base + offset : base + offset + length]

    def close(self):
        if self._map is not None:
            self._map.close()
            self._file.close()
            self._map = None


class PackageCatalog(Catalog):
    """The catalog extracted from a package: read-only, with an error that says why."""

    def _writable(self):
        raise ReadOnlyError(
            "a package (.m3kb) is read-only; make changes in a database directory and pack it again"
        )


class _NoLock:
    """A package is immutable: opening it takes no lock."""

    def release(self):
        pass


def open_package(db, *, spec=None, config=None, codec=None):
    """Set up `db` (a Database being constructed) as a read-only view of the package at db.path.

    The catalog and index are extracted to the cache entry (once), then the database's own
    open runs over that entry read-only, and its (empty) segment store is replaced by the
    package's segment sections, read in place.
    """
    from .database import _check_config

    config = dict(config or {})
    cache_dir = config.pop("cache_dir", None)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise InvalidInputError(f"config 'cache_dir' must be a path, got {cache_dir!r}")
    if "segment_size" in config or "index_save_every" in config:
        raise InvalidInputError("config 'segment_size' and 'index_save_every' are for writing; a package is read-only")
    db._config = _check_config(config)
    if isinstance(spec, dict):
        spec = MemorySpec.from_dict(spec)
    if spec is not None and not isinstance(spec, MemorySpec):
        raise InvalidInputError(f"spec must be a MemorySpec or a dict, got {type(spec).__name__}")
    path = os.path.abspath(db.path)
    with open(path, "rb") as f:
        frame = Frame(f, db.path)
    try:
        shipped = MemorySpec.from_dict(frame.manifest["spec"])
    except (M3DBError, TypeError, ValueError) as e:
        raise FormatError(f"{db.path}: the manifest's memory spec is invalid ({str(e)[:300]})") from None
    # a spec or model that does not match is refused from the manifest, before anything is extracted
    if spec is not None:
        shipped.require_same(spec, this=f"the package {db.path!r}", that="the given spec")
    db.spec = shipped
    if getattr(db, "_model_arg", None) is not None or getattr(db, "_embedder_arg", None) is not None:
        db._bind_models(db._model_arg, db._embedder_arg)
    # keyed by content, and by the catalog format this m3db materializes it in
    entry = os.path.join(cache_root({"cache_dir": cache_dir}), f"{frame.manifest_sha256}-catalog{CATALOG_VERSION}")
    db.read_only = True
    db._tempdir = None
    db._lock = _NoLock()
    db.manifest = frame.manifest
    db.directory = entry
    segments = PackageSegments(path, frame)
    try:
        if not os.path.isdir(entry):
            _extract(db.path, segments._map, frame, entry)
        db._open(spec, codec)
        db.segments.close()  # the directory's store: empty, an entry has no segments/
        db.segments = segments
        db.catalog.__class__ = PackageCatalog  # the same connection; writes refused with a package's reason
        if db.spec != shipped or len(db.locations) != frame.manifest["counts"]["memories"]:
            raise FormatError(f"the cache entry {entry!r} does not match {db.path!r}; delete the entry and open again")
    except BaseException:
        segments.close()
        for part in ("catalog", "index"):
            if getattr(db, part, None) is not None:
                db.__dict__[part].close()
        raise


def _extract(where, mm, frame, entry):
    """Materialize the catalog and index of a package into `entry`, atomically."""
    root = os.path.dirname(entry)
    os.makedirs(root, exist_ok=True)
    _remove_stale(root)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        off, length, digest = frame.sections["index"]
        h = hashlib.sha256()
        with open(os.path.join(tmp, INDEX_FILE), "wb") as out:
            for piece in section_pieces(mm, off, length, h):
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != digest:
            raise FormatError(f"{where}: section 'index' fails its sha256; the package is damaged, run `m3db verify {where}`")
        ids, seq = _materialize_catalog(where, mm, frame, os.path.join(tmp, CATALOG_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as out:
            json.dump({"seq": seq, "count": len(ids), "bytes": length}, out)
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
                    cat.con.execute("INSERT INTO codecs VALUES (?, ?, ?)", [name, version, params])
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
        cat.con.execute("CHECKPOINT")
    except M3DBError:
        raise
    except Exception as e:  # DuckDB refusing a value (say, a JSON column holding non-JSON)
        raise FormatError(f"{where}: the catalog section cannot be loaded ({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        cat.close()
    if h.hexdigest() != digest:
        raise FormatError(f"{where}: section 'catalog' fails its sha256; the package is damaged, run `m3db verify {where}`")
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
    cat.con.register("_m3db_docs", batch)
    try:
        cat.con.execute(
            "INSERT INTO documents(id, source, title, uri, metadata, created_at) "
            "SELECT id, source, title, uri, metadata::JSON, created_at FROM _m3db_docs"
        )
    finally:
        cat.con.unregister("_m3db_docs")


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


# -- several packages ----------------------------------------------------------------------------


@dataclasses.dataclass(repr=False)
class PackageMatch(Match):
    """A recalled memory and the package it came from (`package`, the name it was attached as)."""

    package: str = ""

    def __repr__(self):
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return f"<Match {self.package}:{self.id} score={self.score:.4f} text={text!r}>"


class PackageMatches(Matches):
    """Matches from several packages, best first; each names its package."""

    @property
    def keys(self):
        return [(m.package, m.id) for m in self]

    def to_list(self):
        return [dict(d, package=m.package) for d, m in zip(super().to_list(), self)]

    def __repr__(self):
        return f"<Matches {len(self)} keys={self.keys}>"


class PackageSet:
    """Packages attached to one connection: recalled together, merged by score.

    `packages` maps each name to its read-only Database. All share one memory spec (`spec`).
    """

    def __init__(self, packages):
        self.packages = dict(packages)
        first = next(iter(self.packages.items()), None)
        self.spec = first[1].spec if first else None

    @property
    def names(self):
        return list(self.packages)

    def recall(self, vector, k=5, where=None, params=None, *, decode=False):
        """The k memories nearest `vector` across every package, best first (PackageMatches).

        Each package is recalled with the same k and filter (see Database.recall), then the
        results are merged by score; ties go to the package attached first, then the lower id.
        """
        found = []
        plans = {}
        for rank, (name, db) in enumerate(self.packages.items()):
            try:
                matches = db.recall(vector, k, where, params, decode=decode)
            except M3DBError as e:
                raise type(e)(f"package {name!r}: {str(e).split('] ', 1)[-1]}") from e
            plans[name] = matches.plan
            for m in matches:
                found.append((-m.score, rank, m.id, PackageMatch(m.id, m.score, m.text, m.metadata, m.document_id, m.memory, name)))
        found.sort(key=lambda t: t[:3])
        return PackageMatches([t[3] for t in found[:k]], {"strategy": "merge", "packages": plans})

    def get(self, package, memory_id):
        """The memory `memory_id` of the package named `package`, decoded."""
        return self._package(package).get(memory_id)

    def sql(self, package, query, params=None):
        """One read-only SQL statement over the catalog of the package named `package`."""
        return self._package(package).sql(query, params)

    def _package(self, name):
        if name not in self.packages:
            raise NotFoundError(f"no package named {name!r} is attached; attached: {', '.join(self.packages)}")
        return self.packages[name]

    def __len__(self):
        return sum(len(db) for db in self.packages.values())

    def close(self):
        for db in self.packages.values():
            if not db._closed:
                db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<m3db.PackageSet {', '.join(f'{n}={len(db)}' for n, db in self.packages.items())}>"


def attach(paths, *, spec=None, config=None, model=None, embedder=None):
    """Open packages read-only together; return a PackageSet.

    paths: a list of package files (each named by its file name without `.m3kb`), or a dict
    {name: path}. spec: the loaded model's MemorySpec; every package must match it, and each
    other: a mismatch is a SpecMismatchError naming both sides. model, embedder: as for
    connect(); each package is checked against them.
    """
    from .database import Database

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(paths, dict):
        named = [(str(n), os.fspath(p)) for n, p in paths.items()]
    elif isinstance(paths, (list, tuple)):
        named = [(os.path.splitext(os.path.basename(os.fspath(p)))[0], os.fspath(p)) for p in paths]
        names = [n for n, _ in named]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise InvalidInputError(f"several packages are named {dups}; pass a dict {{name: path}} to name them apart")
    else:
        raise InvalidInputError(f"attach() takes a list of package paths or a dict {{name: path}}, got {type(paths).__name__}")
    if not named:
        raise InvalidInputError("attach() needs at least one package")
    for name, path in named:
        if not os.path.isfile(path):
            raise NotFoundError(f"no package file at {path!r}")
        if not is_package(path):
            raise InvalidInputError(f"{path!r} is not an m3db package; make one with `m3db pack DB OUT.m3kb`")
    opened = {}
    try:
        for name, path in named:
            opened[name] = Database(path, spec=spec, config=config, model=model, embedder=embedder)
        (first, a), *rest = opened.items()
        for name, b in rest:
            a.spec.require_same(b.spec, this=f"package {first!r}", that=f"package {name!r}")
    except BaseException:
        for db in opened.values():
            with contextlib.suppress(Exception):
                db.close()
        raise
    return PackageSet(opened)

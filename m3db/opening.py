"""Opening a path as a database: a package file (read-only, in place), a database directory (new
or existing), or ":memory:" (a private temporary directory). `open_path` decides which, refuses
what is neither (a typo'd package name must not become a new database), makes a new database's
spec from the model it is bound to, and leaves nothing behind when a creation fails.

The Database facade calls it once per connect(). Imports: the storage, package and knowledge
layers' public names.
"""

import dataclasses
import os
import shutil
import tempfile

from .errors import InvalidInputError, M3DBError, NotFoundError, storage_error
from .knowledge.bundled import bind, bundled
from .knowledge.protocols import spec_fields
from .package.manifest import is_package
from .package.store import Package
from .storage.spec import MemorySpec
from .storage.store import Store, holds_catalog, require_catalog_if_data, require_place_for_new
from .storage.validate import check_config, existing_parent, names_package


@dataclasses.dataclass
class Opened:
    """What opening a path gave: the store, a package's manifest (None for a directory), the
    temporary directory of ":memory:" (removed on close), and the model and embedder when the
    open bound them already (a new database, or a model named at open: a mismatch fails there)."""

    store: Store
    manifest: dict | None = None
    tempdir: str | None = None
    model: object = None
    embedder: object = None


def open_path(
    path, *, spec, read_only, config, codec, model=None, embedder=None, memory_mode=None, precision=None, timeout=0
) -> Opened:
    """Open `path` (already checked by check_path); OS errors become StorageError naming it."""
    try:
        if path != ":memory:" and os.path.isfile(path) and (is_package(path) or names_package(path)):
            return _open_package(path, spec, config, model, embedder, memory_mode, precision)
        if names_package(path) and not os.path.exists(path):
            # a .m3kb name is a package to open, never a database to create: a typo must not make one
            raise NotFoundError(f"no package file at {path!r}; check the path (make one with `m3db pack DB OUT.m3kb`)")
        if names_package(path) and os.path.isdir(path) and not holds_catalog(path):
            raise InvalidInputError(
                f"{path!r} is a folder, and a package (.m3kb) is a file: check the path (`m3db pack DB "
                "OUT.m3kb` makes one); a new database is made under a name without .m3kb"
            )
        return _open_directory(
            path, spec, bool(read_only), config, codec, model, embedder, memory_mode, precision, timeout
        )
    except OSError as e:
        if isinstance(e, M3DBError):
            raise
        raise storage_error(e, f"opening {path!r}") from e


def _open_package(path, spec, config, model, embedder, memory_mode, precision) -> Opened:
    """A packed knowledge base (.m3kb): read-only, segments read in place (package/store.py).
    A spec or model that does not match is refused from the manifest, before anything is
    extracted."""
    package = Package(path)
    if spec is not None:
        package.spec.require_same(spec, this=f"the package {path!r}", that="the given spec")
    opened = Opened(store=None, manifest=package.manifest)
    if model is not None or embedder is not None:
        opened.model, opened.embedder = bind(
            package.spec, model, embedder, memory_mode=memory_mode, precision=precision
        )
    opened.store = package.open_store(config)
    return opened


def _open_directory(path, spec, read_only, config, codec, model, embedder, memory_mode, precision, timeout) -> Opened:
    config = check_config(config)
    opened = Opened(store=None)
    if path == ":memory:":
        if read_only:
            raise InvalidInputError("a ':memory:' database cannot be read_only: it starts empty")
        # segments need files to mmap: a private temporary directory, removed on close
        opened.tempdir = tempfile.mkdtemp(prefix="m3db-memory-")
        directory, created = opened.tempdir, True
    else:
        directory = os.path.abspath(path)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise InvalidInputError(f"{path!r} is a file; an m3db database is a directory")
        parent = existing_parent(directory)
        if not os.path.isdir(parent):
            raise InvalidInputError(
                f"{parent!r} is a file, so {path!r} cannot be a database directory under it; choose another path"
            )
        require_catalog_if_data(directory)  # (Store checks too; here it fails before a model loads)
        if read_only and not holds_catalog(directory):
            raise NotFoundError(f"no m3db database at {path!r}; create it with a writable connect(path)")
        if not holds_catalog(directory):
            require_place_for_new(directory, path)
        created = not os.path.exists(directory)
        os.makedirs(directory, exist_ok=True)
    try:
        if spec is None and not holds_catalog(directory):
            # bound to a model: the spec comes from it (loading the bundled one if none is given)
            bound_model, bound_embedder = model, embedder
            if bound_model is None or bound_embedder is None:
                default_model, default_embedder = bundled(memory_mode, precision)
                bound_model, bound_embedder = bound_model or default_model, bound_embedder or default_embedder
            spec = MemorySpec(**spec_fields(bound_model, bound_embedder, codec))
            opened.model, opened.embedder = bound_model, bound_embedder
        opened.store = Store(directory, spec=spec, read_only=read_only, config=config, lock_timeout=timeout)
        if opened.model is None and (model is not None or embedder is not None or memory_mode is not None):
            # a mismatch fails at open, not later
            opened.model, opened.embedder = bind(
                opened.store.spec, model, embedder, memory_mode=memory_mode, precision=precision
            )
    except BaseException:
        if opened.store is not None:
            opened.store.close(save=False)
        if created:  # a failed creation leaves nothing behind
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return opened

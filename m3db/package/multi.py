"""Several packages at once, below the facade: opening them together (names, refusals, one
memory spec) and recalling from each, merged by score; each match names its package. The
facade's `PackageSet` (m3db/package_set.py) holds what this opens. Imports: errors, search's
result nouns and the manifest; the packages arrive opened (as read-only databases).
"""

import contextlib
import dataclasses
import hashlib
import os

from ..errors import InvalidInputError, M3DBError, NotFoundError, SpecMismatchError
from ..search.results import Match, Matches
from ..storage.validate import check_path
from .manifest import dump_manifest, is_package


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
    def keys(self) -> list[tuple[str, int]]:
        return [(m.package, m.id) for m in self]

    def to_list(self) -> list[dict[str, object]]:
        return [dict(d, package=m.package) for d, m in zip(super().to_list(), self)]

    def __repr__(self):
        return f"<Matches {len(self)} keys={self.keys}>"


def merge_recalls(packages, vector, k, where, params, *, decode=False, margin=None) -> PackageMatches:
    """The k memories nearest `vector` across `packages` ({name: read-only database}), best first.

    Each package is recalled with the same k and filter (see Database.recall), then the
    results are merged by score; ties go to the package attached first, then the lower id.
    """
    found = []
    plans = {}
    read_seconds = 0.0
    for rank, (name, db) in enumerate(packages.items()):
        try:
            matches = db.recall(vector, k, where, params, decode=decode, margin=margin)
        except M3DBError as e:
            raise type(e)(f"package {name!r}: {str(e).split('] ', 1)[-1]}") from e
        plans[name] = matches.plan
        read_seconds += matches.read_seconds
        for m in matches:
            found.append(
                (-m.score, rank, m.id, PackageMatch(m.id, m.score, m.text, m.metadata, m.document_id, m.memory, name))
            )
    found.sort(key=lambda t: t[:3])
    if margin is not None and found:  # each package kept those near its own best; now near the best of all
        found = [t for t in found if -t[0] >= -found[0][0] - margin]
    return PackageMatches([t[3] for t in found[:k]], {"strategy": "merge", "packages": plans}, read_seconds)


def open_packages(paths, open_one) -> dict:
    """{name: opened package} of the packages at `paths` (see m3db.attach), each opened by `open_one(path)`
    (a read-only database; the caller's, since this layer sits below the database). Names must
    differ, every path must be a package, no package may be attached twice (one file under two
    names, or a copy: every match would come twice), and their memory specs must match."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(paths, dict):
        named = [(str(n), _entry_path(p, f"the entry {n!r}")) for n, p in paths.items()]
    elif isinstance(paths, (list, tuple)):
        paths = [_entry_path(p, f"entry {i}") for i, p in enumerate(paths)]
        named = [(os.path.splitext(os.path.basename(p))[0], p) for p in paths]
        names = [n for n, _ in named]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise InvalidInputError(f"several packages are named {dups}; pass a dict {{name: path}} to name them apart")
    else:
        raise InvalidInputError(
            f"attach() takes a list of package paths or a dict {{name: path}}, got {type(paths).__name__}"
        )
    if not named:
        raise InvalidInputError("attach() needs at least one package")
    for name, path in named:
        if not os.path.isfile(path):
            raise NotFoundError(f"no package file at {path!r}")
        if not is_package(path):
            raise InvalidInputError(f"{path!r} is not an m3db package; make one with `m3db pack DB OUT.m3kb`")
    _refuse_same_file(named)
    opened = {}
    try:
        for name, path in named:
            opened[name] = open_one(path)
        _refuse_same_package(opened, dict(named))
        (first, a), *rest = opened.items()
        for name, b in rest:
            _require_same_spec(first, a.spec, name, b.spec)
    except BaseException:
        for db in opened.values():
            with contextlib.suppress(Exception):
                db.close()
        raise
    return opened


def _entry_path(path, where) -> str:
    """One entry's path as text, or an error naming the entry (`where`: its place or its name)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(
            f"attach(): {where} is {path!r} ({type(path).__name__}), not a package path; pass the path of a .m3kb file"
        )
    try:
        return check_path(path)
    except InvalidInputError as e:
        raise InvalidInputError(f"attach(): {where}: {str(e).split('] ', 1)[-1]}") from None


def _refuse_same_file(named) -> None:
    """One file under two names (or two paths to it: a link, `./`) would answer every recall twice."""
    for i, (name_a, path_a) in enumerate(named):
        for name_b, path_b in named[i + 1 :]:
            if os.path.samefile(path_a, path_b):
                raise InvalidInputError(
                    f"packages {name_a!r} ({path_a!r}) and {name_b!r} ({path_b!r}) are the same file; attach it once"
                )


def _refuse_same_package(opened, paths) -> None:
    """A copy of a package (the same manifest hash) would answer every recall twice too."""
    seen = {}
    for name, db in opened.items():
        # a package's manifest is canonical JSON (the frame checks it), so this is its identity
        digest = hashlib.sha256(dump_manifest(db.manifest)).hexdigest()
        if digest in seen:
            other = seen[digest]
            raise InvalidInputError(
                f"packages {other!r} ({paths[other]!r}) and {name!r} ({paths[name]!r}) are copies of one package "
                f"(manifest sha256 {digest[:16]}...); attach it once"
            )
        seen[digest] = name


def _require_same_spec(first, a, name, b) -> None:
    """Packages recalled together must share one memory spec, codec included: the set has one
    `spec` (a server fits its model to it), and attach(spec=...) checks one spec against each.
    A codec alone differing is fixed without re-encoding, so the message says how."""
    diffs = a.differences(b)
    if [k for k, _, _ in diffs] == ["codec"]:
        raise SpecMismatchError(
            f"package {first!r} stores its memories in codec {a.codec!r}, package {name!r} in {b.codec!r}; "
            f"packages attached together must share one codec. Nothing needs re-encoding: recompress the database "
            f"{name!r} was packed from to {a.codec!r} and pack it again (`m3db recompress DB --codec {a.codec}`, "
            f"then `m3db pack DB OUT.m3kb --force`), or {first!r}'s to {b.codec!r}"
        )
    a.require_same(b, this=f"package {first!r}", that=f"package {name!r}")

"""Merging: packages (a sharded build's parts) or databases into one writable database.

`merge(target, sources)` copies every memory of each source, in source order and id order, into
`target` through its public `add_memories`: records keep their codec's bytes (`EncodedArray`),
so nothing is quantized twice, and each of a source's commits becomes one commit of the target.
Merging the parts of a sharded build in order so gives the database a local build of the same
documents makes: the same ids, documents, commits, records and catalog rows.

Resumable: a commit whose documents are all in the target already is skipped, so a merge that was
killed is rerun as it was started. Sources and target must share one memory spec and codec.
Imports: errors, progress, storage; the databases arrive opened (this layer sits below them).
"""

import dataclasses

import numpy as np

from ..errors import FormatError, InvalidInputError
from ..progress import progress_bar
from ..storage.codec import EncodedArray
from ..storage.record import read_payload


@dataclasses.dataclass
class MergeReport:
    """What merge did: memories and commits copied, commits skipped (already in the target)."""

    memories_added: int = 0
    commits_added: int = 0
    commits_skipped: int = 0


def merge(target, sources, *, progress=False) -> MergeReport:
    """Copy every memory of `sources` ({name: opened Database}, in order) into `target` (a
    writable Database). Returns a MergeReport."""
    target.require_writable()
    report = MergeReport()
    for name, src in sources.items():
        _require_compatible(name, src, "the target database", target)
    total = sum(len(src) for src in sources.values())
    with progress_bar(progress, "memories", total=total, desc="merge") as bar:
        for name, src in sources.items():
            for items in _commits(name, src):
                sources_of = {i["document"]["source"] for i in items if i["document"] is not None}
                present = {s for s in sources_of if target.catalog.document_id(s) is not None}
                if present and present == sources_of:
                    report.commits_skipped += 1
                elif present:
                    raise InvalidInputError(
                        f"{name!r}: documents {sorted(present)[:3]} are in the target already but others of their "
                        "commit are not; merge into a new database, or one merged from the same sources"
                    )
                else:
                    with target.transaction():
                        target.add_memories(items)
                    report.commits_added += 1
                    report.memories_added += len(items)
                bar.update(len(items))
    return report


def check_sources(sources) -> None:
    """Refuse sources ({name: opened Database}) that cannot be merged into one database: every
    one must share the first's memory spec and codec (untrained). Run it before the target is
    made, so a mismatch leaves nothing behind."""
    if not sources:
        raise InvalidInputError("nothing to merge: name at least one package or database")
    (first_name, first), *rest = sources.items()
    _require_compatible(first_name, first, None, None)
    for name, src in rest:
        _require_compatible(name, src, repr(first_name), first)


def _require_compatible(name, src, other_name, other):
    """Refuse `src` when its records cannot be copied as they are: a trained codec (pq), or
    (against `other`, when given) another spec or codec."""
    if other is not None:
        src.spec.require_same(other.spec, this=f"{name!r}", that=other_name)
    if src.codec.trained or (
        other is not None and (src.codec.name, src.codec.version) != (other.codec.name, other.codec.version)
    ):
        theirs = f", {other_name} {other.codec.name} v{other.codec.version}" if other is not None else ""
        raise InvalidInputError(
            f"{name!r} stores codec {src.codec.name} v{src.codec.version}{theirs}; merge copies records' bytes, so "
            "they must match and not be trained (pq): recompress the merged database afterwards"
        )


def _commits(name, src):
    """A source's memories in id order, as add_memories items, one list per commit of the source."""
    ids = src.locations.ids
    cols = src.locations.cols
    order = np.argsort(ids, kind="stable")
    group, seq = [], None
    for i in order.tolist():
        mid = int(ids[i])
        seg, off, length, crc = (int(cols[c][i]) for c in ("segment", "offset", "length", "checksum"))
        where = f"{name!r}: memory {mid}"
        d = read_payload(src.segments.read(seg, off, length), where, expect_crc=crc)
        if "seq" not in d or "embedding" not in d:
            raise FormatError(
                f"{where}: its record predates the repair fields (embedding, commit); merge needs them: rebuild it"
            )
        if seq is not None and d["seq"] != seq and group:
            yield group
            group = []
        seq = d["seq"]
        group.append(_item(d))
    if group:
        yield group


def _item(d):
    item = dict(
        embedding=np.frombuffer(d["embedding"], "<f4"),
        text=d["text"],
        metadata=d["metadata"],
        document=d.get("document"),
        ordinal=d["ordinal"],
        token_count=d["token_count"],
        char_start=d["char_start"],
        char_end=d["char_end"],
    )
    if d.get("cold"):
        return dict(item, cold=True)
    shape = tuple(int(n) for n in d["shape"])
    return dict(
        item,
        keys=EncodedArray(d["codec"], d["codec_version"], shape, d["keys"]),
        values=EncodedArray(d["codec"], d["codec_version"], shape, d["values"]),
        positions=np.frombuffer(d["positions"], np.uint8).reshape(shape[:3]),
    )

"""Merging: packages (a sharded build's parts) or databases into one writable database.

`merge(target, sources)` copies every memory of each source, in source order and id order, into
`target` through its public `add_memories`: records keep their codec's bytes (`EncodedArray`),
so nothing is quantized twice, and each of a source's commits becomes one commit of the target.
Merging the parts of a sharded build in order so gives the database a local build of the same
documents makes: the same ids, documents, commits, records and catalog rows.

Resumable, and idempotent: a source's commit is skipped when the target holds it already, so a
merge that was killed is rerun as it was started, and a second run adds nothing. "Holds it" is
read from the target itself, not from a log a killed run might not have written: the target
holds a commit with the same memories (`commit_identity`: each memory's text, embedding,
metadata, document source and place in it; not ids, commit numbers or the codec's bytes), as
many times as the source holds it up to this one. A commit with documents is skipped too when
every one of its documents is in the target already from elsewhere (another source, a build;
not from this source's earlier commits, so a document a source grew over several commits is
copied whole). So two sources that hold an identical commit give the target one copy of it, as
two holding a document of the same source give one; identical memories in commits that differ
are all copied, and a source that holds a commit twice gives the target two.
Sources and target must share one memory spec and codec.
Imports: errors, progress, storage; the databases arrive opened (this layer sits below them).
"""

import collections
import dataclasses
import hashlib
import json

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
    held = _HeldCommits(target)
    with progress_bar(progress, "memories", total=total, desc="merge") as bar:
        for name, src in sources.items():
            seen = collections.Counter()  # this source's commits so far, by identity
            brought = set()  # the documents this source's commits so far are held with in the target
            for items in _commits(name, src):
                identity = commit_identity(items)
                seen[identity] += 1
                key = _text_key(i["text"] for i in items)
                sources_of = {i["document"]["source"] for i in items if i["document"] is not None}
                # documents in the target that came from elsewhere (another source, a local build)
                present = {s for s in sources_of - brought if target.catalog.document_id(s) is not None}
                if held.count(key, identity) >= seen[identity]:
                    report.commits_skipped += 1
                    brought |= sources_of
                elif present and present == sources_of:
                    report.commits_skipped += 1
                elif present:
                    raise InvalidInputError(
                        f"{name!r}: documents {sorted(present)[:3]} are in the target already but others of their "
                        "commit are not; merge into a new database, or one merged from the same sources"
                    )
                else:
                    with target.transaction():
                        target.add_memories(items)
                    held.added(key, identity)
                    brought |= sources_of
                    report.commits_added += 1
                    report.memories_added += len(items)
                bar.update(len(items))
    return report


def commit_identity(items) -> str:
    """What makes a commit the same commit in another database: the multiset of its memories'
    text, embedding, metadata, document source, ordinal and character span (sha256, hex). Not
    ids, commit numbers, document ids, token counts or the codec's bytes: a merge gives the
    copy other ids and commit numbers, and a warm or re-encode of the target changes its records'
    bytes but not what they hold."""
    digests = sorted(_memory_digest(i) for i in items)
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _memory_digest(item) -> bytes:
    document = item["document"]
    fields = [
        item["text"],
        item["metadata"] or {},
        None if document is None else document["source"],
        item["ordinal"],
        item["char_start"],
        item["char_end"],
    ]
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    h.update(np.ascontiguousarray(item["embedding"], "<f4").tobytes())
    return h.digest()


def _text_key(texts) -> str:
    """The cheap key a target commit is found by before its records are read: md5 over its
    memories' texts' md5s, sorted (the SQL in _HeldCommits computes the same in the catalog)."""
    return hashlib.md5("".join(sorted(hashlib.md5(t.encode()).hexdigest() for t in texts)).encode()).hexdigest()


class _HeldCommits:
    """The target's commits by identity, read from the target as it is (a killed merge left no
    log to trust): one catalog query gives each commit's text key; a commit's records are read
    only when a source commit has its key, once."""

    def __init__(self, target):
        self.target = target
        self.by_key = collections.defaultdict(list)  # text key -> [(commit number, first id, last id, count)]
        rows = target.sql(
            "SELECT commit_seq, md5(string_agg(md5(text), '' ORDER BY md5(text))), min(id), max(id), count(*) "
            "FROM memories GROUP BY commit_seq"
        )
        for seq, key, first, last, n in rows:
            self.by_key[key].append((int(seq), int(first), int(last), int(n)))
        self.held = {}  # text key -> Counter of the identities of its commits (read on first use)

    def count(self, key, identity) -> int:
        """How many of the target's commits (text key `key`) have this identity."""
        return self._held(key)[identity]

    def added(self, key, identity) -> None:
        """Count a commit this merge added."""
        self._held(key)[identity] += 1

    def _held(self, key):
        if key not in self.held:
            counter = collections.Counter()
            for seq, first, last, n in self.by_key.pop(key, ()):
                if last - first + 1 == n:  # its ids are a run (as a merge or a build commits them)
                    ids = range(first, last + 1)
                else:
                    ids = np.sort(self.target.catalog.ids_where("commit_seq = ?", [seq])).tolist()
                counter[commit_identity([_item(_read(self.target, "the target", int(mid))) for mid in ids])] += 1
            self.held[key] = counter
        return self.held[key]


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
        location = tuple(int(cols[c][i]) for c in ("segment", "offset", "length", "checksum"))
        d = _read(src, repr(name), mid, location)
        if seq is not None and d["seq"] != seq and group:
            yield group
            group = []
        seq = d["seq"]
        group.append(_item(d))
    if group:
        yield group


def _read(db, name, mid, location=None):
    """The payload of memory `mid`'s record in `db` (named `name` in errors)."""
    seg, off, length, crc = location or db.locations.find(mid)
    where = f"{name}: memory {mid}"
    d = read_payload(db.segments.read(seg, off, length), where, expect_crc=crc)
    if "seq" not in d or "embedding" not in d:
        raise FormatError(
            f"{where}: its record predates the repair fields (embedding, commit); merge needs them: rebuild it"
        )
    return d


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

"""A re-encode's staging directory, and the swap that installs it.

Re-encoding a knowledge base for another model (knowledge/reencode.py) runs the decoder over
every memory's text: hours for a large one, so the work must survive an interruption. The new
records are kept beside the database, in `reencode/` of its directory, until every memory has
one: `plan.json` names the spec and commit they are made from and the spec they are made for,
and each `NNNNNN.batch` file (msgpack: a list of framed records) is written whole (aside,
fsynced, renamed), so a batch is staged or absent. A rerun whose plan matches keeps the batches
done; one that does not (the database changed since, or another target) starts over.

`install` swaps them in as recompress does (maintenance.py): the staged records are appended to
fresh segments and fsynced, then one catalog transaction points every memory at its new record
(and its new embedding, when re-embedded) and switches the spec. A crash before that commit
leaves the old state (the next writable open drops the unreferenced segments; the staging stays
for a rerun), a crash after it the new one (the old segments are dropped on open, and the next
re-encode removes the stale staging). Re-embedding deletes the vector index files first: it is
a cache of the catalog, rebuilt from whichever embeddings the catalog holds on the next open.
Imports: storage modules, errors and progress.
"""

import contextlib
import json
import os
import shutil

import msgpack
import numpy as np

from ..errors import FormatError
from ..progress import progress_bar
from .codec import codec_class
from .durable import fsync_path, replace_file
from .index import INDEX_FILE, STATE_FILE
from .maintenance import rolling_back, take_rewrite
from .record import read_payload
from .writer import payload_crc

STAGING_DIR = "reencode"
PLAN_FILE = "plan.json"
STAGING_VERSION = 1


class Staging:
    """The staged records of one re-encode of `store` into the spec `target`."""

    def __init__(self, store, target):
        self.store = store
        self.directory = store.path(STAGING_DIR)
        self.plan = {
            "version": STAGING_VERSION,
            "from": store.catalog.meta()["spec"],
            "commit_seq": store.commit_seq,
            "to": target.to_json(),
        }

    def _plan_on_disk(self):
        try:
            with open(os.path.join(self.directory, PLAN_FILE), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def exists(self) -> bool:
        return os.path.isdir(self.directory)

    def open(self) -> set[int]:
        """Start staging, or resume it: the ids whose records are staged already. Staging of
        another plan is stale and removed; a batch that does not read back whole is redone."""
        if self._plan_on_disk() != self.plan:
            self.discard()
        os.makedirs(self.directory, exist_ok=True)
        if self._plan_on_disk() is None:
            replace_file(os.path.join(self.directory, PLAN_FILE), json.dumps(self.plan, sort_keys=True))
        done = set()
        for path in self._batch_paths():
            try:
                done.update(int(read_payload(blob, path)["id"]) for blob in _read_batch(path))
            except (FormatError, ValueError, KeyError, TypeError):
                os.remove(path)  # bit rot in a staged batch: its memories are encoded again
        return done

    def _batch_paths(self):
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".batch"))
        return [os.path.join(self.directory, n) for n in names]

    def write(self, blobs) -> None:
        """Stage one batch of records, durably (written aside, fsynced, renamed in)."""
        paths = self._batch_paths()
        number = int(os.path.basename(paths[-1]).split(".")[0]) + 1 if paths else 0
        data = msgpack.packb({"version": STAGING_VERSION, "records": list(blobs)}, use_bin_type=True)
        replace_file(os.path.join(self.directory, f"{number:06d}.batch"), data)

    def records(self):
        """Every staged record (framed bytes), batch by batch."""
        for path in self._batch_paths():
            yield from _read_batch(path)

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _read_batch(path):
    with open(path, "rb") as f:
        data = msgpack.unpackb(f.read(), raw=False)
    if not isinstance(data, dict) or data.get("version") != STAGING_VERSION or not isinstance(data["records"], list):
        raise FormatError(f"{path}: not a staged batch of this m3db")
    return data["records"]


def install(store, staging, target, *, reembedded, progress=False) -> dict:
    """Swap every memory onto its staged record and `target` as the spec, atomically (see the
    module docstring); then remove the old segments and the staging. `reembedded`: the staged
    records carry new embeddings, which replace the catalog's (and the index is rebuilt).
    Returns {"bytes_before", "bytes_after"}. The store must be closed after: its index is the
    old one when re-embedded."""
    segments = store.segments
    old = segments.numbers()
    before = sum(segments.size(n) for n in old)
    mark = segments.mark()
    rows = {k: [] for k in ("id", "segment", "offset", "length", "checksum", "codec", "token_count")}
    embeddings = []
    with rolling_back(store, mark, "reencode()"):
        segments.new_segment()
        with progress_bar(progress, "memories", total=len(store.locations), desc="install") as bar:
            for blob in staging.records():
                payload = read_payload(blob, "a staged record")
                seg, off = segments.append(blob)
                values = (payload["id"], seg, off, len(blob), payload_crc(blob), payload.get("codec", "cold"))
                for key, value in zip(rows, (*values, payload.get("token_count"))):
                    rows[key].append(value)
                if reembedded:
                    embeddings.append(np.frombuffer(payload["embedding"], "<f4").astype(np.float32))
                bar.update(1)
        if not np.array_equal(np.sort(np.asarray(rows["id"], np.int64)), np.sort(store.locations.ids)):
            raise FormatError(
                f"the staged records ({len(rows['id'])}) are not one per memory ({len(store.locations)}); "
                "nothing was changed: run the re-encode again to stage what is missing"
            )
        segments.sync()
        if reembedded:
            # before the commit: either state then opens with no index and rebuilds it from its own
            # catalog's embeddings; a saved index of the old vectors must never outlive them
            for name in (INDEX_FILE, STATE_FILE):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(store.path(name))
            fsync_path(store.directory)
        batch = {
            "id": np.asarray(rows["id"], np.int64),
            "segment": np.asarray(rows["segment"], np.int32),
            "offset": np.asarray(rows["offset"], np.int64),
            "length": np.asarray(rows["length"], np.int32),
            "checksum": np.asarray(rows["checksum"], np.uint64),
            "codec": np.asarray(rows["codec"], dtype=object),
            "token_count": _nullable_ints(rows["token_count"]),
        }
        if reembedded:
            batch["embedding"] = np.empty(len(embeddings), dtype=object)
            for i, e in enumerate(embeddings):
                batch["embedding"][i] = e
        store.catalog.begin()
        if len(batch["id"]):
            store.catalog.rewrite_memories(batch)
        store.catalog.set_meta("spec", target.to_json())
        store.catalog.commit()
    store.locations.move(batch["id"], batch["segment"], batch["offset"], batch["length"], batch["checksum"])
    after = take_rewrite(store, target, codec_class(target.codec)(), old)
    staging.discard()
    return {"bytes_before": before, "bytes_after": after}


def _nullable_ints(values):
    """An int64 column, or an object one keeping None as NULL (records without a token count)."""
    if all(v is not None for v in values):
        return np.asarray(values, np.int64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out

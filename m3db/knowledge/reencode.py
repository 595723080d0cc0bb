"""Re-encoding a knowledge base for another model, memory mode or codec: `m3db.reencode(path)`.

A memory is bound to the model that wrote it, but every record keeps its text, so a knowledge
base is never locked to that model: this rebuilds every memory from its stored text with the new
model and writes it in the new codec. Ids, documents, texts, metadata and character spans are
kept; the spec (fingerprint, memory layers, tokens per head, codec) becomes the new model's. The
embedder may stay (the stored embeddings and the index are kept) or change (every text is
embedded again and the index rebuilt). Cold memories (text only) stay cold: they hold nothing
model-bound, and the new model encodes each on its first read as before.

It is a module function over a path, not a Database verb, because it changes what the database
is bound to: an open Database holds the old model; after the swap one opens it with the new.
Staging and the swap are storage/staging.py's (resumable, atomic at the end). Imports:
errors, progress, storage modules and this package's bundled model; torch only through it.
"""

import os

from ..errors import InvalidInputError, NotFoundError, ReadOnlyError
from ..progress import progress_bar
from ..storage.codec import codec_class
from ..storage.record import REPAIR_FIELDS, encode_record
from ..storage.spec import MemorySpec
from ..storage.staging import Staging, install
from ..storage.store import Store, holds_catalog, require_catalog_if_data
from ..storage.validate import names_package
from .bundled import bundled, check_memory_mode

PQ_HINT = (
    "its codebooks are learned from the memories themselves. Re-encode into int4 (codec='int4', "
    "--codec int4), then train the codec on the new memories: `m3db recompress PATH --codec pq` "
    "(db.train_codec('pq', sample=2000))"
)


def reencode(path, *, model=None, embedder=None, memory_mode=None, codec=None, batch_size=16, progress=True) -> dict:
    """Rebuild every memory of the database at `path` from its stored text for another model,
    memory mode or codec; return a report dict.

    model: the MemoryModel to encode with (default: the bundled one, in `memory_mode`, else in
    the mode the database has). memory_mode: "dense" or "sparse", for the bundled model (a model
    you pass carries its own settings). embedder: a new retrieval embedder of the same dimension
    (default: keep the stored embeddings and index). codec: 'f32', 'f16', 'int8' or 'int4'
    (default: the stored one; the trained 'pq' needs training after: recompress). batch_size:
    memories encoded and staged durably at a time. An interrupted re-encode resumes where it
    stopped when run again with the same arguments; readers see the old state or the new one,
    never a mix. Re-encoding into the spec the database already has does nothing (the report's
    "changed" is empty).
    """
    if memory_mode is not None and model is not None:
        raise InvalidInputError(
            "pass memory_mode= or model=, not both: a model carries its own memory settings "
            "(load your model in the mode you want)"
        )
    directory = check_arguments(path, memory_mode=memory_mode, codec=codec, batch_size=batch_size)
    store = Store(directory)  # writable: it holds the database's lock until the swap is done
    reembedded = False
    try:
        stored = store.spec
        if codec is None and codec_class(stored.codec).trained:
            raise InvalidInputError(
                f"this database is in the trained codec {stored.codec!r}, which a re-encode cannot write: "
                f"pass codec= (--codec) to choose another; {PQ_HINT}"
            )
        if model is None:
            model, _ = bundled(memory_mode or stored)
        target, reembedded = _target_spec(stored, model, embedder, codec or stored.codec)
        staging = Staging(store, target)
        changed = [name for name, _, _ in stored.differences(target)]
        report = {"memories": len(store.locations), "changed": changed, "reembedded": reembedded}
        if not changed:
            staging.discard()  # a stale staging of a finished re-encode, if any
            report["message"] = "the database is already encoded for this model, memory mode and codec: nothing to do"
            return report
        done = staging.open()
        report.update(resumed=len(done), encoded=0, cold=0)
        todo = [i for i in sorted(store.locations.ids.tolist()) if i not in done]
        new_codec = codec_class(target.codec)()
        with progress_bar(progress, "memories", total=len(store.locations), desc="reencode") as bar:
            bar.update(len(done))
            for start in range(0, len(todo), batch_size):
                ids = todo[start : start + batch_size]
                blobs, cold = _records(store, ids, model, embedder if reembedded else None, target, new_codec)
                staging.write(blobs)
                report["encoded"] += len(ids) - cold
                report["cold"] += cold
                bar.update(len(ids))
        report.update(install(store, staging, target, reembedded=reembedded, progress=progress))
    finally:
        # re-embedded: the index in RAM holds the old vectors; never save it over the new catalog
        store.close(save=not reembedded)
    if reembedded:
        Store(directory).close()  # a writable open rebuilds the index from the new embeddings
    return report


def check_arguments(path, *, memory_mode=None, codec=None, batch_size=16) -> str:
    """reencode()'s arguments checked before any model loads; returns the database directory."""
    if memory_mode is not None:
        check_memory_mode(memory_mode)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if codec is not None and codec_class(codec).trained:  # an unknown name: an error listing the known ones
        raise InvalidInputError(f"a re-encode cannot write the trained codec {codec!r} directly: {PQ_HINT}")
    return _database_directory(path)


def _database_directory(path) -> str:
    """The directory of an existing, writable database at `path`, or an error naming the fix."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"path must be a database directory (a string or path-like), got {type(path).__name__}")
    path = os.fspath(path)
    if path == ":memory:":
        raise InvalidInputError("a ':memory:' database lives in one process; re-encode a database directory")
    if os.path.isfile(path):
        raise ReadOnlyError(
            f"{path!r} is a file: a package (.m3kb) is read-only. Re-encode the database directory it was packed "
            "from, then pack it again (`m3db pack`)"
        )
    directory = os.path.abspath(path)
    if os.path.isdir(directory):
        require_catalog_if_data(directory)  # segments without a catalog: repair first, never a new database
    if not holds_catalog(directory):
        what = "package file" if names_package(path) else "m3db database"
        raise NotFoundError(f"no {what} at {path!r}; check the path (build a knowledge base with `m3db build`)")
    return directory


def _target_spec(stored, model, embedder, codec) -> tuple[MemorySpec, bool]:
    """(the spec `model` writes in `codec`, whether the texts must be embedded again): the
    stored embedder's fields unless another `embedder` is given."""
    fields = dict(
        model.memory_spec_fields(),
        embedding_dim=stored.embedding_dim,
        embedder_fingerprint=stored.embedder_fingerprint,
        codec=codec,
    )
    reembedded = embedder is not None and embedder.fingerprint != stored.embedder_fingerprint
    if reembedded:
        if embedder.dim != stored.embedding_dim:
            raise InvalidInputError(
                f"the new embedder gives {embedder.dim}-dim vectors; this database stores {stored.embedding_dim}-dim "
                "ones and re-encoding keeps that dimension. Build a new knowledge base for this embedder "
                "(m3db build)"
            )
        fields["embedder_fingerprint"] = embedder.fingerprint
    return MemorySpec(**fields), reembedded


def _records(store, ids, model, embedder, target, codec) -> tuple[list[bytes], int]:
    """The new records of memories `ids` (framed bytes, in order) and how many stay cold."""
    payloads = [store.read_payload(i) for i in ids]
    texts = [p["text"] for p in payloads]
    warm = [j for j, p in enumerate(payloads) if p.get("cold") is not True]
    for j, p in enumerate(payloads):
        # a text chunked for the old model may not fit the new one's reference; say which
        n = model.count_tokens(p["text"])
        if not 1 <= n <= target.reference_length:
            raise InvalidInputError(
                f"memory {ids[j]}'s text has {n} tokens under the new model, over its reference length "
                f"{target.reference_length}: its chunks do not fit this model. Build a new knowledge base from the "
                "documents for it (m3db build), which chunks them for its tokenizer"
            )
    encoded = dict(zip(warm, model.encode([texts[j] for j in warm]))) if warm else {}
    vectors = embedder.embed(texts) if embedder is not None else None
    blobs = []
    for j, (mid, p) in enumerate(zip(ids, payloads)):
        repair = {key: p[key] for key in REPAIR_FIELDS if key in p}
        if vectors is not None:
            repair["embedding"] = target.check_embedding(vectors[j]).astype("<f4").tobytes()
        if j in encoded:
            e = encoded[j]
            keys, values, positions = target.check_arrays(e["keys"], e["values"], e["positions"])
            codec.check(keys), codec.check(values)
            token_count = int(e["token_count"])
        else:
            keys = values = positions = None
            token_count = model.count_tokens(p["text"])
        blobs.append(
            encode_record(
                mid,
                codec,
                keys,
                values,
                positions,
                p["text"],
                p.get("metadata"),
                p.get("document_id"),
                p.get("ordinal"),
                token_count,
                repair=repair,
            )
        )
    return blobs, len(ids) - len(warm)

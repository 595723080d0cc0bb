"""The two halves of a Ray build that touch memories: a worker's (documents -> encoded memories)
and the writer's (encoded memories -> one commit per batch, as `add_documents` commits them).

A **batch** is `batch_size` consecutive documents of the input, the unit `add_documents` commits.
A worker chunks, embeds and encodes a batch's new documents together, exactly as the local build
does (encoding pads references to the batch's longest, and padding changes float rounding, so
the same batches are what makes the records bit-exact), then encodes keys and values with the
database's codec and sends back the codec's bytes (`EncodedArray`) and the catalog fields. The
writer (`commit_batch`) turns them into one commit through the database's public `add_memories`:
the same checks, ids, documents and commit protocol as a local build.

Batches travel as msgpack (`pack_batch` / `unpack`): documents are plain JSON-like values and
msgpack keeps bytes apart from text, so a non-UTF-8 document is reported, not silently decoded.
Imports: the engine's public modules; torch only inside the worker, through the model.
"""

import dataclasses
import os

import msgpack
import numpy as np

from m3db.errors import DependencyError, InvalidInputError, M3DBError
from m3db.knowledge.chunk import chunk_text
from m3db.knowledge.ingest import check_document
from m3db.storage.codec import EncodedArray, codec_class
from m3db.storage.spec import MemorySpec

# -- the models a worker loads: picklable recipes, run once per worker ---------------------------


@dataclasses.dataclass(frozen=True)
class BundledModels:
    """The bundled SmolLM2 decoder and MiniLM embedder, in `memory_mode` ("dense" or "sparse")."""

    memory_mode: str | None = None

    def __call__(self, spec=None):
        """spec: an existing database's MemorySpec, whose settings the model then takes (as
        connect() binds the bundled model to a database it opens)."""
        from m3db.knowledge.bundled import bundled

        return bundled(self.memory_mode or spec)


@dataclasses.dataclass(frozen=True)
class TransformersModels:
    """Your own Hugging Face model (a folder or a .gguf file at the same `path` on every worker)
    with the bundled embedder; on a worker that Ray gave a GPU, the model runs on it."""

    path: str
    memory_mode: str = "dense"

    def __call__(self, spec=None):
        import ray

        from m3db.bindings.transformers import HFMemoryModel
        from m3db.knowledge.bundled import bundled_embedder

        device = "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"
        if device == "cuda":
            _check_cuda(ray.get_gpu_ids())
        return HFMemoryModel.from_pretrained(self.path, memory_mode=self.memory_mode, device=device), bundled_embedder()


def _check_cuda(gpu_ids):
    """Ray gave this worker GPUs: torch must see them (a CPU build of torch on a GPU node does not)."""
    import socket

    import torch

    if not torch.cuda.is_available():
        raise DependencyError(
            f"Ray gave this worker GPU {gpu_ids} on {socket.gethostname()}, but torch {torch.__version__} there sees "
            "no CUDA GPU (a CPU build of torch, or no driver): install a CUDA build of torch on the GPU nodes, "
            "or build without GPUs (gpus_per_worker=0, --gpus-per-worker 0)"
        )


@dataclasses.dataclass(frozen=True)
class TinyModels:
    """The tiny random decoder of the real architecture and the hashing embedder
    (m3db.testing): a real model with no weights to install, for tests and demos."""

    seed: int = 0

    def __call__(self, spec=None):
        from m3db.model.memory_model import MemoryModel
        from m3db.testing import HashEmbedder

        return MemoryModel.tiny(seed=self.seed), HashEmbedder()


def spec_of(models, codec) -> dict:
    """The memory spec (a dict) a new database built with `models` and `codec` records."""
    from m3db.knowledge.protocols import spec_fields

    codec_class(codec)  # an unknown codec fails here, before a model loads
    model, embedder = models()
    return MemorySpec(**spec_fields(model, embedder, codec)).to_dict()


# -- batches on the wire ------------------------------------------------------------------------


def pack_batch(docs, first) -> bytes:
    """A batch of input documents (`first`: the input position of the first) as msgpack bytes.
    Each is checked as add_documents checks it; one that fails travels as its error message, so
    it is reported in its place and the rest of its batch still commits."""
    out = []
    for i, doc in enumerate(docs):
        try:
            d = check_document(_plain(doc), first + i)
            msgpack.packb(d, use_bin_type=True)  # metadata must be msgpack-able, i.e. JSON-like
        except InvalidInputError as e:
            d = {"error": str(e).split("] ", 1)[-1], "source": _source_of(doc)}
        except (TypeError, ValueError, OverflowError) as e:
            d = {
                "error": f"document #{first + i}: its fields must be JSON-like values (str, int, float, bool, None, "
                f"list, dict): {e}",
                "source": _source_of(doc),
            }
        out.append(d)
    return msgpack.packb({"first": first, "docs": out}, use_bin_type=True)


def _plain(doc):
    """A document from a Ray Dataset row (numpy scalars and arrays) as plain Python values."""
    if isinstance(doc, dict):
        return {k: _plain(v) for k, v in doc.items()}
    if isinstance(doc, np.ndarray):
        return [_plain(v) for v in doc.tolist()]
    if isinstance(doc, np.generic):
        return doc.item()
    if isinstance(doc, (list, tuple)):
        return [_plain(v) for v in doc]
    return doc


def _source_of(doc):
    source = doc.get("source") if isinstance(doc, dict) else None
    return source if isinstance(source, str) else None


def unpack(blob) -> dict:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


# -- the worker ---------------------------------------------------------------------------------


class BatchEncoder:
    """One worker's model, loaded once: turns packed batches into packed results.

    spec: the database's memory spec (a dict); the loaded models must give exactly it (a
    SpecMismatchError names each difference). committed: sources already in the database, whose
    documents are chunked (to be compared) but not encoded, as add_documents skips them.
    threads: torch's intra-op threads, pinned to the local build's so that matmuls round the same.
    """

    def __init__(self, models, spec, *, committed=(), threads=None):
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        from m3db.knowledge.bundled import bind

        self.spec = MemorySpec.from_dict(spec)
        self.model, self.embedder = bind(self.spec, *models(self.spec))
        self.codec = codec_class(self.spec.codec)()
        if self.codec.trained:
            raise InvalidInputError(
                f"the database stores the trained codec {self.spec.codec}, whose codebook a worker does not have; "
                "build into an int4 database and run `m3db recompress` afterwards"
            )
        self.committed = set(committed)
        self.pid = os.getpid()

    def encode_batch(self, blob) -> bytes:
        """A packed batch in, a packed result out: per document its state (error, duplicate,
        empty, known, new), its chunks, and for new documents their memories."""
        batch = unpack(blob)
        results, todo, seen = [], [], {}
        for doc in batch["docs"]:
            r = {"source": doc.get("source")}
            results.append(r)
            if "error" in doc:
                r.update(state="error", error=doc["error"])
                continue
            r.update(doc=doc)
            if doc["source"] in seen:  # as add_documents: a repeat within the batch
                same = seen[doc["source"]] == doc["text"]
                r.update(state="duplicate" if same else "error")
                if not same:
                    r["error"] = _twice(doc["source"])
                continue
            seen[doc["source"]] = doc["text"]
            pieces = chunk_text(doc["text"], self.model.count_tokens, self.spec.reference_length)
            r["chunks"] = [[p.start, p.end, p.text, p.tokens, p.ordinal] for p in pieces]
            if doc["source"] in self.committed:
                r["state"] = "known"  # the writer compares its chunks with the stored ones
            elif not pieces:
                r["state"] = "empty"
            else:
                r["state"] = "new"
                todo.append(r)
        try:
            self._encode(todo)
        except Exception as e:  # noqa: BLE001 (one bad document must not lose its batch)
            if len(todo) == 1:
                todo[0].update(state="error", error=f"document {todo[0]['source']!r}: {type(e).__name__}: {e}")
            else:  # find it: each document alone (the others then differ from a local build by rounding)
                for r in todo:
                    try:
                        self._encode([r])
                    except Exception as e1:  # noqa: BLE001
                        r.update(state="error", error=f"document {r['source']!r}: {type(e1).__name__}: {e1}")
        for r in results:  # the writer needs a new document's fields, not its text again
            doc = r.pop("doc", None)
            if r["state"] == "new":
                r["doc"] = {k: doc[k] for k in ("title", "uri", "metadata")}
        return msgpack.packb({"first": batch["first"], "pid": self.pid, "docs": results}, use_bin_type=True)

    def _encode(self, todo):
        """Embed and encode every chunk of `todo` together, as add_documents does for a batch."""
        texts = [c[2] for r in todo for c in r["chunks"]]
        if not texts:
            return
        vectors = self.embedder.embed(texts)
        encoded = self.model.encode(texts)
        i = 0
        out = []
        for r in todo:
            memories = []
            for start, end, text, _, ordinal in r["chunks"]:
                e = encoded[i]
                keys, values, positions = self.spec.check_arrays(e["keys"], e["values"], e["positions"])
                memories.append(
                    {
                        "text": text,
                        "ordinal": ordinal,
                        "char_start": start,
                        "char_end": end,
                        "token_count": int(e["token_count"]),
                        "embedding": np.asarray(vectors[i], "<f4").tobytes(),
                        "shape": list(keys.shape),
                        "positions": positions.tobytes(),
                        "keys": self.codec.encode(keys, part="keys"),
                        "values": self.codec.encode(values, part="values"),
                    }
                )
                i += 1
            out.append(memories)
        for r, memories in zip(todo, out):  # only once all encoded: a failure leaves none half-done
            r["memories"] = memories


def pack_failure(error) -> bytes:
    """A worker that could not start (its model did not load on its node, the database's codec
    needs a codebook it does not have): the error, packed as a batch's result for the writer,
    which raises it (`raise_failure`)."""
    import socket

    message = error.args[0] if isinstance(error, M3DBError) and error.args else str(error)
    failure = {"type": type(error).__name__, "message": f"a worker on {socket.gethostname()} did not start: {message}"}
    return msgpack.packb({"failure": failure}, use_bin_type=True)


# what a worker's failure is raised as by the writer: its own class when it is one of these
_FAILURE_CLASSES = {
    cls.__name__: cls
    for cls in (FileNotFoundError, PermissionError, OSError, ValueError, ImportError, RuntimeError, MemoryError)
}


def _subclasses(cls) -> list:
    """cls and every class below it, at any depth (TooManyRowsError is a QueryError's)."""
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


_FAILURE_CLASSES.update({cls.__name__: cls for cls in _subclasses(M3DBError)})


def raise_failure(failure) -> None:
    cls = _FAILURE_CLASSES.get(failure["type"], M3DBError)
    raise cls(failure["message"] if cls is not M3DBError else f"{failure['type']}: {failure['message']}")


def _twice(source):
    return (
        f"a document with source {source!r} is already twice in this call with other text. A source names one "
        "document: pass a unique source= for a new document"
    )


# -- the writer ---------------------------------------------------------------------------------


@dataclasses.dataclass
class BuildReport:
    """What a Ray build did: documents added, skipped (already committed, or repeated), empty,
    failed (each in `errors` with its input position, source and the problem), memories written."""

    documents_added: int = 0
    documents_skipped: int = 0
    documents_empty: int = 0
    documents_failed: int = 0
    memories_added: int = 0
    errors: list = dataclasses.field(default_factory=list)

    def merge(self, other: "BuildReport") -> None:
        for f in dataclasses.fields(BuildReport):
            if f.name == "errors":
                self.errors.extend(other.errors)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def commit_batch(db, blob, report, *, first=None) -> int:
    """Commit one encoded batch (a worker's packed result) to `db` in one transaction, as
    add_documents commits a batch; return how many documents it held. first: the input position
    of its first document, for the report (default: the one the batch was packed with)."""
    result = unpack(blob)
    if "failure" in result:
        raise_failure(result["failure"])
    if first is not None:
        result["first"] = first
    spec, codec = db.spec, db.codec
    items, added, seen = [], 0, set()
    for k, r in enumerate(result["docs"]):
        state, source = r["state"], r.get("source")
        if state == "new" and source in seen:
            state = "duplicate"  # (a worker sees only its batch; this is for safety)
        if state == "error":
            report.documents_failed += 1
            report.errors.append({"document": result["first"] + k, "source": source, "error": r["error"]})
            continue
        if state == "duplicate":
            report.documents_skipped += 1
            continue
        existing = db.catalog.document_id(source)
        if existing is not None or state == "known":
            stored = [] if existing is None else [(a, b, t) for _, a, b, t in db.catalog.document_chunks(existing)]
            if stored == [(a, b, t) for a, b, t, *_ in r["chunks"]]:
                report.documents_skipped += 1  # committed before: a rerun resumes past it
                continue
            if existing is not None:
                report.documents_failed += 1
                report.errors.append(
                    {
                        "document": result["first"] + k,
                        "source": source,
                        "error": f"a document with source {source!r} is already in the database with other text. "
                        "A source names one document: pass a unique source for the new document",
                    }
                )
                continue
            raise M3DBError(f"document {source!r} was read as committed but is not; rerun the build")
        if state == "empty":
            report.documents_empty += 1
            continue
        seen.add(source)
        doc = r["doc"]
        document = {"source": source, "title": doc["title"], "uri": doc["uri"], "metadata": doc["metadata"] or None}
        for m in r["memories"]:
            shape = tuple(m["shape"])
            items.append(
                dict(
                    embedding=np.frombuffer(m["embedding"], "<f4"),
                    text=m["text"],
                    document=document,
                    ordinal=m["ordinal"],
                    char_start=m["char_start"],
                    char_end=m["char_end"],
                    metadata=dict(doc["metadata"]),
                    keys=EncodedArray(codec.name, codec.version, shape, m["keys"]),
                    values=EncodedArray(codec.name, codec.version, shape, m["values"]),
                    positions=np.frombuffer(m["positions"], np.uint8).reshape(shape[:3]),
                    token_count=m["token_count"],
                )
            )
        added += 1
    if items:
        if spec.embedding_dim != len(items[0]["embedding"]):
            raise InvalidInputError(
                f"a worker sent {len(items[0]['embedding'])}-dim embeddings; the database's are {spec.embedding_dim}"
            )
        with db.transaction():
            ids = db.add_memories(items)
        report.memories_added += len(ids)
    report.documents_added += added
    return len(result["docs"])

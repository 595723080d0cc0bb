"""Answers: the one road from a question to an answer with its sources.

However a question arrives (Python's `generate`, SQL's generate(), `m3db ask`, the HTTP server,
several attached packages), it goes through an `AnswerPlan`: the generation mode, k and its
bound, the recall filter, the context check, the retriever each 64-token chunk recalls through
(as the paper does) and the sources of what was read live here once. A surface only translates
its protocol (and the server batches and streams; it runs the plan's retriever in its batched
loop). `check_options` is the one check of the sampling options.

The knowledge a plan reads is anything with the two verbs of `Knowledge`: a Database, or a
PackageSet (whose memory ids repeat across packages; the plan hands the decoder ids unique to
one generation). Imports: errors and the catalog's text check; the knowledge and the model
arrive as arguments.
"""

import dataclasses
import math
import numbers
import time
from typing import Protocol

from ..errors import ContextLengthError, InvalidInputError, M3DBError
from ..storage.catalog import check_text

# how an answer uses the knowledge base: read recalled memories, put the same references' text
# in front of the prompt (text RAG), or neither. The one list: SQL, the CLI and the server take
# theirs from here (the decoder's loop names the same three, tests/model/test_knowledge.py checks)
GENERATION_MODES = ("memory", "rag", "none")
# the finish reason of an answer with no text: the model's first token ended its turn. An
# empty answer must say so, not pass as a normal "stop" (docs/knowledge.md lists the causes)
EMPTY = "empty"
TEMPERATURE_MAX = 100.0  # far past where sampling is uniform noise; SQL's generate() had the same bound
SEED_MAX = 2**63 - 1  # torch seeds are 64-bit; SQL's BIGINT holds this range
# the relevance gate: of the k memories a chunk recalls, only those scoring within this much of
# the best (cosine) are read. A distractor costs more than it brings: on held-out facts the dense
# default answered 15.5% at k=5 and 63.1% from the relevant memory alone; with this gate, 60.7%
# at k=5 (bench/heldout.py --gates, docs/quality.md). 0.2 lost 7 points to 0.1; None reads all k
DEFAULT_MARGIN = 0.1
MARGIN_MAX = 2.0  # cosine scores lie in [-1, 1]: a margin of 2 keeps every memory


def generation_mode(memory) -> str:
    """The generation mode generate()'s `memory=` names: True or "memory" reads memories,
    "rag" their text, False or "none" neither (strings in any case)."""
    if isinstance(memory, bool):
        return "memory" if memory else "none"
    if isinstance(memory, str) and memory.lower() in GENERATION_MODES:
        return memory.lower()
    hint = ""
    if isinstance(memory, str) and memory.lower() in ("dense", "sparse"):
        # the other "mode": how a knowledge base's memories are encoded, chosen when it is built
        hint = f"; {memory!r} is a memory mode, chosen when the knowledge base is built (connect(memory_mode=...))"
    raise InvalidInputError(
        f"generate()'s memory must be 'memory', 'rag', 'none', True or False, got {memory!r}{hint}", option="memory"
    )


@dataclasses.dataclass
class Source:
    """A memory an answer used: its id, text, and the document it came from; `package` names
    the package it was read from when several were attached (None otherwise)."""

    id: int
    text: str
    document: str | None
    title: str | None
    package: str | None = None


@dataclasses.dataclass
class Answer:
    """The result of generate(): the text, why it stopped ("stop", "length", or "empty": the
    model ended its turn before any text), which memories each chunk read
    (`chunks`: [(kind, start, end, memory ids)]; over several packages an id is
    (package, id)), and `sources`, every memory used, in order of first use.

    `timings`: where the time went, in milliseconds (docs/knowledge.md): recall (embed the
    question's chunks, search, read and decode the memories: each of the three too), prefill,
    decode, first_token (from the start of decoding) and total (the whole call, checks and
    sources included); recall + prefill + decode is the decoding's whole. Empty from a model
    that does not time its loop."""

    text: str
    finish_reason: str
    mode: str
    chunks: list
    sources: list
    timings: dict = dataclasses.field(default_factory=dict)

    def __str__(self):
        return self.text


class Knowledge(Protocol):
    """What a plan reads: a Database or a PackageSet."""

    def recall(self, query, k=5, where=None, params=None, *, decode=False, margin=None) -> list: ...
    def embed_query(self, text) -> object: ...
    def documents_of(self, matches) -> list: ...


class Retrieved:
    """A recalled memory (a Match with its decoded `memory`) shaped as the decoder's MemoryItem."""

    __slots__ = ("id", "text", "token_count", "positions", "keys", "values")

    def __init__(self, match, item_id=None):
        m = match.memory
        self.id, self.text = match.id if item_id is None else item_id, match.text
        self.token_count = m.token_count if m is not None and m.token_count is not None else 0
        self.positions = None if m is None else m.positions
        self.keys = None if m is None else m.keys
        self.values = None if m is None else m.values


class AnswerPlan:
    """How questions asked alike are answered from `knowledge` by `model`: the checked mode, k
    and filter, built once per question (or once per batch of questions that share them).

    memory: True/"memory", "rag" or False/"none" (`generation_mode`). k: memories per chunk,
    None for the model's (5), at most what the model reads per chunk. where/params: a recall
    filter. margin: the relevance gate (DEFAULT_MARGIN; None reads all k). Refused at once,
    before any decoding, with `option` naming the argument at fault.
    """

    def __init__(
        self, knowledge: Knowledge, model, *, memory=True, k=None, where=None, params=None, margin=DEFAULT_MARGIN
    ):
        self.knowledge, self.model = knowledge, model
        self.mode = generation_mode(memory)
        checked = check_options(k=k, margin=margin)
        k, self.margin = checked["k"], checked["margin"]
        per_chunk = getattr(getattr(model, "settings", None), "memories_per_chunk", None)
        if k is not None and per_chunk is not None and k > per_chunk:
            # the decoder has room for per_chunk memories before each chunk: more would be cut silently
            raise InvalidInputError(
                f"k={k}: this model reads at most {per_chunk} memories per chunk; pass k <= {per_chunk}", option="k"
            )
        if self.mode == "none" and (k is not None or where is not None or params is not None):
            raise InvalidInputError(
                'k, where and params choose memories; with memory="none" (False) none are read', option="memory"
            )
        self.k = k
        self.where, self.params = where, params

    # -- before decoding ---------------------------------------------------------------------

    def room(self) -> int | None:
        """Positions a prompt and its answer may take (the model's context, less the memories'
        positions in memory mode); None for a model that does not say."""
        room = getattr(self.model, "context_room", None)
        return None if room is None else room(self.mode)

    def check_context(self, prompt_lengths, max_tokens) -> None:
        """ContextLengthError unless every prompt (token counts) and max_tokens new tokens fit
        the model's context; max_tokens=None checks room for one token. The model's own check
        (m3db.model.generate.check_context) words it; a model without one checks when it decodes."""
        check = getattr(self.model, "check_context", None)
        if check is None:
            return
        try:
            check(list(prompt_lengths), max_tokens, self.mode)
        except ValueError as e:
            raise ContextLengthError(str(e), option="max_tokens" if max_tokens is not None else "prompt") from e

    # -- decoding ----------------------------------------------------------------------------

    @staticmethod
    def timings(loop_ms, reading, seconds) -> dict:
        """Answer.timings from a decoding loop's `timings_ms()`, the `reading` that recalled for
        it (None in mode "none") and the whole call's `seconds` (a server decoding its own loop
        reports through this, as generate() does)."""
        return answer_timings(loop_ms, reading, seconds)

    def reading(self) -> "Reading | None":
        """A retriever for one generation (None in mode "none"); it keeps what it handed out."""
        return None if self.mode == "none" else Reading(self)

    def generate(
        self, prompt, *, max_tokens=128, temperature=0.0, top_p=1.0, stop_tokens=None, seed=0, raw=False
    ) -> Answer:
        """Answer one prompt: checked, decoded by the model with this plan's retriever, and its
        sources named. See `Database.generate` for the options."""
        if not isinstance(raw, bool):
            raise InvalidInputError(f"raw must be True or False, got {raw!r}", option="raw")
        if isinstance(prompt, str) and not prompt.strip():
            raise InvalidInputError("the prompt is empty", option="prompt")
        for i, message in enumerate(
            [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
        ):
            content = message.get("content") if isinstance(message, dict) else message
            if isinstance(content, str):  # the tokenizer takes only valid Unicode (TypeError otherwise)
                check_text("the prompt" if isinstance(prompt, str) else f"message #{i}'s content", content)
        if isinstance(prompt, str) and not raw:
            # a question typed as a string is a user message: an instruct model handed it as raw
            # completion text ends at once (an empty answer); raw=True keeps plain completion
            prompt = [{"role": "user", "content": prompt}]
        started = time.perf_counter()
        sampling = check_options(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        sampling.pop("k"), sampling.pop("margin")  # the plan's, not the sampler's
        stop_tokens = check_stop_tokens(stop_tokens, self.model)
        reading = self.reading()
        try:
            g = self.model.generate(prompt, retriever=reading, mode=self.mode, stop_tokens=stop_tokens, **sampling)
        except ValueError as e:  # the model's word for bad input (a prompt over its context, ...)
            if isinstance(e, M3DBError):  # already m3db's own word (a recall's QueryError, ...): kept as is
                raise
            if getattr(e, "code", None) == "context_length":  # the model's ContextTooLong (rag's references too)
                raise ContextLengthError(str(e), option="max_tokens") from e
            raise InvalidInputError(str(e)) from e
        ids = [i for c in g.chunks for i in c.memory_ids]
        sources = [] if reading is None else reading.sources(ids)
        chunks = [
            (c.kind, c.start, c.end, [i if reading is None else reading.memory_id(i) for i in c.memory_ids])
            for c in g.chunks
        ]
        finish = EMPTY if g.finish_reason == "stop" and not g.text.strip() else g.finish_reason
        timings = answer_timings(getattr(g, "timings", None), reading, time.perf_counter() - started)
        return Answer(g.text, finish, self.mode, chunks, sources, timings)


def answer_timings(loop_ms, reading, seconds) -> dict:
    """Answer.timings: the decoding loop's milliseconds (model.generate's timings_ms), recall
    split into its parts by the `reading` that ran it, and `seconds`, the whole call."""
    if not loop_ms:
        return {}
    parts = {} if reading is None else {part: round(value * 1000, 3) for part, value in reading.seconds.items()}
    merged = {**loop_ms, **parts}
    order = ("embed", "search", "read", "recall", "prefill", "first_token", "decode")
    out = {name: merged[name] for name in order if name in merged}
    out["total"] = round(seconds * 1000, 3)
    return out


class Reading:
    """One generation's retriever (the decoder's `Retriever`): each call recalls a chunk's
    memories through the plan's knowledge. Every memory handed to the decoder gets an id
    unique within the generation (its own id, or a number where several packages' ids
    repeat); `used` maps it to its Match, so the sources of any rows' memory ids follow."""

    def __init__(self, plan: AnswerPlan):
        self.plan = plan
        self.used: dict = {}
        self.keys: dict = {}  # (package, id) -> the id handed to the decoder, for package sets
        # the parts of recall, in seconds: embedding the query, searching, reading the memories
        self.seconds = {"embed": 0.0, "search": 0.0, "read": 0.0}

    def __call__(self, query_text: str, count: int) -> list[Retrieved]:
        plan = self.plan
        n = count if plan.k is None else min(plan.k, count)
        if n <= 0 or not query_text.strip():
            return []
        started = time.perf_counter()
        vector = plan.knowledge.embed_query(query_text)
        embedded = time.perf_counter()
        # the relevance gate (recall's margin) before the memories are read: a cold memory left
        # out is never encoded
        decode = plan.mode == "memory"
        matches = plan.knowledge.recall(vector, n, plan.where, plan.params, decode=decode, margin=plan.margin)
        spent = time.perf_counter() - embedded
        read = min(getattr(matches, "read_seconds", 0.0), spent)  # Matches says how much was reading
        self.seconds["embed"] += embedded - started
        self.seconds["search"] += spent - read
        self.seconds["read"] += read
        items = []
        for match in matches:
            package = getattr(match, "package", None)
            item_id = match.id if package is None else self.keys.setdefault((package, match.id), len(self.keys))
            self.used.setdefault(item_id, match)
            items.append(Retrieved(match, item_id))
        return items

    def memory_id(self, item_id):
        """The memory behind an id handed to the decoder: its id, or (package, id)."""
        match = self.used.get(item_id)
        package = getattr(match, "package", None)
        return item_id if package is None else (package, match.id)

    def sources(self, item_ids) -> list[Source]:
        """The Sources of the memories behind `item_ids`, each once, in order of first use."""
        matches = [self.used[i] for i in dict.fromkeys(item_ids) if i in self.used]
        names = self.plan.knowledge.documents_of(matches) if matches else []
        return [
            Source(m.id, m.text, document, title, getattr(m, "package", None))
            for m, (document, title) in zip(matches, names)
        ]


def _integer(v) -> bool:
    # numpy integers count; bool, though an int to Python, is a mistake here, never a number
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_options(*, max_tokens=128, k=None, temperature=0.0, top_p=1.0, seed=0, margin=DEFAULT_MARGIN) -> dict:
    """generate()'s sampling options checked, as the model's keyword arguments (floats made
    float, integers int) plus `k`. Both db.generate and SQL's generate() (through it) run this,
    so both refuse the same values with the same words. k's upper bound (the model's memories per
    chunk) is checked by AnswerPlan, which has the model."""
    if not _integer(max_tokens) or max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be a positive integer, got {max_tokens!r}", option="max_tokens")
    if k is not None and (not _integer(k) or k < 1):
        raise InvalidInputError(
            f"generate()'s k must be None (the model's default, 5) or an integer >= 1 (memories per chunk), "
            f"got {k!r}; memory=False reads no memories",
            option="k",
        )
    if not _integer(seed) or not 0 <= seed <= SEED_MAX:
        raise InvalidInputError(f"generate()'s seed must be an integer in [0, {SEED_MAX}], got {seed!r}", option="seed")
    # NaN fails every comparison, so it is refused by name (torch would fail deep in sampling)
    if not _number(temperature) or not math.isfinite(temperature) or not 0 <= temperature <= TEMPERATURE_MAX:
        raise InvalidInputError(
            f"generate()'s temperature must be a number in [0, {TEMPERATURE_MAX:g}] (0: greedy), got {temperature!r}",
            option="temperature",
        )
    if not _number(top_p) or not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidInputError(
            f"generate()'s top_p must be a number in (0, 1] (1: no nucleus cut), got {top_p!r}", option="top_p"
        )
    if margin is not None and (not _number(margin) or not math.isfinite(margin) or not 0 <= margin <= MARGIN_MAX):
        raise InvalidInputError(
            f"generate()'s margin must be None (read all k memories) or a number in [0, {MARGIN_MAX:g}]: memories "
            f"scoring within it of the best are read (default {DEFAULT_MARGIN}), got {margin!r}",
            option="margin",
        )
    return {
        "max_tokens": int(max_tokens),
        "k": None if k is None else int(k),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": int(seed),
        "margin": None if margin is None else float(margin),
    }


def check_generate_options(
    *, memory=True, k=None, max_tokens=128, temperature=0.0, top_p=1.0, seed=0, margin=DEFAULT_MARGIN
) -> dict:
    """generate()'s options checked without a model (SQL runs this, EXPLAIN included): the
    checked sampling options, k and margin, and `memory` as the generation mode it names."""
    return {
        "memory": generation_mode(memory),
        **check_options(max_tokens=max_tokens, k=k, temperature=temperature, top_p=top_p, seed=seed, margin=margin),
    }


def vocab_size(model) -> int | None:
    """How many token ids `model` can produce: its decoder's output width (the bundled
    MemoryModel's and HFMemoryModel's `decoder.cfg.vocab_size`, which may exceed the
    tokenizer's own count), else its tokenizer's `vocab_size`; None when it shows neither."""
    size = getattr(getattr(getattr(model, "decoder", None), "cfg", None), "vocab_size", None)
    if size is None:
        size = getattr(getattr(model, "tokenizer", None), "vocab_size", None)
    return int(size) if _integer(size) else None


def check_stop_tokens(stop_tokens, model) -> tuple | None:
    """None (the model's default stop set), or `stop_tokens` as a tuple of token ids, each
    within the model's vocabulary. Strings are refused by name: a stop set that never matches
    would let every answer run to max_tokens, silently."""
    if stop_tokens is None:
        return None
    default = getattr(model, "default_stop_tokens", None)
    how = (
        "get a text's ids from the model's tokenizer (model.tokenizer.encode(text)); None (the default) stops "
        f"at the model's end-of-turn and end-of-text tokens{'' if default is None else f' {list(default)}'}, "
        "and [] only at max_tokens"
    )
    if isinstance(stop_tokens, (str, bytes)) or (
        isinstance(stop_tokens, (list, tuple)) and any(isinstance(t, (str, bytes)) for t in stop_tokens)
    ):
        raise InvalidInputError(f"stop_tokens are token ids, not strings: got {stop_tokens!r}; {how}")
    if not isinstance(stop_tokens, (list, tuple)) or not all(_integer(t) for t in stop_tokens):
        raise InvalidInputError(f"stop_tokens must be a list of token ids (integers), got {stop_tokens!r}; {how}")
    size = vocab_size(model)
    outside = [int(t) for t in stop_tokens if t < 0 or (size is not None and t >= size)]
    if outside:
        bound = f"[0, {size - 1}]" if size is not None else "0 or more"
        raise InvalidInputError(
            f"stop_tokens {outside} are not token ids of this model (ids are {bound}); "
            "get a text's ids from the model's tokenizer (model.tokenizer.encode(text))"
        )
    return tuple(int(t) for t in stop_tokens)

"""Answers: generation with memory (or text RAG, or none) and the sources it used.

`generate(db, prompt, ...)` is Database.generate: the model decodes, and each 64-token chunk
recalls its memories through the database's public `recall` (decoded), as the paper does.
`check_options` is the one check of generate()'s sampling options: this verb runs it, and so
does SQL's generate(), whose options arrive here through db.generate.
Imports: errors and the catalog's text check; the database and its bound model arrive as arguments.
"""

import dataclasses
import math
import numbers

from ..errors import ClosedError, InvalidInputError, M3DBError
from ..storage.catalog import check_text

MODES = {True: "memory", False: "none", "rag": "rag", "memory": "memory", "none": "none"}  # memory= -> mode
# the finish reason of an answer with no text: the model's first token ended its turn. An
# empty answer must say so, not pass as a normal "stop" (docs/knowledge.md lists the causes)
EMPTY = "empty"
TEMPERATURE_MAX = 100.0  # far past where sampling is uniform noise; SQL's generate() had the same bound
SEED_MAX = 2**63 - 1  # torch seeds are 64-bit; SQL's BIGINT holds this range


@dataclasses.dataclass
class Source:
    """A memory an answer used: its id, text, and the document it came from."""

    id: int
    text: str
    document: str | None
    title: str | None


@dataclasses.dataclass
class Answer:
    """The result of generate(): the text, why it stopped ("stop", "length", or "empty": the
    model ended its turn before any text), which memories each chunk read
    (`chunks`: [(kind, start, end, memory ids)]), and `sources`, every memory used, in order
    of first use."""

    text: str
    finish_reason: str
    mode: str
    chunks: list
    sources: list

    def __str__(self):
        return self.text


class Retrieved:
    """A recalled memory (a Match with its decoded `memory`) shaped as the decoder's MemoryItem."""

    __slots__ = ("id", "text", "token_count", "positions", "keys", "values")

    def __init__(self, match):
        m = match.memory
        self.id, self.text = match.id, match.text
        self.token_count = m.token_count if m is not None and m.token_count is not None else 0
        self.positions = None if m is None else m.positions
        self.keys = None if m is None else m.keys
        self.values = None if m is None else m.values


def generate(
    db,
    prompt,
    *,
    max_tokens=128,
    memory=True,
    k=None,
    where=None,
    params=None,
    temperature=0.0,
    top_p=1.0,
    stop_tokens=None,
    seed=0,
    raw=False,
) -> Answer:
    """Answer `prompt`: a question (a string, sent as the user's message under the model's
    chat template), or chat messages [{"role", "content"}]; raw=True sends a string as
    plain completion text instead.

    memory=True reads explicit memories, recalled per 64-token chunk as the paper does;
    memory="rag" puts the same recalled references' text in front of the prompt;
    memory=False uses no knowledge base. k: memories per chunk (default and most: the model's, 5);
    where/params: a recall filter. Sampling (`check_options` has the ranges): max_tokens >= 1;
    temperature in [0, 100], 0 greedy; top_p in (0, 1], nucleus sampling; seed in [0, 2**63 - 1].
    stop_tokens: token ids, not strings, that end the answer: None (the default) is the model's
    end-of-turn and end-of-text tokens (`model.default_stop_tokens`); [] stops only at
    max_tokens. Returns an Answer with the memories it used.
    """
    if db.closed:  # before any decoding: a closed database would only fail once the answer is made
        raise ClosedError(f"the database {db.path!r} is closed; connect() again to use it")
    mode = MODES.get(memory)
    if mode is None:
        raise InvalidInputError(f"memory must be True, False or 'rag', got {memory!r}")
    if not isinstance(raw, bool):
        raise InvalidInputError(f"raw must be True or False, got {raw!r}")
    if isinstance(prompt, str) and not prompt.strip():
        raise InvalidInputError("the prompt is empty")
    for i, message in enumerate([prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []):
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, str):  # the tokenizer takes only valid Unicode (TypeError otherwise)
            check_text("the prompt" if isinstance(prompt, str) else f"message #{i}'s content", content)
    if isinstance(prompt, str) and not raw:
        # a question typed as a string is a user message: an instruct model handed it as raw
        # completion text ends at once (an empty answer); raw=True keeps plain completion
        prompt = [{"role": "user", "content": prompt}]
    sampling = check_options(max_tokens=max_tokens, k=k, temperature=temperature, top_p=top_p, seed=seed)
    k = sampling.pop("k")
    model, _ = db.models()
    stop_tokens = check_stop_tokens(stop_tokens, model)
    per_chunk = getattr(getattr(model, "settings", None), "memories_per_chunk", None)
    if k is not None and per_chunk is not None and k > per_chunk:
        # the decoder has room for per_chunk memories before each chunk: more would be cut silently
        raise InvalidInputError(
            f"k={k}: this model reads at most {per_chunk} memories per chunk; pass k <= {per_chunk}"
        )
    used = {}

    def retrieve(query_text, count) -> list[Retrieved]:
        n = count if k is None else k
        if n <= 0 or not query_text.strip():
            return []
        matches = db.recall(query_text, k=n, where=where, params=params, decode=(mode == "memory"))
        for m in matches:
            used.setdefault(m.id, m)
        return [Retrieved(m) for m in matches]

    try:
        g = model.generate(
            prompt,
            retriever=None if mode == "none" else retrieve,
            mode=mode,
            stop_tokens=stop_tokens,
            **sampling,
        )
    except ValueError as e:  # the model's word for bad input (a prompt over its context, ...)
        if isinstance(e, M3DBError):  # already m3db's own word (a recall's QueryError, ...): kept as is
            raise
        raise InvalidInputError(str(e)) from e
    chunks = [(c.kind, c.start, c.end, list(c.memory_ids)) for c in g.chunks]
    first_use = [i for i in dict.fromkeys(i for c in chunks for i in c[3]) if i in used]
    # the decoding above ran outside the mutex (it is long, and recall takes the lock itself);
    # this read shares the catalog's one DuckDB connection with other threads' verbs
    with db.mutex:
        if db.closed:  # closed by another thread while the answer was decoded
            raise ClosedError(f"the database {db.path!r} was closed while generate() ran; connect() again")
        docs = db.catalog.document_names([used[i].document_id for i in first_use])
    sources = [Source(i, used[i].text, *docs.get(used[i].document_id, (None, None))) for i in first_use]
    finish = EMPTY if g.finish_reason == "stop" and not g.text.strip() else g.finish_reason
    return Answer(g.text, finish, mode, chunks, sources)


def _integer(v) -> bool:
    # numpy integers count; bool, though an int to Python, is a mistake here, never a number
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_options(*, max_tokens=128, k=None, temperature=0.0, top_p=1.0, seed=0) -> dict:
    """generate()'s sampling options checked, as the model's keyword arguments (floats made
    float, integers int) plus `k`. Both db.generate and SQL's generate() (through it) run this,
    so both refuse the same values with the same words. k's upper bound (the model's memories per
    chunk) is checked by generate(), which has the model."""
    if not _integer(max_tokens) or max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if k is not None and (not _integer(k) or k < 1):
        raise InvalidInputError(
            f"generate()'s k must be None (the model's default, 5) or an integer >= 1 (memories per chunk), "
            f"got {k!r}; memory=False reads no memories"
        )
    if not _integer(seed) or not 0 <= seed <= SEED_MAX:
        raise InvalidInputError(f"generate()'s seed must be an integer in [0, {SEED_MAX}], got {seed!r}")
    # NaN fails every comparison, so it is refused by name (torch would fail deep in sampling)
    if not _number(temperature) or not math.isfinite(temperature) or not 0 <= temperature <= TEMPERATURE_MAX:
        raise InvalidInputError(
            f"generate()'s temperature must be a number in [0, {TEMPERATURE_MAX:g}] (0: greedy), got {temperature!r}"
        )
    if not _number(top_p) or not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidInputError(f"generate()'s top_p must be a number in (0, 1] (1: no nucleus cut), got {top_p!r}")
    return {
        "max_tokens": int(max_tokens),
        "k": None if k is None else int(k),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": int(seed),
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

"""Answers: generation with memory (or text RAG, or none) and the sources it used.

`generate(db, prompt, ...)` is Database.generate: the model decodes, and each 64-token chunk
recalls its memories through the database's public `recall` (decoded), as the paper does.
Imports: errors only; the database and its bound model arrive as arguments.
"""

import dataclasses

from ..errors import InvalidInputError

MODES = {True: "memory", False: "none", "rag": "rag", "memory": "memory", "none": "none"}  # memory= -> mode
# the finish reason of an answer with no text: the model's first token ended its turn. An
# empty answer must say so, not pass as a normal "stop" (docs/knowledge.md lists the causes)
EMPTY = "empty"


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
    memory=False uses no knowledge base. k: memories per chunk (default: the model's, 5);
    where/params: a recall filter. Returns an Answer with the memories it used.
    """
    mode = MODES.get(memory)
    if mode is None:
        raise InvalidInputError(f"memory must be True, False or 'rag', got {memory!r}")
    if not isinstance(raw, bool):
        raise InvalidInputError(f"raw must be True or False, got {raw!r}")
    if isinstance(prompt, str) and not prompt.strip():
        raise InvalidInputError("the prompt is empty")
    if isinstance(prompt, str) and not raw:
        # a question typed as a string is a user message: an instruct model handed it as raw
        # completion text ends at once (an empty answer); raw=True keeps plain completion
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    model, _ = db.models()
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
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_tokens=stop_tokens,
            seed=seed,
        )
    except ValueError as e:  # the model's word for bad input (a prompt over its context, ...)
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(str(e)) from e
    chunks = [(c.kind, c.start, c.end, list(c.memory_ids)) for c in g.chunks]
    first_use = [i for i in dict.fromkeys(i for c in chunks for i in c[3]) if i in used]
    docs = db.catalog.document_names([used[i].document_id for i in first_use])
    sources = [Source(i, used[i].text, *docs.get(used[i].document_id, (None, None))) for i in first_use]
    finish = EMPTY if g.finish_reason == "stop" and not g.text.strip() else g.finish_reason
    return Answer(g.text, finish, mode, chunks, sources)

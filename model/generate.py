"""Generation: the chunked decoding loop with memories, and its two baselines.

Owns the loop of Memory³'s reading side. The prompt is cut into chunks of `chunk_length`
tokens; each chunk retrieves `memories_per_chunk` memories through the `Retriever` callback
and attends to them; the first generated chunk keeps the last prompt chunk's memories, and
after every chunk_length generated tokens the memories are retrieved again with those tokens
as the query. Baselines on the same weights and API: "none" (no memory) and "rag" (the same
retrieved references' text prepended, re-prefilled whenever the memories change).

Works on any object with the parts of `model.memory_model.MemoryModel` (decoder, tokenizer,
settings, sink, prefix ids). Such an object may also have `reader` (the decoder that reads, when
it is not `decoder`: a quantized one, see `model.quantize`), `reader_adapter` (the adapter
the loop applies on top of `reader`: None when the reader has it merged, as the bundled
model's does; default `adapter`), `rotate_keys` (see `memory.place`'s
rotate) and `cache_dtype` / `cache_device` (where the KV cache lives): the transformers binding
(`m3db.bindings.transformers`) runs this same loop over a Hugging Face model that way. Must not
import the engine (`m3db`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .memory import Retriever, context_start, place

MODES = ("memory", "none", "rag")
# a forward of this many tokens or more (a prefill) runs on the fp32 weights when the model reads
# on quantized ones: many tokens at once are compute-bound, where fp32's matmuls beat
# dequantizing int4/int8 blocks (docs/decoder.md: int4 1.7x slower than fp32 at 120 tokens; a
# 47-token question's prefill 1.27x faster on fp32 through the loop), while a step of one token
# is bandwidth-bound, where the quantized weights win
FP32_PREFILL_FROM = 32


class ContextTooLong(ValueError):
    """A prompt (with its references, in rag mode) and max_tokens do not fit the model's context.
    `code` names the case for the engine, which cannot import this class: it answers it as its
    ContextLengthError."""

    code = "context_length"


def context_room(model, mode: str) -> int:
    """Positions a prompt and its answer may take in `mode`: the model's context less the
    positions memories sit on before the prompt (docs/decoder.md), taken in memory mode only."""
    reserved = context_start(model.settings, model.sink_keys.shape[2]) if mode == "memory" else 0
    return model.decoder.cfg.max_seq_len - reserved


def check_context(model, prompt_lengths: Sequence[int], max_tokens: int | None, mode: str) -> None:
    """Raise ContextTooLong unless each prompt and `max_tokens` new tokens fit the context in
    `mode`; max_tokens=None checks room for one token (a caller that chose no max_tokens). The
    one check of the context: the loop runs it, and so does a server before it queues a request."""
    context = model.decoder.cfg.max_seq_len
    room = context_room(model, mode)
    longest = max(prompt_lengths)
    if longest + (max_tokens or 1) <= room:
        return
    asked = f"with max_tokens={max_tokens}" if max_tokens is not None else "with room for even one token"
    memories = f" and {context - room} positions for memories" if context > room else ""
    raise ContextTooLong(
        f"the prompt has {longest} tokens; {asked}{memories} it needs {context - room + longest + (max_tokens or 1)} "
        f"positions, over the model's context of {context} tokens: shorten the prompt or lower max_tokens"
    )


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen and when generation ends.

    temperature 0 is greedy; top_p < 1 samples from the smallest set of tokens whose
    probability reaches top_p (nucleus sampling); stop_tokens end a sequence and are not
    part of its text (None = the model's end-of-turn and end-of-text tokens).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] | None = None
    seed: int = 0


@dataclass(frozen=True)
class ChunkMemories:
    """The memories one chunk attended to: kind "prompt" or "generated", token range
    [start, end) inside the prompt or the generated tokens, and the memory ids, best first."""

    kind: str
    start: int
    end: int
    memory_ids: tuple[int, ...]


@dataclass
class Generation:
    """One finished sequence: text (stop token excluded), token ids, why it ended
    ("stop" or "length"), and the memories each chunk used."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    chunks: list[ChunkMemories] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # the batch's GenerationLoop.timings_ms()


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> torch.Tensor:
    """Next token ids (B,) from logits (B, vocab)."""
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(dim=-1) - sp >= s.top_p  # mass before a token already reaches top_p
        drop[..., 0] = False  # the most likely token always stays
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen)[:, 0]


def content_mask(tokenizer, ids: Sequence[int]) -> list[bool]:
    """Which of `ids` carry what a chat's messages say: in a ChatML prompt (`<|im_start|>role\n
    ... <|im_end|>`, SmolLM2's and Qwen's template), not the markers, not the role names, not a
    system message; every token of text without those markers. What a prompt's chunk recalls
    with is this text: with the template's scaffolding and the default system prompt in it, the
    query's cosine to its own article fell from 0.74 to 0.37 and ranks changed (bench/heldout.py
    recalls with the bare question)."""
    find = getattr(tokenizer, "find", None)
    start_id, end_id = (find("<|im_start|>"), find("<|im_end|>")) if find else (None, None)
    if start_id is None or end_id is None:
        return [True] * len(ids)
    mask, keep, header = [], True, None  # keep: inside a message that counts; header: a role's tokens
    for t in ids:
        if t == start_id:
            header = []
            mask.append(False)
        elif header is not None:
            header.append(t)
            mask.append(False)
            if "\n" in tokenizer.decode([t]):
                keep, header = tokenizer.decode(header).strip() != "system", None
        elif t == end_id:
            keep = False  # until the next message opens
            mask.append(False)
        else:
            mask.append(keep)
    return mask


def chunk_query(tokenizer, ids: Sequence[int], kept: Sequence[bool] | None = None) -> str:
    """The text a chunk of tokens recalls with: the tokens `kept` (default: content_mask of the
    chunk alone), each message's decoded apart and joined by a line break."""
    kept = content_mask(tokenizer, ids) if kept is None else kept
    runs, run = [], []
    for t, k in zip(ids, kept):
        if k:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    return "\n".join(tokenizer.decode(r, skip_special=True) for r in runs + [run] if r)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx (B, T) and valid (B, T), rows aligned on the right so every row ends together."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            idx[b, T - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            valid[b, T - len(r) :] = True
    return idx, valid


def _positions(valid: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """RoPE positions (B, T): start[b] + index among row b's real tokens (padding: clamped)."""
    return (start[:, None] + valid.long().cumsum(dim=1) - 1).clamp(min=0)


class GenerationLoop:
    """State of one batched generation (memory, none or rag)."""

    def __init__(self, model, prompts: list[list[int]], mode: str, retriever: Retriever | None, s: Sampling):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if mode != "none" and retriever is None:
            raise ValueError(f"mode={mode!r} needs a retriever; pass retriever=... or use mode='none'")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt is empty: give at least one token of text")
        self.m, self.mode, self.retriever, self.s = model, mode, retriever, s
        self.cfg, self.set = model.decoder.cfg, model.settings
        # the decoder that reads: a quantized copy where the model has one (model.quantize);
        # memories are always encoded by `model.decoder`
        self.reader = getattr(model, "reader", model.decoder)
        # a bundled model's reader has its adapter merged in (model.quantize); others (the
        # transformers binding) apply theirs on top
        self.adapter = getattr(model, "reader_adapter", model.adapter)
        check_context(model, [len(p) for p in prompts], s.max_tokens, mode)
        self.prompts = prompts
        self.B = len(prompts)
        self.pad = model.tokenizer.pad_id
        self.C, self.k = self.set.chunk_length, self.set.memories_per_chunk
        self.gen: list[list[int]] = [[] for _ in prompts]
        self.chunks: list[list[ChunkMemories]] = [[] for _ in prompts]
        self.current: list[tuple] = [() for _ in prompts]  # memory ids in use, per row
        self.items: list[list] = [[] for _ in prompts]  # the items in use (rag needs their text)
        # seconds spent inside the loop (not while a caller holds a yielded step): retrieving,
        # prefilling, up to the first token, and in all (decoding is the rest)
        self.seconds = {"recall": 0.0, "prefill": 0.0, "first_token": 0.0, "busy": 0.0}
        self.masks: list = [None] * len(prompts)  # per prompt, content_mask, made on first use

    # -- retrieval ---------------------------------------------------------------------------

    def retrieve(self, b: int, ids: Sequence[int], start: int | None = None) -> list:
        """The memories for a chunk of tokens: row b's prompt from `start`, or generated ones
        (start None). A chunk recalls with what its messages say, not its chat scaffolding."""
        if start is None:  # generated tokens: the answer's own text
            text = self.m.tokenizer.decode(ids, skip_special=True)
        else:
            if self.masks[b] is None:
                self.masks[b] = content_mask(self.m.tokenizer, self.prompts[b])
            text = chunk_query(self.m.tokenizer, ids, self.masks[b][start : start + len(ids)])
        if not text.strip() or self.k == 0:
            return []
        started = time.perf_counter()
        try:
            return list(self.retriever(text, self.k))[: self.k]
        finally:
            self.seconds["recall"] += time.perf_counter() - started

    def timings_ms(self) -> dict:
        """Where the loop's time went, in milliseconds: recall (the retriever's calls), prefill
        (less its recalls), decode (every step after, less its recalls), first_token (from the
        start to the first token, all included) and total (recall + prefill + decode). Time a
        caller spends between yielded steps (streaming them out, say) is not counted."""
        sec = self.seconds
        decode = sec["busy"] - sec["prefill"] - sec["recall"]
        ms = {"recall": sec["recall"], "prefill": sec["prefill"], "decode": max(decode, 0.0)}
        ms.update(first_token=sec["first_token"], total=sec["busy"])
        return {name: round(value * 1000, 3) for name, value in ms.items()}

    def _new_cache(self, length: int, memory: bool) -> KVCache:
        layers = self.set.memory_layers if memory else ()
        return KVCache(
            self.B,
            self.cfg.n_layer,
            self.cfg.n_kv_head,
            self.cfg.head_dim,
            length + self.s.max_tokens + 1,
            layers,
            dtype=getattr(self.m, "cache_dtype", torch.float32),
            device=getattr(self.m, "cache_device", None),
        )

    def _set_memory(self, rows: list[list]) -> None:
        keys, values, valid = place(
            rows,
            self.m.sink_keys,
            self.m.sink_values,
            self.set,
            self.cfg.head_dim,
            self.cfg.rope_base,
            rotate=getattr(self.m, "rotate_keys", None),
        )
        self.cache.set_memory(keys, values, valid)

    # -- prefill -----------------------------------------------------------------------------

    def forward_for(self, tokens: int) -> tuple:
        """(decoder, adapter) for a forward of `tokens` tokens: the fp32 weights (and the adapter
        on top) for a prefill of FP32_PREFILL_FROM or more where the model reads on quantized
        ones, else the reader. Both write the same cache."""
        if tokens >= FP32_PREFILL_FROM and self.reader is not self.m.decoder:
            return self.m.decoder, self.m.adapter
        return self.reader, self.adapter

    @torch.no_grad()
    def prefill_memory(self) -> torch.Tensor:
        """Prompt in chunks, each reading its own memories. Chunks are aligned on the right
        end of the (left-padded) batch, so the last prompt chunk, whose memories the first
        generated chunk keeps, is a full chunk."""
        idx, valid = left_pad(self.prompts, self.pad)
        T = idx.shape[1]
        self.cache = self._new_cache(T, memory=True)
        self.npos = torch.full((self.B,), context_start(self.set, self.m.sink_keys.shape[2]), dtype=torch.long)
        pads = [T - len(p) for p in self.prompts]
        bounds = [(max(0, e - self.C), e) for e in range(T, 0, -self.C)][::-1]
        for c0, c1 in bounds:
            rows = []
            for b in range(self.B):
                own = self.prompts[b][max(0, c0 - pads[b]) : max(0, c1 - pads[b])]
                items = self.retrieve(b, own, max(0, c0 - pads[b])) if own else []
                rows.append(items)
                if own:
                    self.record(b, "prompt", max(0, c0 - pads[b]), c1 - pads[b], items)
            self._set_memory(rows)
            v = valid[:, c0:c1]
            decoder, adapter = self.forward_for(c1 - c0)
            logits = decoder(
                idx[:, c0:c1],
                positions=_positions(v, self.npos),
                valid=v,
                cache=self.cache,
                last_only=True,
                adapter=adapter,
            )
            self.npos = self.npos + v.sum(dim=1)
        return logits[:, -1]

    @torch.no_grad()
    def prefill_text(self) -> torch.Tensor:
        """One forward over each row's context: references (rag) + prompt + generated so far."""
        rows = []
        for b in range(self.B):
            refs = []
            for it in self.items[b]:
                refs += self.m.prefix_ids + self.m.tokenizer.encode(it.text + "\n")
            rows.append(refs + self.prompts[b] + self.gen[b])
        need = max(len(r) + self.s.max_tokens - len(g) for r, g in zip(rows, self.gen))
        if need > self.cfg.max_seq_len:
            raise ContextTooLong(
                f"the {len(self.items[0])} references, the prompt and the tokens still to generate "
                f"need {need} positions, "
                f"over the model's context of {self.cfg.max_seq_len} tokens: use fewer references (k), a shorter "
                "prompt or a lower max_tokens"
            )
        idx, valid = left_pad(rows, self.pad)
        self.cache = self._new_cache(idx.shape[1], memory=False)
        start = torch.zeros(self.B, dtype=torch.long)
        decoder, adapter = self.forward_for(idx.shape[1])
        logits = decoder(
            idx,
            positions=_positions(valid, start),
            valid=valid,
            cache=self.cache,
            last_only=True,
            adapter=adapter,
        )
        self.npos = valid.sum(dim=1)
        return logits[:, -1]

    def record(self, b: int, kind: str, start: int, end: int, items: list) -> None:
        self.items[b] = items
        self.current[b] = tuple(int(it.id) for it in items)
        self.chunks[b].append(ChunkMemories(kind, start, end, self.current[b]))

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> Iterator[list[int | None]]:
        """Yields, per step, each row's new token (None where the row has finished)."""
        m, s = self.m, self.s
        stop = set(s.stop_tokens) if s.stop_tokens is not None else set(m.default_stop_tokens)
        g = torch.Generator().manual_seed(s.seed)
        # no `with torch.no_grad()` around this body: a grad-mode context held across a
        # `yield` leaks into the caller and into other interleaved generators (and is undone
        # under them when this one ends); each model call below disables grad itself.
        sec, clock = self.seconds, time.perf_counter
        resumed = clock()
        if self.mode == "memory":
            last = self.prefill_memory()
        else:
            if self.mode == "rag":
                for b in range(self.B):
                    # the references precede the whole prompt; the query is its last chunk
                    prompt, start = self.prompts[b], max(0, len(self.prompts[b]) - self.C)
                    self.record(b, "prompt", 0, len(prompt), self.retrieve(b, prompt[start:], start))
            last = self.prefill_text()
        sec["prefill"] = clock() - resumed - sec["recall"]
        for b in range(self.B):
            if self.mode != "none":
                self.chunks[b].append(ChunkMemories("generated", 0, 0, self.current[b]))
        self.done = [False] * self.B
        self.finish = ["length"] * self.B
        for step in range(s.max_tokens):
            tok = sample(last, s, g)
            out: list[int | None] = []
            for b in range(self.B):
                t = int(tok[b])
                if self.done[b]:
                    out.append(None)
                elif t in stop:
                    self.done[b], self.finish[b] = True, "stop"
                    out.append(None)
                else:
                    self.gen[b].append(t)
                    out.append(t)
            sec["busy"] += clock() - resumed
            if step == 0:
                sec["first_token"] = sec["busy"]
            yield out
            resumed = clock()
            n = step + 1
            if all(self.done) or n == s.max_tokens:
                break
            if self.mode != "none" and n % self.C == 0:
                last = self.refresh(n)
                if last is not None:
                    continue
            last = self.feed(out)

    @torch.no_grad()
    def feed(self, out: list[int | None]) -> torch.Tensor:
        """One decoding step: each active row's last token in, next-token logits (B, vocab) out."""
        feed = torch.tensor([[t if t is not None else self.pad] for t in out])  # (B, 1)
        v = torch.tensor([[t is not None] for t in out])  # (B, 1)
        last = self.reader(
            feed, positions=_positions(v, self.npos), valid=v, cache=self.cache, last_only=True, adapter=self.adapter
        )[:, -1]
        self.npos = self.npos + v[:, 0].long()
        return last

    @torch.no_grad()
    def refresh(self, n: int) -> torch.Tensor | None:
        """Retrieve again with each active row's last chunk_length generated tokens.

        memory: swap the cache's memory slots, then the caller feeds the last token as usual
        (returns None). rag: rebuild every row's text context and prefill it again, which
        already includes the last token (returns its logits)."""
        rows = []
        for b in range(self.B):
            items = self.items[b]
            if not self.done[b]:
                items = self.retrieve(b, self.gen[b][-self.C :])
                self.record(b, "generated", n, n, items)
            rows.append(items)
        if self.mode == "memory":
            self._set_memory(rows)
            return None
        return self.prefill_text()

    def results(self) -> list:
        out = []
        for b in range(self.B):
            chunks, n_gen = self.chunks[b], len(self.gen[b])
            fixed = []
            for i, c in enumerate(chunks):
                if c.kind == "generated":  # end: where the next generated chunk starts, or the end
                    nxt = [d.start for d in chunks[i + 1 :] if d.kind == "generated"]
                    c = ChunkMemories(c.kind, c.start, nxt[0] if nxt else n_gen, c.memory_ids)
                fixed.append(c)
            text = self.m.tokenizer.decode(self.gen[b])
            generation = Generation(text, list(self.gen[b]), len(self.prompts[b]), self.finish[b], fixed)
            generation.timings = self.timings_ms()
            out.append(generation)
        return out


def run(
    model, prompts: list[list[int]], *, mode: str, retriever: Retriever | None, sampling: Sampling
) -> tuple[GenerationLoop, Iterator]:
    """Start a batched generation: returns the loop (for `results()`) and its step iterator."""
    loop = GenerationLoop(model, prompts, mode, retriever, sampling)
    return loop, loop.run()


def stream_text(tokenizer, steps: Iterator[list[int | None]]) -> Iterator[str]:
    """Text pieces of row 0 as its tokens arrive. A piece is held back while it ends in an
    incomplete UTF-8 sequence, so the pieces joined equal the decoded whole."""
    ids: list[int] = []
    sent = 0
    for out in steps:
        if out[0] is None:
            continue
        ids.append(out[0])
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > sent:
            yield text[sent:]
            sent = len(text)
    text = tokenizer.decode(ids)
    if len(text) > sent:
        yield text[sent:]


Prompt = str | Sequence[dict]  # text, or chat messages [{"role", "content"}]
ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """A prompt that is neither text nor a list of chat messages the chat template can take."""


def check_prompt(prompt) -> None:
    """Raise PromptError naming what is wrong with `prompt` and how to write it instead: the chat
    template would otherwise fail deep inside Jinja, or quietly render a malformed conversation."""
    shape = 'a string, or chat messages [{"role": "user", "content": "..."}]'
    if isinstance(prompt, str):
        return
    if isinstance(prompt, (bytes, bytearray)):
        raise PromptError(f"the prompt is bytes; decode it to a string first (prompt.decode('utf-8')): {shape}")
    if isinstance(prompt, dict):
        raise PromptError(f"the prompt is one message, not a list of them: wrap it in a list, [message]: {shape}")
    if not isinstance(prompt, (list, tuple)):
        raise PromptError(f"the prompt must be {shape}, got {type(prompt).__name__}")
    if not prompt:
        raise PromptError(f"the prompt is an empty list of messages: give {shape}")
    for i, m in enumerate(prompt):
        if isinstance(m, (str, list, tuple)):
            raise PromptError(
                f"message {i} is a {type(m).__name__}, not a {{'role', 'content'}} dict; one call answers one "
                "prompt: to answer several questions, call generate once per question"
            )
        if not isinstance(m, dict):
            raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise PromptError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            got = "no content" if "content" not in m else f"content of type {type(m['content']).__name__}"
            raise PromptError(f"message {i} has {got}; its 'content' must be a string")


class ReadingVerbs:
    """generate_many / generate / stream over the generation loop, for any memory model with a
    `tokenizer` (encode, apply_chat_template) and the loop's parts: the bundled MemoryModel and
    the bindings' HFMemoryModel share them."""

    def context_room(self, mode: str) -> int:
        """Positions a prompt and its answer may take in `mode` (see `context_room`)."""
        return context_room(self, mode)

    def check_context(self, prompt_lengths: Sequence[int], max_tokens: int | None, mode: str) -> None:
        """Raise ContextTooLong unless the prompts and max_tokens fit (see `check_context`)."""
        check_context(self, prompt_lengths, max_tokens, mode)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text as is, chat messages through the chat template."""
        check_prompt(prompt)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True))

    def generate_many(
        self, prompts: Sequence[Prompt], *, retriever: Retriever | None = None, mode: str = "memory", **sampling
    ) -> list[Generation]:
        """Generate for a batch of prompts (text, or chat messages [{"role", "content"}]).

        mode: "memory" (read retrieved memories, re-retrieved every chunk_length tokens), "none"
        (no memory) or "rag" (the retrieved references' text prepended). Sampling options:
        max_tokens, temperature, top_p, stop_tokens, seed (see `Sampling`).
        """
        loop, steps = run(
            self, [self.prompt_ids(p) for p in prompts], mode=mode, retriever=retriever, sampling=Sampling(**sampling)
        )
        for _ in steps:
            pass
        return loop.results()

    def generate(
        self, prompt: Prompt, *, retriever: Retriever | None = None, mode: str = "memory", **sampling
    ) -> Generation:
        """Generate for one prompt; see `generate_many`."""
        return self.generate_many([prompt], retriever=retriever, mode=mode, **sampling)[0]

    def stream(
        self, prompt: Prompt, *, retriever: Retriever | None = None, mode: str = "memory", **sampling
    ) -> Iterator[str]:
        """Like `generate`, yielding text pieces as they are produced."""
        _, steps = run(self, [self.prompt_ids(prompt)], mode=mode, retriever=retriever, sampling=Sampling(**sampling))
        yield from stream_text(self.tokenizer, steps)

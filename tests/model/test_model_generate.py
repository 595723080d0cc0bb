"""The generation loop on the tiny random config: stopping, sampling, streaming, chunked
retrieval, re-retrieval every 64 generated tokens, the baselines, batching."""

import pytest

torch = pytest.importorskip("torch")

from m3db.model.memory import EncodedMemory  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402

REFS = [
    "The Zorblax festival is held every March in the town of Quimby.",
    "Quimby lies on the river Flent, two days north of the sea.",
    "The Flent freezes in winter; skaters race on it for a silver cup.",
    "Silver cups in Quimby are made by the guild of Hollis.",
]
SETTINGS = MemorySettings(memory_layers=(1, 2, 3), tokens_per_head=8, memories_per_chunk=2)


@pytest.fixture(scope="module")
def model():
    return MemoryModel.tiny(settings=SETTINGS, seed=11)


@pytest.fixture(scope="module")
def memories(model):
    return {i: EncodedMemory.from_encoded(100 + i, t, e) for i, (t, e) in enumerate(zip(REFS, model.encode(REFS)))}


class Recorder:
    """A retriever over an in-process dict that records its queries; picks memories by a
    stable function of the query so different queries get different memories."""

    def __init__(self, memories):
        self.memories, self.queries = memories, []

    def __call__(self, query, k):
        self.queries.append(query)
        return self.pick(query, k)

    def pick(self, query, k):
        first = sum(query.encode()) % len(self.memories)
        return [self.memories[(first + j) % len(self.memories)] for j in range(k)]


def prompt_of(model, n):
    """A text of exactly n tokens (the tiny tokenizer is byte-level: one token per byte)."""
    text = ("memory reads like this. " * 20)[:n]
    assert len(model.tokenizer.encode(text)) == n
    return text


def test_max_tokens(model, memories):
    g = model.generate("hello", retriever=Recorder(memories), max_tokens=7, stop_tokens=())
    assert len(g.tokens) == 7 and g.finish_reason == "length"
    assert g.text == model.tokenizer.decode(g.tokens)


def test_stop_token_ends_and_is_not_in_text(model, memories):
    free = model.generate("hello", retriever=Recorder(memories), max_tokens=30, stop_tokens=())
    stop = free.tokens[5]
    first = free.tokens.index(stop)
    g = model.generate("hello", retriever=Recorder(memories), max_tokens=30, stop_tokens=(stop,))
    assert g.finish_reason == "stop"
    assert g.tokens == free.tokens[:first]
    assert stop not in g.tokens


def test_streaming_yields_the_same_text(model, memories):
    for kw in ({}, {"temperature": 0.9, "top_p": 0.95, "seed": 3}):
        pieces = list(model.stream("hello there", retriever=Recorder(memories), max_tokens=40, stop_tokens=(), **kw))
        whole = model.generate("hello there", retriever=Recorder(memories), max_tokens=40, stop_tokens=(), **kw)
        assert len(pieces) > 1
        assert "".join(pieces) == whole.text


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model):
    a = model.generate("abc", mode="none", max_tokens=20, temperature=1.0, seed=1, stop_tokens=())
    b = model.generate("abc", mode="none", max_tokens=20, temperature=1.0, seed=1, stop_tokens=())
    c = model.generate("abc", mode="none", max_tokens=20, temperature=1.0, seed=2, stop_tokens=())
    greedy = model.generate("abc", mode="none", max_tokens=20, stop_tokens=())
    nucleus = model.generate("abc", mode="none", max_tokens=20, temperature=1.0, top_p=1e-9, seed=5, stop_tokens=())
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert nucleus.tokens == greedy.tokens


def test_prompt_chunks_each_retrieve_with_their_own_text(model, memories):
    r = Recorder(memories)
    text = prompt_of(model, 150)
    g = model.generate(text, retriever=r, max_tokens=3, stop_tokens=())
    # chunks are aligned on the prompt's end: 22 + 64 + 64 tokens
    ids = model.tokenizer.encode(text)
    assert [(c.start, c.end) for c in g.chunks if c.kind == "prompt"] == [(0, 22), (22, 86), (86, 150)]
    assert r.queries == [model.tokenizer.decode(ids[a:b]) for a, b in [(0, 22), (22, 86), (86, 150)]]
    for c, q in zip(g.chunks, r.queries):
        assert c.memory_ids == tuple(m.id for m in r.pick(q, 2))
    gen = [c for c in g.chunks if c.kind == "generated"]
    assert gen[0].memory_ids == g.chunks[2].memory_ids  # first generated chunk keeps the last prompt chunk's


def test_re_retrieval_after_every_64_generated_tokens(model, memories):
    r = Recorder(memories)
    g = model.generate("the town", retriever=r, max_tokens=150, stop_tokens=())
    assert len(g.tokens) == 150
    assert r.queries[1:] == [model.tokenizer.decode(g.tokens[0:64]), model.tokenizer.decode(g.tokens[64:128])]
    gen = [c for c in g.chunks if c.kind == "generated"]
    assert [(c.start, c.end) for c in gen] == [(0, 64), (64, 128), (128, 150)]
    assert gen[1].memory_ids == tuple(m.id for m in r.pick(r.queries[1], 2))


def test_new_memories_change_only_what_comes_after_the_refresh():
    """Same memories until 64 tokens are generated, then different ones: the first 64 tokens
    are identical, and what follows the switch differs. (Weights with std 0.5, so that a
    random model's attention is peaked enough for a memory to change the sampled tokens.)"""
    model = MemoryModel.tiny(settings=SETTINGS, seed=11, std=0.5)
    memories = {i: EncodedMemory.from_encoded(100 + i, t, e) for i, (t, e) in enumerate(zip(REFS, model.encode(REFS)))}
    calls = []

    def switching(other):
        def retrieve(query, k):
            calls.append(query)
            return [memories[0], memories[1]] if len(calls) == 1 else [memories[other], memories[other]]

        return retrieve

    a = model.generate("the town", retriever=switching(2), max_tokens=90, stop_tokens=(), temperature=1.0, seed=0)
    calls.clear()
    b = model.generate("the town", retriever=switching(3), max_tokens=90, stop_tokens=(), temperature=1.0, seed=0)
    assert a.tokens[:64] == b.tokens[:64]
    assert a.tokens[64:] != b.tokens[64:]


def test_batch_equals_one_by_one(model, memories):
    prompts = [prompt_of(model, 90), "short one", prompt_of(model, 130)]
    for mode in ("memory", "none", "rag"):
        kw = {} if mode == "none" else {"retriever": Recorder(memories)}
        batch = model.generate_many(prompts, mode=mode, max_tokens=70, stop_tokens=(), **kw)
        for p, got in zip(prompts, batch):
            kw1 = {} if mode == "none" else {"retriever": Recorder(memories)}
            alone = model.generate(p, mode=mode, max_tokens=70, stop_tokens=(), **kw1)
            assert got.tokens == alone.tokens, mode
            assert got.chunks == alone.chunks


def test_rag_prepends_reference_text_and_reprefills(model, memories):
    r = Recorder(memories)
    g = model.generate("the town", mode="rag", retriever=r, max_tokens=70, stop_tokens=())
    assert len(r.queries) == 2  # last prompt chunk, then after 64 generated tokens
    first = r.pick(r.queries[0], 2)
    ids = []
    for it in first:
        ids += model.prefix_ids + model.tokenizer.encode(it.text + "\n")
    ids += model.tokenizer.encode("the town")
    # until the refresh, rag is plain generation after the references' text
    plain = model.generate(model.tokenizer.decode(ids), mode="none", max_tokens=64, stop_tokens=())
    assert model.tokenizer.encode(model.tokenizer.decode(ids)) == ids
    assert g.tokens[:64] == plain.tokens
    assert [c.memory_ids for c in g.chunks] == [tuple(m.id for m in first)] * 2 + [
        tuple(m.id for m in r.pick(r.queries[1], 2))
    ]


def test_memory_mode_needs_a_retriever(model):
    with pytest.raises(ValueError, match="needs a retriever"):
        model.generate("x", max_tokens=2)
    with pytest.raises(ValueError, match="is not one of"):
        model.generate("x", mode="bogus", retriever=lambda q, k: [], max_tokens=2)


def test_chat_messages_use_the_template(model):
    msgs = [{"role": "user", "content": "hi"}]
    g = model.generate(msgs, mode="none", max_tokens=3, stop_tokens=())
    assert g.prompt_tokens == len(model.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"))


def test_no_memories_returned_is_fine(model):
    g = model.generate("the town", retriever=lambda q, k: [], max_tokens=5, stop_tokens=())
    assert len(g.tokens) == 5 and all(c.memory_ids == () for c in g.chunks)


def test_interleaved_generations_do_not_disturb_each_other_or_grad_mode(model, memories):
    from m3db.model.generate import Sampling, run

    assert torch.is_grad_enabled()
    s = Sampling(max_tokens=70, stop_tokens=())
    ids = model.tokenizer.encode("the town")
    loops = {
        mode: run(model, [ids], mode=mode, retriever=Recorder(memories), sampling=s)
        for mode in ("memory", "rag", "none")
    }
    live = list(loops)
    while live:
        for mode in list(live):
            try:
                next(loops[mode][1])
            except StopIteration:
                live.remove(mode)
            assert torch.is_grad_enabled()  # nothing leaked into the caller
    for mode, (loop, _) in loops.items():
        alone = model.generate("the town", mode=mode, retriever=Recorder(memories), max_tokens=70, stop_tokens=())
        assert loop.results()[0].tokens == alone.tokens


def test_top_p_keeps_the_smallest_set_reaching_p():
    from m3db.model.generate import Sampling, sample

    logits = torch.log(torch.tensor([[0.2, 0.5, 0.05, 0.25]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    seen = sample(logits, Sampling(temperature=1.0, top_p=0.7), g)
    assert set(seen.tolist()) == {1, 3}  # 0.5 + 0.25 >= 0.7; 0.2 and 0.05 are cut
    frac = (seen == 1).float().mean().item()
    assert abs(frac - 0.5 / 0.75) < 0.05  # renormalized over the kept set
    assert set(sample(logits, Sampling(temperature=1.0, top_p=0.0), g).tolist()) == {1}
    assert set(sample(logits, Sampling(temperature=1.0, top_p=1.0), g).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("mode", ["memory", "rag"])
def test_a_chat_prompt_recalls_with_what_its_messages_say(model, mode):
    """The chunk a chat prompt recalls with is its messages' text: not ChatML's markers and role
    names, not the system prompt (with them, a question's cosine to its own article halved)."""
    asked = []

    def retriever(text, k):
        asked.append(text)
        return []

    chat = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Where is Zorblax?"},
    ]
    model.generate(chat, retriever=retriever, mode=mode, max_tokens=1)
    # (the tiny tokenizer's tokens are bytes: the prompt spans two 64-token chunks, each recalls)
    assert asked and asked[-1].endswith("\nHello!\nWhere is Zorblax?")
    if mode == "memory":
        assert "".join(asked) == "Hi there\nHello!\nWhere is Zorblax?"
    assert not any("system" in a or "one word" in a or "im_start" in a for a in asked)
    asked.clear()
    model.generate("plain text, no template", retriever=retriever, mode=mode, max_tokens=1)
    assert asked == ["plain text, no template"]

"""Teacher-forced answer scoring equals what the generation loop computes for the same tokens."""

import copy
import math

import pytest

torch = pytest.importorskip("torch")

from m3db.model.generate import Sampling, run  # noqa: E402
from m3db.model.memory import EncodedMemory  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.score import answer_logprob, answer_logprobs  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402

REFS = [
    "The Zorblax festival is held every March in the town of Quimby.",
    "Quimby lies on the river Flent, two days north of the sea.",
    "The Flent freezes in winter; skaters race on it for a silver cup.",
    "Silver cups in Quimby are made by the guild of Hollis.",
]
# short chunks, so that a 20-token prompt has 3 chunks and a 20-token answer crosses two
# re-retrievals: every branch of the loop is exercised
SETTINGS = MemorySettings(memory_layers=(1, 2, 3), tokens_per_head=8, memories_per_chunk=2, chunk_length=8)
MODES = ("memory", "none", "rag")


@pytest.fixture(scope="module")
def model():
    return MemoryModel.tiny(settings=SETTINGS, seed=5, std=0.2)  # std 0.2: peaked, varied logits


@pytest.fixture(scope="module")
def retriever(model):
    memories = [EncodedMemory.from_encoded(100 + i, t, e) for i, (t, e) in enumerate(zip(REFS, model.encode(REFS)))]

    def retrieve(query, k):  # a stable function of the query text: chunks get different memories
        first = sum(query.encode()) % len(memories)
        return [memories[(first + j) % len(memories)] for j in range(k)]

    return retrieve


class RecordingDecoder:
    """Wraps a decoder; keeps the last position's logits of every call, as the loop reads them."""

    def __init__(self, decoder):
        self.decoder, self.cfg, self.calls = decoder, decoder.cfg, []

    def __call__(self, *args, **kwargs):
        logits = self.decoder(*args, **kwargs)
        self.calls.append(logits[:, -1].clone())  # (B, vocab)
        return logits


def greedy_with_logprobs(model, prompt, mode, retriever, n):
    """Greedy tokens of the real generation loop, and the sum of its per-step log-softmax."""
    spy = copy.copy(model)
    spy.decoder = spy.reader = RecordingDecoder(model.decoder)  # the loop reads through `reader`
    loop, steps = run(
        spy,
        [model.prompt_ids(prompt)],
        mode=mode,
        retriever=None if mode == "none" else retriever,
        sampling=Sampling(max_tokens=n, stop_tokens=()),
    )
    for _ in steps:
        pass
    tokens = loop.results()[0].tokens
    assert len(tokens) == n
    # every call after the prefill's earlier chunks yields one step's logits (rag's re-prefill
    # included), and the last token is never fed back: the step logits are the last n calls
    step_logits = spy.decoder.calls[-n:]
    total = sum(float(torch.log_softmax(lg, dim=-1)[0, t]) for lg, t in zip(step_logits, tokens))
    return tokens, total


@pytest.mark.parametrize("mode", MODES)
def test_score_equals_generation_loop_on_greedy_tokens(model, retriever, mode):
    prompt = "memory reads like this. the flent"  # 33 bytes: 5 prompt chunks of <= 8 tokens
    tokens, expected = greedy_with_logprobs(model, prompt, mode, retriever, 20)
    per_token = answer_logprobs(model, [prompt], [tokens], retriever=None if mode == "none" else retriever, mode=mode)[
        0
    ]
    assert len(per_token) == 20
    assert sum(per_token) == pytest.approx(expected, abs=1e-4)
    # greedy tokens are each step's most likely token: no log-prob can beat log(1) = 0, and
    # scoring a different answer gives a different number
    assert all(lp <= 0 for lp in per_token)
    other = [(t + 1) % model.tokenizer.vocab_size for t in tokens]
    assert answer_logprob(model, prompt, other, retriever=retriever, mode=mode) < sum(per_token) - 1e-3


def test_memory_changes_the_score(model, retriever):
    prompt, answer = "where is quimby?", " on the river Flent"
    with_memory = answer_logprob(model, prompt, answer, retriever=retriever, mode="memory")
    without = answer_logprob(model, prompt, answer, mode="none")
    rag = answer_logprob(model, prompt, answer, retriever=retriever, mode="rag")
    assert len({round(with_memory, 4), round(without, 4), round(rag, 4)}) == 3


@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_one_by_one(model, retriever, mode):
    prompts = ["where is quimby?", "memory reads like this. the flent", [{"role": "user", "content": "silver cups?"}]]
    answers = [" on the river Flent, two days north of the sea", " freezes", [5, 6, 7]]  # 47, 8, 3 tokens
    r = None if mode == "none" else retriever
    batch = answer_logprobs(model, prompts, answers, retriever=r, mode=mode)
    for p, a, got in zip(prompts, answers, batch):
        alone = answer_logprobs(model, [p], [a], retriever=r, mode=mode)[0]
        assert len(got) == len(alone)
        assert got == pytest.approx(alone, abs=1e-4)


def test_text_answer_is_tokenized_on_its_own(model):
    ids = model.tokenizer.encode(" freezes")
    assert answer_logprob(model, "x", " freezes", mode="none") == answer_logprob(model, "x", ids, mode="none")


def test_misuse_is_refused(model, retriever):
    with pytest.raises(ValueError, match="one answer per prompt"):
        answer_logprobs(model, ["a", "b"], ["x"], mode="none")
    with pytest.raises(ValueError, match="answer is empty"):
        answer_logprob(model, "a", "", mode="none")
    with pytest.raises(ValueError, match="needs a retriever"):
        answer_logprob(model, "a", "x", mode="memory")
    assert math.isfinite(answer_logprob(model, "a", "x", retriever=retriever))

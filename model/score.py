"""Scoring: the log-likelihood of a given answer, read exactly as generation would read it.

Owns teacher-forced scoring for the quality evaluation: `answer_logprobs(model, prompts,
answers, retriever=..., mode=...)` returns, per row, log p(answer token | prompt, earlier answer
tokens, memories) for every answer token. It drives the generation loop's own machinery
(`model.generate.GenerationLoop`: the same chunked prefill, the same retrievals, memory placement, and
re-retrieval after every chunk_length answer tokens, the same RAG re-prefill), only feeding the
given answer tokens instead of sampled ones; tests/model/test_score.py proves its sum equals the
sum of the generation loop's per-step log-softmax on greedy tokens, so the two cannot drift
apart silently. Must not import the engine (`m3db`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .generate import GenerationLoop, Sampling
from .memory import Retriever

Answer = str | Sequence[int]


def _answer_ids(model, answer: Answer) -> list[int]:
    # an answer is tokenized on its own: the assistant turn of the chat template ends in a
    # newline, which the pre-tokenizer never merges with the text after it
    ids = model.tokenizer.encode(answer) if isinstance(answer, str) else [int(t) for t in answer]
    if not ids:
        raise ValueError("an answer is empty: give at least one token to score")
    return ids


def answer_logprobs(
    model, prompts: Sequence, answers: Sequence[Answer], *, retriever: Retriever | None = None, mode: str = "memory"
) -> list[list[float]]:
    """Per row, the log-probability of each answer token (natural log), teacher-forced.

    prompts: text or chat messages, as `MemoryModel.generate` takes them (a chat prompt gets
    the assistant turn's opening, so the answer is scored as the assistant's reply). answers:
    text or token ids. mode: "memory", "none" or "rag", with the same retriever generation
    would use. Rows are batched like `generate_many`, and each row scores as it would alone.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers: give one answer per prompt")
    prompt_ids = [model.prompt_ids(p) for p in prompts]
    answer_ids = [_answer_ids(model, a) for a in answers]
    n_max = max(len(a) for a in answer_ids)
    loop = GenerationLoop(model, prompt_ids, mode, retriever, Sampling(max_tokens=n_max, stop_tokens=()))
    C = loop.C
    # the start of `GenerationLoop.run`: memory prefills chunk by chunk; rag retrieves once with the
    # last prompt chunk and prefills the references' text; none prefills the prompt alone
    if mode == "memory":
        last = loop.prefill_memory()
    else:
        if mode == "rag":
            for b, p in enumerate(prompt_ids):
                loop.record(b, "prompt", 0, len(p), loop.retrieve(b, p[-C:], max(0, len(p) - C)))
        last = loop.prefill_text()
    loop.done = [False] * loop.B
    out: list[list[float]] = [[] for _ in prompt_ids]
    for step in range(n_max):
        logp = torch.log_softmax(last, dim=-1)  # (B, vocab): the distribution `sample` reads
        fed: list[int | None] = []
        for b, ids in enumerate(answer_ids):
            if step < len(ids):
                out[b].append(float(logp[b, ids[step]]))
                loop.gen[b].append(ids[step])
                fed.append(ids[step])
            else:
                # a row past its answer is finished, as a generated row is after its stop
                # token: it feeds nothing and retrieves no more
                loop.done[b] = True
                fed.append(None)
        n = step + 1
        if n == n_max:
            break
        # the rest of `GenerationLoop.run`'s step: re-retrieve after every C tokens, else feed
        if mode != "none" and n % C == 0:
            last = loop.refresh(n)
            if last is not None:
                continue
        last = loop.feed(fed)
    return out


def answer_logprob(model, prompt, answer: Answer, *, retriever: Retriever | None = None, mode: str = "memory") -> float:
    """Total log-probability (natural log) of `answer` as the reply to `prompt`; see
    `answer_logprobs`."""
    return sum(answer_logprobs(model, [prompt], [answer], retriever=retriever, mode=mode)[0])

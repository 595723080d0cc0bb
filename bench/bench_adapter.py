"""Does a reader adapter let the paper's sparse memories answer? Held-out invented facts.

    python bench/bench_adapter.py RUN_DIR/adapter.safetensors [--n 48]

Same weights, same questions, one run: no memory; text RAG (the same 5 references as text);
dense memory (all 30 layers, 32 tokens per head, the training-free default); the paper's
sparse memory (layers 0-14, 8 tokens per head) read by the base weights; the sparse memory the
adapter was trained for (its header's settings), read by the base weights and through it.
Each question is about an invented person (no model can know the answer) from the
evaluation stream that training never sees, and reads its reference among 4 invented
distractors, in random order. Prints, per condition: answer
log-prob (teacher-forced through the generation loop, m3db.model.score), exact match of a
greedy reply (the gold answer among its words), bytes per memory (fp16 arrays, before any
codec), and no-memory perplexity on held-out Wikipedia summaries with and without the adapter.
"""

import argparse
import math
import random
import re
import time
import zlib

import torch
import torch.nn.functional as F

from m3db import sources
from m3db.model.adapter import ReaderAdapter
from m3db.model.memory import EncodedMemory
from m3db.model.memory_model import MemoryModel
from m3db.model.score import answer_logprob
from m3db.model.settings import MemorySettings
from m3db.model.train_data import eval_facts, held_out


def words(text):
    return re.findall(r"\w+", text.casefold())


def contains(reply, gold):
    r, g = words(reply), words(gold)
    return any(r[i : i + len(g)] == g for i in range(len(r) - len(g) + 1))


def evaluate(model, mode, questions):
    logprob = correct = 0.0
    for q in questions:
        rng = random.Random(zlib.crc32(q.prompt.encode()))  # the same order in every condition and run
        refs = list(q.references)
        rng.shuffle(refs)
        mems = (
            [EncodedMemory.from_encoded(i, t, e) for i, (t, e) in enumerate(zip(refs, model.encode(refs)))]
            if mode == "memory"
            else [EncodedMemory(i, t, 0, None, None, None) for i, t in enumerate(refs)]
        )

        def retrieve(query, k, mems=mems):
            return mems[:k]

        lead = q.target[: q.target.rindex(q.answer)].rstrip()
        logprob += answer_logprob(
            model, q.prompt + lead, " " + q.answer, retriever=None if mode == "none" else retrieve, mode=mode
        )
        reply = model.generate(q.prompt, retriever=None if mode == "none" else retrieve, mode=mode, max_tokens=16).text
        correct += contains(reply, q.answer)
    return logprob / len(questions), correct / len(questions)


def bytes_per_memory(model):
    s, cfg = model.settings, model.decoder.cfg
    n = min(s.tokens_per_head, s.reference_length)
    return len(s.memory_layers) * cfg.n_kv_head * n * (2 * cfg.head_dim * 2 + 1)  # K and V fp16, uint8 positions


@torch.no_grad()
def perplexity(model, texts, adapter):
    nll = count = 0
    for text in texts:
        ids = torch.tensor([model.tokenizer.encode(text)[:128]])
        logits = model.decoder(ids, adapter=adapter)[0]
        nll += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("adapter", help="an adapter file (m3db train writes RUN_DIR/adapter.safetensors)")
    p.add_argument("--n", type=int, default=48, help="questions (default 48)")
    p.add_argument("--texts", type=int, default=32, help="held-out summaries for perplexity (default 32)")
    args = p.parse_args()
    t0 = time.time()
    base = MemoryModel.load(adapter=None)
    n_layer = base.decoder.cfg.n_layer
    adapter = ReaderAdapter.load(args.adapter, base.decoder.cfg, base_fingerprint=base.fingerprint)
    paper = MemorySettings.paper(n_layer)
    trained = MemorySettings(
        memory_layers=tuple(adapter.settings["memory_layers"]), tokens_per_head=adapter.settings["tokens_per_head"]
    )
    layers = f"L{trained.memory_layers[0]}-{trained.memory_layers[-1]} {trained.tokens_per_head}/head"
    questions = eval_facts(base.tokenizer, args.n, distractors=4)
    conditions = [
        ("none", base, "none"),
        ("rag (5 references as text)", base, "rag"),
        ("dense: L0-29 32/head", base, "memory"),
        ("paper: L0-14 8/head", base.with_settings(paper, adapter=None), "memory"),
        (f"adapter's settings: {layers}", base.with_settings(trained, adapter=None), "memory"),
        (f"adapter's settings + adapter: {layers}", base.with_settings(trained, adapter=adapter), "memory"),
    ]
    print(
        f"{args.n} held-out invented-fact questions, 5 references each (1 answers); "
        f"adapter {adapter.fingerprint[:19]}..."
        f" trained {adapter.training_info.get('steps', '?')} steps"
    )
    print("| condition | bytes/memory (fp16) | answer logprob | exact match |\n|---|---|---|---|")
    for name, model, mode in conditions:
        lp, em = evaluate(model, mode, questions)
        size = f"{bytes_per_memory(model):,}" if mode == "memory" else "-"
        print(f"| {name} | {size} | {lp:.2f} | {em:.3f} |", flush=True)
    wiki = {d["title"]: d for d in sources.wikipedia()}
    texts = [wiki[t]["text"] for t in sorted(wiki) if held_out(t)][-args.texts :]
    before, after = perplexity(base, texts, None), perplexity(base, texts, adapter)
    print(
        f"\nheld-out summaries, no memory: perplexity {before:.3f} base, {after:.3f} with the adapter "
        f"({100 * (after / before - 1):+.1f}%)"
    )
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

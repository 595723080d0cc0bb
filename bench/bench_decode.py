"""Decoding throughput with memory against the two baselines on the same weights.

128 new tokens after a 128-token prompt, batch 1 and batch 8, three modes:
  none    no memory;
  memory  each 64-token prompt chunk reads its own 5 memories, re-retrieval after every 64
          generated tokens (Memory³'s loop, `MemoryModel` defaults: all layers, 32 tokens/head);
  rag     the same retrieved references' text prepended, re-prefilled when they change.
Throughput = batch x 128 new tokens / wall time of the whole generation (prefill included),
as in the paper's 128-in/128-out measurement.

Memories come from an in-process dict (encoded here with `MemoryModel.encode`, retrieval by a
fixed hash of the query text, no embedder): this measures the decoder, not the engine's
storage or search. The three generations run in lockstep, one step of each in turn (rotating
who goes first), so drift in this shared CPU's speed hits all three alike; each round's
ratios are printed and the median is reported.

    python bench/bench_decode.py --batch-sizes 1 8 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import zlib

import torch

from m3db.model.generate import Sampling, run
from m3db.model.memory import Memory
from m3db.model.memory_model import MemoryModel
from m3db.model.settings import MemorySettings

MODES = ("none", "memory", "rag")
WORDS = (
    "river lake town festival guild silver winter bridge market harbour mill tower archive survey "
    "merchant council charter flood harvest northern southern ancient record village castle road "
    "the a of in and was built by during after before its their"
).split()


def text_of(model: MemoryModel, rng: random.Random, head: str, tokens: int) -> list[int]:
    words = [head]
    while len(model.tokenizer.encode(" ".join(words))) < tokens + 8:
        words.append(rng.choice(WORDS))
    return model.tokenizer.encode(" ".join(words))[:tokens]


def hash_retriever(memories: dict[int, Memory]):
    """k distinct memories chosen by a stable hash of the query text."""
    ids = sorted(memories)

    def retrieve(query: str, k: int):
        h = zlib.crc32(query.encode())
        first = h % len(ids)
        return [memories[ids[(first + 7 * j) % len(ids)]] for j in range(min(k, len(ids)))]

    return retrieve


def lockstep(model, prompts, retriever, max_tokens: int) -> dict[str, float]:
    """Run the three modes one step each in turn; seconds spent in each mode."""
    s = Sampling(max_tokens=max_tokens, stop_tokens=())
    steps = {m: run(model, prompts, mode=m, retriever=None if m == "none" else retriever, sampling=s)[1] for m in MODES}
    spent = dict.fromkeys(MODES, 0.0)
    live, turn = list(MODES), 0
    while live:
        order = live[turn % len(live) :] + live[: turn % len(live)]
        for m in order:
            t = time.perf_counter()
            try:
                next(steps[m])
            except StopIteration:
                live.remove(m)
            spent[m] += time.perf_counter() - t
        turn += 1
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--settings",
        choices=["dense", "paper"],
        default="dense",
        help="dense: all layers, 32/head; paper: first half, 8/head",
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--references", type=int, default=40)
    ap.add_argument("--reference-tokens", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    base = MemoryModel.load()
    settings = MemorySettings() if args.settings == "dense" else MemorySettings.paper(base.decoder.cfg.n_layer)
    model = MemoryModel(base.decoder, base.tokenizer, fingerprint=base.fingerprint, settings=settings)
    refs = [
        model.tokenizer.decode(text_of(model, rng, f"Record {i}:", args.reference_tokens))
        for i in range(args.references)
    ]
    memories = {100 + i: Memory.from_encoded(100 + i, t, e) for i, (t, e) in enumerate(zip(refs, model.encode(refs)))}
    retriever = hash_retriever(memories)
    mem_bytes = sum(m.keys.nbytes + m.values.nbytes + m.positions.nbytes for m in memories.values()) / len(memories)
    print(
        f"settings={args.settings} memory_layers={len(model.settings.memory_layers)} "
        f"tokens_per_head={model.settings.tokens_per_head} "
        f"memories_per_chunk={model.settings.memories_per_chunk} chunk={model.settings.chunk_length} "
        f"({mem_bytes / 1024:.0f} KiB fp32 per memory)"
    )
    print(
        f"torch threads={torch.get_num_threads()}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens; "
        f"{args.references} references of ~{args.reference_tokens} tokens in an in-process dict"
    )
    for bs in args.batch_sizes:
        prompts = [text_of(model, rng, f"Question {b}: tell the story of the", args.prompt_tokens) for b in range(bs)]
        lockstep(model, prompts[:1], retriever, 4)  # warm-up
        rows = []
        for _ in range(args.rounds):
            spent = lockstep(model, prompts, retriever, args.new_tokens)
            tps = {m: bs * args.new_tokens / spent[m] for m in MODES}
            rows.append(tps)
            print(
                f"  batch {bs} round: "
                + ", ".join(f"{m} {tps[m]:.1f} tok/s" for m in MODES)
                + f"; memory/none {tps['memory'] / tps['none']:.3f}, memory/rag {tps['memory'] / tps['rag']:.3f}"
            )
        med = {m: statistics.median(r[m] for r in rows) for m in MODES}
        r_none = statistics.median(r["memory"] / r["none"] for r in rows)
        r_rag = statistics.median(r["memory"] / r["rag"] for r in rows)
        print(
            f"batch {bs}: none {med['none']:.1f} tok/s, memory {med['memory']:.1f} tok/s, rag {med['rag']:.1f} tok/s; "
            f"memory/none {r_none:.3f} (target >= 0.90), memory/rag {r_rag:.3f} (target >= 2.0)"
        )


if __name__ == "__main__":
    main()

"""Memories through transformers: decoding and encoding speed of `m3db.bindings.transformers`.

SmolLM2-135M-Instruct loaded by transformers from the bundled GGUF (fp32 on the CPU, or the
device given), wrapped in `HFMemoryModel` (dense mode: all layers, 32 tokens per head).

Decoding: 128 new tokens (no stop) after a 128-token prompt, greedy, batch 1 and 8. Modes:
  hf      transformers' own `generate` on the same model, no memory (the baseline);
  none    m3db's generation loop over the same model, no memory;
  memory  each 64-token prompt chunk reads its own 5 memories, re-retrieval after every 64
          generated tokens (Memory³'s loop);
  rag     the same retrieved references' text prepended, re-prefilled when they change.
Throughput = batch x new tokens / wall time of the whole generation, prefill included. The
modes run one after another in a rotating order each round (transformers' generate cannot
be stepped in lockstep), so machine drift spreads over all of them; per-round ratios are
printed and their median reported. Targets: memory/hf >= 0.85 at batch 1 and 8.

Encoding: 16 references of 128 tokens (+ prefix). "encode" is `HFMemoryModel.encode` (layers up
to the last memory layer, stopping after its q/k/v; the attention-received score; top-k;
gather; numpy out). "forward" is the model's plain forward (`model.model(ids)`) over the same
token grids: every layer is a memory layer in dense mode. The two alternate batch by batch;
throughput uses each one's fastest time. Target: encode/forward >= 0.9.

Memories come from an in-process dict (retrieval by a fixed hash of the query text): this
measures the model, not the engine's storage or search.

    python bench/bench_hf.py --rounds 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import zlib

import torch

from m3db.bindings.transformers import HFMemoryModel
from m3db.model.gguf_loader import find_bundled_gguf
from m3db.model.memory import EncodedMemory

MODES = ("hf", "none", "memory", "rag")
WORDS = (
    "river lake town festival guild silver winter bridge market harbour mill tower archive survey "
    "merchant council charter flood harvest northern southern ancient record village castle road "
    "the a of in and was built by during after before its their"
).split()


def text_of(model: HFMemoryModel, rng: random.Random, head: str, tokens: int) -> list[int]:
    words = [head]
    while len(model.tokenizer.encode(" ".join(words))) < tokens + 8:
        words.append(rng.choice(WORDS))
    return model.tokenizer.encode(" ".join(words))[:tokens]


def hash_retriever(memories: dict[int, EncodedMemory]):
    """k distinct memories chosen by a stable hash of the query text."""
    ids = sorted(memories)

    def retrieve(query: str, k: int):
        first = zlib.crc32(query.encode()) % len(ids)
        return [memories[ids[(first + 7 * j) % len(ids)]] for j in range(min(k, len(ids)))]

    return retrieve


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_round(model: HFMemoryModel, prompts: list[list[int]], retriever, new: int, order) -> dict[str, float]:
    """Seconds each mode takes for the whole batch, in the given order."""
    ids = torch.tensor(prompts, device=model.cache_device)  # equal lengths: no padding
    hf = model.hf_model
    runs = {
        "hf": lambda: hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_id,
        ),
        **{
            m: (
                lambda m=m: model.generate_many(
                    [model.tokenizer.decode(p) for p in prompts],
                    retriever=None if m == "none" else retriever,
                    mode=m,
                    max_tokens=new,
                    stop_tokens=(),
                )
            )
            for m in ("none", "memory", "rag")
        },
    }
    return {m: timed(runs[m]) for m in order}


def bench_decode(model, rng, retriever, args) -> None:
    for bs in args.batch_sizes:
        prompts = [text_of(model, rng, f"Question {b}: tell the story of the", args.prompt_tokens) for b in range(bs)]
        decode_round(model, prompts[:1], retriever, 4, MODES)  # warm-up
        rows = []
        for r in range(args.rounds):
            order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
            spent = decode_round(model, prompts, retriever, args.new_tokens, order)
            tps = {m: bs * args.new_tokens / spent[m] for m in MODES}
            rows.append(tps)
            print(
                f"  batch {bs} round {r + 1}: "
                + ", ".join(f"{m} {tps[m]:.1f}" for m in MODES)
                + f" tok/s; memory/hf {tps['memory'] / tps['hf']:.3f}, none/hf {tps['none'] / tps['hf']:.3f}, "
                f"memory/rag {tps['memory'] / tps['rag']:.3f}"
            )
        med = {m: statistics.median(r[m] for r in rows) for m in MODES}
        ratio = {k: statistics.median(r[k] / r[d] for r in rows) for k, d in (("memory", "hf"), ("none", "hf"))}
        rag = statistics.median(r["memory"] / r["rag"] for r in rows)
        print(
            f"batch {bs}: " + ", ".join(f"{m} {med[m]:.1f}" for m in MODES) + " tok/s (medians); "
            f"memory/hf {ratio['memory']:.3f} (target >= 0.85), none/hf {ratio['none']:.3f}, memory/rag {rag:.3f}"
        )


def bench_encode(model, rng, args) -> None:
    refs = [model.tokenizer.decode(text_of(model, rng, f"Record {i}:", 128)) for i in range(args.encode_refs)]
    assert all(model.count_tokens(t) <= 128 for t in refs)
    ids = [model.prefix_ids + model.tokenizer.encode(t) for t in refs]
    for bs in args.encode_batch_sizes:
        batches = [refs[i : i + bs] for i in range(0, len(refs), bs)]
        grids = [ids[i : i + bs] for i in range(0, len(ids), bs)]
        width = max(len(x) for x in ids)
        grids = [torch.tensor([x + [model.tokenizer.pad_id] * (width - len(x)) for x in g]) for g in grids]
        best_e, best_f = [float("inf")] * len(batches), [float("inf")] * len(batches)
        per_round = []
        model.encode(batches[0][:1])  # warm-up
        for _ in range(args.rounds):
            te = tf = 0.0
            for j, (texts, grid) in enumerate(zip(batches, grids)):
                e = timed(lambda: model.encode(texts, batch_size=bs))
                with torch.no_grad():
                    f = timed(lambda: model.hf_model.model(grid.to(model.cache_device)))
                best_e[j], best_f[j] = min(best_e[j], e), min(best_f[j], f)
                te, tf = te + e, tf + f
            per_round.append(tf / te)
        n = len(refs)
        enc, fwd = n / sum(best_e), n / sum(best_f)
        print(
            f"encode batch {bs}: encode {enc:.2f} refs/s, forward {fwd:.2f} refs/s, encode/forward {enc / fwd:.3f} "
            f"(target >= 0.9; best times), per round " + ", ".join(f"{x:.3f}" for x in per_round)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a checkpoint folder or .gguf file (default: the bundled SmolLM2 GGUF)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--encode-batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--references", type=int, default=40)
    ap.add_argument("--encode-refs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-encode", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    t = time.perf_counter()
    model = HFMemoryModel.from_pretrained(args.model or find_bundled_gguf(), device=args.device)
    print(f"{model} on {args.device} ({model.cache_dtype}), loaded in {time.perf_counter() - t:.1f} s")
    refs = [model.tokenizer.decode(text_of(model, rng, f"Record {i}:", 120)) for i in range(args.references)]
    memories = {
        100 + i: EncodedMemory.from_encoded(100 + i, t, e) for i, (t, e) in enumerate(zip(refs, model.encode(refs)))
    }
    print(
        f"torch threads={torch.get_num_threads()}; {args.references} references of ~120 tokens in a dict; "
        f"{model.bytes_per_memory(4) / 1024:.0f} KiB fp32 per memory (keys and values)"
    )
    if not args.skip_decode:
        bench_decode(model, rng, hash_retriever(memories), args)
    if not args.skip_encode:
        bench_encode(model, rng, args)


if __name__ == "__main__":
    main()

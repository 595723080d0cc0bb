"""Decoding throughput with memory against the two baselines, at each reading precision.

128 new tokens after a 128-token prompt, batch 1 and batch 8, at each precision (fp32, int8,
int4: `MemoryModel.at_precision`, model/quantize.py), three modes:
  none    no memory;
  memory  each 64-token prompt chunk reads its own 5 memories, re-retrieval after every 64
          generated tokens (Memory³'s loop, `MemoryModel` defaults: all layers, 32 tokens/head);
  rag     the same retrieved references' text prepended, re-prefilled when they change.
Throughput = batch x 128 new tokens / wall time of the whole generation (prefill included),
as in the paper's 128-in/128-out measurement.

Memories come from an in-process dict (encoded here with `MemoryModel.encode`, retrieval by a
fixed hash of the query text, no embedder): this measures the decoder, not the engine's
storage or search. All generations (precisions x modes) run in lockstep, one step of each in
turn (rotating who goes first), so drift in this shared CPU's speed hits all alike; each
round's ratios are printed and the median is reported. Also printed: the machine's read
bandwidth (measured in the same run) and each precision's bound from it (the bytes of weights
one step reads / bandwidth), and llama.cpp on the same GGUF file, the same prompt tokens and
thread count, batch 1, when `llama_cpp` (pip install llama-cpp-python) is installed.

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
from m3db.model.gguf_loader import find_bundled_gguf
from m3db.model.memory import EncodedMemory
from m3db.model.memory_model import MemoryModel
from m3db.model.quantize import PRECISIONS
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


def hash_retriever(memories: dict[int, EncodedMemory]):
    """k distinct memories chosen by a stable hash of the query text."""
    ids = sorted(memories)

    def retrieve(query: str, k: int):
        h = zlib.crc32(query.encode())
        first = h % len(ids)
        return [memories[ids[(first + 7 * j) % len(ids)]] for j in range(min(k, len(ids)))]

    return retrieve


def lockstep(models, prompts, retriever, max_tokens: int) -> dict[tuple[str, str], float]:
    """Run every (precision, mode) one step each in turn; seconds spent in each."""
    s = Sampling(max_tokens=max_tokens, stop_tokens=())
    steps = {
        (p, m): run(model, prompts, mode=m, retriever=None if m == "none" else retriever, sampling=s)[1]
        for p, model in models.items()
        for m in MODES
    }
    spent = dict.fromkeys(steps, 0.0)
    live, turn = list(steps), 0
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


def read_bandwidth() -> float:
    """Bytes per second this machine reads from memory: the best of 5 sums of a 512 MiB array
    (far larger than any cache)."""
    a = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def weight_bytes(reader) -> int:
    """Bytes of weights one decode step reads (every block projection and the output projection;
    a step reads one embedding row, not the table)."""
    total = 0
    for m in reader.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif hasattr(m, "_q"):  # Int8Linear
            total += m._q.numel() + m._scale.numel() * 2
        elif hasattr(m, "_packed"):  # Int4Linear
            total += m._packed.numel() * m._packed.element_size() + m._scales_zeros.numel() * 2
    if reader.head is None:
        total += reader.tok_emb.weight.numel() * 4 if reader.cfg.tie_embeddings else 0
    return total


def llama_cpp_rate(gguf_path, prompt: list[int], new_tokens: int) -> float | None:
    """llama.cpp's tokens/s on the same file, prompt tokens and thread count (prefill included,
    greedy, batch 1), or None when llama_cpp is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = _LLAMA.get(gguf_path)
    if llm is None:
        llm = _LLAMA[gguf_path] = Llama(
            model_path=str(gguf_path), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False
        )
    llm.reset()
    t = time.perf_counter()
    for n, _ in enumerate(llm.generate(prompt, temp=0.0), start=1):
        if n == new_tokens:
            break
    return new_tokens / (time.perf_counter() - t)


_LLAMA: dict = {}


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
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    base = MemoryModel.load()
    settings = MemorySettings() if args.settings == "dense" else MemorySettings.paper(base.decoder.cfg.n_layer)
    model = MemoryModel(base.decoder, base.tokenizer, fingerprint=base.fingerprint, settings=settings)
    models = {p: model.at_precision(p) for p in args.precisions}
    refs = [
        model.tokenizer.decode(text_of(model, rng, f"Record {i}:", args.reference_tokens))
        for i in range(args.references)
    ]
    memories = {
        100 + i: EncodedMemory.from_encoded(100 + i, t, e) for i, (t, e) in enumerate(zip(refs, model.encode(refs)))
    }
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
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (best of 5 sums of 512 MiB)")
    for p, m in models.items():
        b = weight_bytes(m.reader)
        print(f"  {p}: {b / 1e6:.0f} MB of weights per step, bound {b / bandwidth * 1e3:.1f} ms/step")
    gguf_path = find_bundled_gguf()
    for bs in args.batch_sizes:
        prompts = [text_of(model, rng, f"Question {b}: tell the story of the", args.prompt_tokens) for b in range(bs)]
        lockstep(models, prompts[:1], retriever, 4)  # warm-up
        rows, llama = [], []
        for _ in range(args.rounds):
            spent = lockstep(models, prompts, retriever, args.new_tokens)
            tps = {key: bs * args.new_tokens / t for key, t in spent.items()}
            rows.append(tps)
            if bs == 1:  # between rounds: llama.cpp cannot step in lockstep with ours
                rate = llama_cpp_rate(gguf_path, prompts[0], args.new_tokens)
                if rate is not None:
                    llama.append(rate)
            print(
                f"  batch {bs} round: "
                + "; ".join(f"{p} " + ", ".join(f"{m} {tps[p, m]:.1f}" for m in MODES) for p in models)
                + " tok/s"
                + (f"; llama.cpp {llama[-1]:.1f} tok/s" if llama else "")
            )
        ref = args.precisions[0]
        for p in models:
            med = {m: statistics.median(r[p, m] for r in rows) for m in MODES}
            r_none = statistics.median(r[p, "memory"] / r[p, "none"] for r in rows)
            r_rag = statistics.median(r[p, "memory"] / r[p, "rag"] for r in rows)
            gain = statistics.median(r[p, "none"] / r[ref, "none"] for r in rows)
            line = (
                f"batch {bs} {p}: none {med['none']:.1f} tok/s, memory {med['memory']:.1f}, rag {med['rag']:.1f}; "
                f"memory/none {r_none:.3f} (target >= 0.90), memory/rag {r_rag:.3f} (target >= 2.0); "
                f"none vs {ref} {gain:.2f}x"
            )
            if llama:
                line += f"; vs llama.cpp {med['none'] / statistics.median(llama):.2f}x"
            print(line)
        if bs == 1:
            print(
                f"batch 1 llama.cpp: {statistics.median(llama):.1f} tok/s (same GGUF, prompt and threads)"
                if llama
                else "batch 1 llama.cpp: not installed (pip install llama-cpp-python==0.3.36), not measured"
            )


if __name__ == "__main__":
    main()

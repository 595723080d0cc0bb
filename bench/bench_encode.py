"""Memory encoding throughput against a plain forward pass over the memory layers.

Encodes N references of exactly `--tokens` tokens (after the reference prefix) with
`MemoryModel.encode` (forward through the memory layers, stopping after the last one's q/k/v,
attention-received scores, top-k, gather, numpy out), and times a plain forward over the same
blocks (0..last memory layer, full blocks, no scoring) on the same padded batches. This shared
CPU's speed drifts by tens of percent within a minute (other tenants' memory traffic), so the
two are interleaved batch by batch (alternating which goes first) for several rounds, and
each batch's time is the minimum over rounds (the least disturbed run); per-round ratios are
printed too.

    python bench/bench_encode.py --batch-sizes 1 16 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from m3db.model.decoder import attention_mask, rope_cos_sin
from m3db.model.memory_model import MemoryModel
from m3db.model.settings import MemorySettings

WORDS = (
    "river lake town festival guild silver winter bridge market harbour mill tower archive survey "
    "merchant council charter flood harvest northern southern ancient record village castle road"
).split()


def references(model: MemoryModel, n: int, tokens: int, seed: int = 0) -> list[str]:
    """n synthetic references, each exactly `tokens` tokens long."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [f"Record {i}:"]
        while len(model.tokenizer.encode(" ".join(words))) < tokens + 8:
            words.append(rng.choice(WORDS))
        ids = model.tokenizer.encode(" ".join(words))[:tokens]
        text = model.tokenizer.decode(ids)
        assert len(model.tokenizer.encode(text)) == tokens
        out.append(text)
    return out


def plain_forward(model: MemoryModel, texts: list[str]) -> None:
    """The baseline: the same blocks on the same token grid (one batch), nothing else."""
    d, p = model.decoder, model.prefix_ids
    last = max(model.settings.memory_layers)
    ids = model.tokenizer.encode_batch(texts)
    batch = [p + x for x in ids]
    T = max(len(x) for x in batch)
    idx = torch.zeros(len(batch), T, dtype=torch.long)
    valid = torch.zeros(len(batch), T, dtype=torch.bool)
    for b, x in enumerate(batch):
        idx[b, : len(x)] = torch.tensor(x)
        valid[b, : len(x)] = True
    with torch.no_grad():
        cos, sin = rope_cos_sin(torch.arange(T).expand(len(batch), T), d.cfg.head_dim, d.cfg.rope_base)
        mask = attention_mask(valid, valid, 0)
        x = d.tok_emb(idx)
        for blk in d.blocks[: last + 1]:
            x = blk(x, cos[:, None], sin[:, None], mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--settings",
        choices=["dense", "paper"],
        default="dense",
        help="dense: all layers, 32/head; paper: first half, 8/head",
    )
    ap.add_argument("--n", type=int, default=32, help="references per timed run")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = MemoryModel.load()
    settings = MemorySettings() if args.settings == "dense" else MemorySettings.paper(base.decoder.cfg.n_layer)
    model = MemoryModel(base.decoder, base.tokenizer, fingerprint=base.fingerprint, settings=settings)
    texts = references(model, args.n, args.tokens)
    print(
        f"settings={args.settings} memory_layers={list(model.settings.memory_layers)} "
        f"tokens_per_head={model.settings.tokens_per_head}"
    )
    print(
        f"torch threads={torch.get_num_threads()} references={args.n} x {args.tokens} tokens "
        f"(+{len(model.prefix_ids)} prefix)"
    )
    model.encode(texts[:2])  # warm-up
    for bs in args.batch_sizes:
        chunks = [texts[s : s + bs] for s in range(0, len(texts), bs)]
        best = {"encode": [float("inf")] * len(chunks), "forward": [float("inf")] * len(chunks)}
        ratios = []
        for r in range(args.rounds):
            totals = {"encode": 0.0, "forward": 0.0}
            for i, chunk in enumerate(chunks):
                order = [
                    ("encode", lambda: model.encode(chunk, batch_size=bs)),
                    ("forward", lambda: plain_forward(model, chunk)),
                ]
                if (i + r) % 2:
                    order.reverse()
                for name, fn in order:
                    t = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t
                    totals[name] += dt
                    best[name][i] = min(best[name][i], dt)
            ratios.append(totals["forward"] / totals["encode"])
        enc = args.n / sum(best["encode"])
        fwd = args.n / sum(best["forward"])
        print(
            f"batch {bs:3d}: encode {enc:6.2f} refs/s, plain forward {fwd:6.2f} refs/s, "
            f"ratio {enc / fwd:.3f} (target >= 0.90); "
            f"per-round ratios {', '.join(f'{x:.3f}' for x in ratios)} (median {statistics.median(ratios):.3f})"
        )


if __name__ == "__main__":
    main()

"""Codec sizes, errors and decode speed on real memories of the bundled model, in one run.

Memories: Wikipedia summaries (the packaged offline set, title order, a seeded shuffle),
chunked to <= 128 tokens by the engine's chunker, encoded by the bundled SmolLM2-135M in the
sparse mode (layers 15-29, 8 tokens per head) and in the dense default (all 30 layers, 32 per
head). The first `--train` references train the pq codebooks; the next `--test` are measured
(held out from training).

Per mode and codec (int8, int4, pq at each `--m`: bytes per vector, or KEYS,VALUES bytes):
  record    bytes of a record holding K/V, positions and framing (empty text, no metadata, no
            repair fields), mean over the test memories;
  vs fp16   the full fp16 K/V cache of the same reference (30 layers x 2 x 3 KV heads x its
            tokens x 64 x 2 bytes) over `record`, and the issue's mean-reference figure
            (1,933,424 bytes: docs/quality.md) over `record` (400x <= 4,834 bytes);
  error     relative error sqrt(sum |x - x'|^2 / sum |x|^2) on the test memories, keys and values;
  decode    microseconds to decode one record into arrays (decode_record: checksum, msgpack,
            codec), the minimum over rounds, int4 and each pq interleaved round by round;
  train     pq training time on the training sample.
With faiss importable, one codebook's data is also trained by faiss's ProductQuantizer against
m3db's own k-means (same data, same iterations): time and error.

    python bench/bench_codec.py --train 600 --test 100 --m 4 8 16 4,8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import numpy as np

import m3db  # noqa: F401  (the package first: bench scripts run from the repository root)
from m3db.knowledge.bundled import bundled
from m3db.knowledge.chunk import chunk_text
from m3db.knowledge.sources import wikipedia
from m3db.storage.codec import codec_class
from m3db.storage.pq import kmeans, train_pq
from m3db.storage.record import decode_record, encode_record

ISSUE_MEAN_FP16 = 1_933_424  # full fp16 K/V of the mean reference, docs/quality.md
SAMPLES = {}  # mode -> the first (layer, head)'s training keys (V, D)


def references(model, n, seed=0) -> list[str]:
    """n chunks (<= 128 tokens) of Wikipedia summaries, at most two per article."""
    docs = wikipedia()
    random.Random(seed).shuffle(docs)
    count = lambda text: len(model.tokenizer.encode(text))  # noqa: E731
    out = []
    for doc in docs:
        for chunk in chunk_text(doc["text"], count, 128)[:2]:
            out.append(doc["text"][chunk.start : chunk.end])
        if len(out) >= n:
            break
    return out[:n]


def encode(model, texts) -> list[dict]:
    start = time.perf_counter()
    out = model.encode(texts, batch_size=16)
    print(f"  encoded {len(texts)} references in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out


def relative_error(xs, ys) -> float:
    num = sum(float(np.square(x - y, dtype=np.float64).sum()) for x, y in zip(xs, ys))
    den = sum(float(np.square(x, dtype=np.float64).sum()) for x in xs)
    return float(np.sqrt(num / den))


def blob(codec, mem) -> bytes:
    return encode_record(1, codec, mem["keys"], mem["values"], mem["positions"], "", {}, None, None)


def decode_times(codecs, test, rounds) -> dict[str, float]:
    """Per codec, the minimum over rounds of the mean microseconds per record decode."""
    blobs = {name: [blob(c, m) for m in test] for name, c in codecs.items()}
    best = {name: float("inf") for name in codecs}
    for r in range(rounds):
        order = list(codecs) if r % 2 == 0 else list(reversed(codecs))
        for name in order:
            codec = codecs[name]
            start = time.perf_counter()
            for b in blobs[name]:
                decode_record(b, "bench", codec=codec)
            best[name] = min(best[name], (time.perf_counter() - start) / len(blobs[name]) * 1e6)
    return best


def measure(mode, model, train_texts, test_texts, ms, rounds, iterations) -> list[dict]:
    print(f"{mode}:", file=sys.stderr)
    train, test = encode(model, train_texts), encode(model, test_texts)
    keys = np.concatenate([m["keys"] for m in train], axis=2)  # (L, H, V, D)
    SAMPLES[mode] = keys[0, 0]  # one codebook's data, for the faiss comparison
    values = np.concatenate([m["values"] for m in train], axis=2)
    fp16 = [30 * 2 * 3 * m["token_count"] * 64 * 2 for m in test]  # the full cache of each reference
    codecs, info = {"int8": codec_class("int8")(), "int4": codec_class("int4")()}, {}
    for spec in ms:
        parts = [int(x) for x in spec.split(",")]
        m = parts[0] if len(parts) == 1 else {"keys": parts[0], "values": parts[1]}
        name = f"pq{spec}"
        start = time.perf_counter()
        codec = train_pq(keys, values, m=m, iterations=iterations)
        info[name] = {"train_s": time.perf_counter() - start, "stated": codec.error}
        codecs[name] = codec
        print(f"  pq m={spec}: trained in {info[name]['train_s']:.1f} s", file=sys.stderr)
    speed = decode_times(codecs, test, rounds)
    rows = []
    for name, codec in codecs.items():
        sizes = [len(blob(codec, mem)) for mem in test]
        decoded = [decode_record(blob(codec, mem), "bench", codec=codec) for mem in test]
        rows.append(
            {
                "mode": mode,
                "codec": name,
                "record_bytes": float(np.mean(sizes)),
                "vs_fp16_same_refs": float(np.mean(fp16) / np.mean(sizes)),
                "vs_issue_mean_ref": ISSUE_MEAN_FP16 / float(np.mean(sizes)),
                "error_keys": relative_error([m["keys"] for m in test], [d.keys for d in decoded]),
                "error_values": relative_error([m["values"] for m in test], [d.values for d in decoded]),
                "decode_us": speed[name],
                "decode_vs_int4": speed[name] / speed["int4"],
                **info.get(name, {}),
            }
        )
    rows.append({"mode": mode, "codec": "fp16 full K/V", "record_bytes": float(np.mean(fp16))})
    return rows


def faiss_against_numpy(x, m, iterations) -> dict | None:
    """One codebook's data x (V, 64): faiss's ProductQuantizer against m3db's own k-means."""
    try:
        import faiss
    except ImportError:
        return None
    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1] // m
    start = time.perf_counter()
    _, sse = kmeans(
        x.reshape(-1, m, d).transpose(1, 0, 2).copy(), 256, iterations=iterations, rng=np.random.default_rng(0)
    )
    ours = time.perf_counter() - start
    pq = faiss.ProductQuantizer(x.shape[1], m, 8)
    pq.cp.niter = iterations
    start = time.perf_counter()
    pq.train(x)
    theirs = time.perf_counter() - start
    y = pq.decode(pq.compute_codes(x))
    total = float(np.square(x, dtype=np.float64).sum())
    return {
        "vectors": len(x),
        "m": m,
        "numpy_s": ours,
        "numpy_error": float(np.sqrt(sse / total)),
        "faiss_s": theirs,
        "faiss_error": float(np.sqrt(np.square(y - x, dtype=np.float64).sum() / total)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=600, help="references to train pq on (sparse mode)")
    p.add_argument("--dense-train", type=int, default=160, help="references to train pq on (dense mode)")
    p.add_argument("--test", type=int, default=100, help="held-out references to measure")
    p.add_argument("--m", nargs="+", default=["4", "8", "16", "4,8"], help="pq bytes per 64-dim vector, or KEYS,VALUES")
    p.add_argument("--iterations", type=int, default=15, help="k-means iterations")
    p.add_argument("--rounds", type=int, default=5, help="decode timing rounds")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    texts = references(bundled("sparse")[0], args.train + args.test + args.dense_train)
    test = texts[: args.test]
    rows = []
    sparse, _ = bundled("sparse")
    rows += measure(
        "sparse", sparse, texts[args.test : args.test + args.train], test, args.m, args.rounds, args.iterations
    )
    dense, _ = bundled("dense")
    rows += measure(
        "dense", dense, texts[args.test : args.test + args.dense_train], test, args.m, args.rounds, args.iterations
    )
    vs = faiss_against_numpy(SAMPLES["sparse"], 8, args.iterations)
    print(
        f"{'mode':<7} {'codec':<14} {'record B':>9} {'x fp16':>7} {'x 1.93M':>8} {'err K':>6} {'err V':>6} "
        f"{'dec us':>7} {'/int4':>6} {'train s':>8}"
    )
    for r in rows:
        print(
            f"{r['mode']:<7} {r['codec']:<14} {r['record_bytes']:>9,.0f} {r.get('vs_fp16_same_refs', 1):>7.1f} "
            f"{r.get('vs_issue_mean_ref', ISSUE_MEAN_FP16 / r['record_bytes']):>8.1f} {r.get('error_keys', 0):>6.3f} "
            f"{r.get('error_values', 0):>6.3f} {r.get('decode_us', 0):>7.1f} {r.get('decode_vs_int4', 0):>6.2f} "
            f"{r.get('train_s', 0):>8.1f}"
        )
    print("faiss vs numpy k-means (one codebook):", json.dumps(vs) if vs else "faiss not importable")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "faiss_vs_numpy": vs, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()

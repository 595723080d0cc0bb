"""Engine benchmark: bytes per memory, add throughput, recall latency and ANN recall@5.

SmolLM2-shaped spec (15 memory layers, 3 KV heads, 8 tokens per head, head dim 64) with
384-dim embeddings (all-MiniLM-L6-v2's width). Memories and embeddings are random Gaussian:
the hardest case for HNSW (no cluster structure) and realistic for the codecs.
Embeddings are synthetic with topic structure (see embeddings()); the i.i.d. Gaussian worst
case is measured too, on a separate small index. Every figure is printed next to a baseline
measured in the same run, because this machine is shared and noisy:
- add throughput vs writing the same bytes to a plain file with one fsync per batch;
- recall latency vs an exact numpy scan over all embeddings held in RAM.

    python bench/bench_engine.py                  # 100k memories (a few minutes)
    python bench/bench_engine.py --n 5000         # quick
    python bench/bench_engine.py --n 1000000 --codec int4 --dir /big/disk   # the slow one
    python bench/bench_engine.py --n 1000000 --codec pq --expansion 64,128,256

--codec pq: a trained codec needs memories to learn from, as in a real knowledge base: the
first --pq-train memories are added in int4, `db.train_codec("pq", sample=...)` learns the
codebooks and recompresses them (timed), and every later memory is encoded in pq on add.
The K/V pool is Gaussian, so pq's error here says nothing about quality (docs/quality.md
measures that on real memories); sizes and speeds do not depend on the data.
--expansion: the read-only database is reopened with each `config={"expansion_search": e}`
and the unfiltered recall's latency and recall@5 measured at each (the ANN's speed/recall
trade); the first value is used for the rest of the figures.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import m3db  # noqa: E402
from m3db.storage.codec import CODECS, codec_class  # noqa: E402
from m3db.storage.index import EXPANSION_SEARCH  # noqa: E402
from m3db.storage.record import encode_record  # noqa: E402

LAYERS, HEADS, TOKENS, HEAD_DIM, DIM = 15, 3, 8, 64, 384
TOTAL_LAYERS, REF_LEN = 30, 128


def spec(codec):
    return m3db.MemorySpec(
        model_fingerprint="bench",
        memory_layers=range(LAYERS),
        kv_heads=HEADS,
        head_dim=HEAD_DIM,
        tokens_per_head=TOKENS,
        embedding_dim=DIM,
        codec=codec,
    )


def embeddings(rng, n, *, iid=False):
    """Sentence-embedding-like vectors: 500 topics in a 48-dim latent space, projected to
    384 dims plus noise (real embeddings have low intrinsic dimension). iid=True gives
    i.i.d. Gaussian vectors instead: no structure at all, HNSW's worst case."""
    if iid:
        return rng.standard_normal((n, DIM)).astype(np.float32)
    latent, topics = 48, 500
    proj = np.random.default_rng(99).standard_normal((latent, DIM)).astype(np.float32)
    centers = np.random.default_rng(98).standard_normal((topics, latent)).astype(np.float32)
    z = centers[rng.integers(topics, size=n)] + 0.5 * rng.standard_normal((n, latent)).astype(np.float32)
    return (z @ proj + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)).astype(np.float32)


def batch_items(rng, start, n, pool):
    """n memories; KV drawn from a pre-made pool so that generating them is not what we time."""
    shape = (LAYERS, HEADS, TOKENS, HEAD_DIM)
    positions = np.tile(np.arange(TOKENS, dtype=np.uint8), (LAYERS, HEADS, 1))
    emb = embeddings(rng, n)
    items = []
    for i in range(n):
        k = pool[(start + i) % len(pool)]
        items.append(
            dict(
                keys=k[0].reshape(shape),
                values=k[1].reshape(shape),
                positions=positions,
                embedding=emb[i],
                text=f"reference {start + i}",
                metadata={"bucket": (start + i) % 100, "lang": "fr" if (start + i) % 10 == 0 else "en"},
            )
        )
    return items, emb


def bytes_per_memory():
    rng = np.random.default_rng(0)
    shape = (LAYERS, HEADS, TOKENS, HEAD_DIM)
    keys, values = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    positions = np.tile(np.arange(TOKENS, dtype=np.uint8), (LAYERS, HEADS, 1))
    full = spec("f16").bytes_full_kv_fp16(TOTAL_LAYERS)
    rows = []
    for name in ("f32", "f16", "int8", "int4"):
        blob = encode_record(0, codec_class(name)(), keys, values, positions, "x" * 500, {}, None, None)
        rows.append(
            {"codec": name, "bytes": len(blob), "full_fp16_kv_bytes": full, "ratio": round(full / len(blob), 1)}
        )
    return rows


def iid_worst_case(rng, n=20_000, queries=100):
    from m3db.storage.index import VectorIndex

    index = VectorIndex(DIM)
    x = embeddings(rng, n, iid=True)
    index.add(np.arange(n), x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    hits = 0
    for q in embeddings(rng, queries, iid=True):
        truth = set(np.argpartition(-(xn @ q), 5)[:5].tolist())
        hits += len(set(index.search(q, 5)[0].tolist()) & truth)
    return round(hits / (5 * queries), 4)


def plain_write_rate(work, rng, pool, codec, args):
    """The baseline for add: the same record bytes written to a plain file, one fsync per batch."""
    items, _ = batch_items(rng, 0, args.batch, pool)
    blobs = [
        encode_record(i, codec, it["keys"], it["values"], it["positions"], it["text"], it["metadata"], None, None)
        for i, it in enumerate(items)
    ]
    batches = max(1, min(args.n, 20_000) // args.batch)
    t = time.perf_counter()
    with open(os.path.join(work, "plain.bin"), "wb") as f:
        for _ in range(batches):
            for b in blobs:
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
    rate = batches * args.batch / (time.perf_counter() - t)
    os.remove(os.path.join(work, "plain.bin"))
    return rate


def percentile_ms(samples, q):
    return round(float(np.percentile(samples, q)) * 1000, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="memories to add")
    ap.add_argument("--codec", default="int8", choices=[*sorted(CODECS), "pq"])
    ap.add_argument("--pq-train", type=int, default=2000, help="--codec pq: memories added in int4 to train on")
    ap.add_argument(
        "--expansion",
        default=str(EXPANSION_SEARCH),
        help="HNSW expansion_search values to measure, comma-separated (default: the engine's)",
    )
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--dir", default=None, help="where to build (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="m3db-bench-", dir=args.dir)
    path = os.path.join(work, "kb")
    results = {"n": args.n, "codec": args.codec, "spec": "15 layers x 3 KV heads x 8 tokens x 64, 384-dim embeddings"}
    try:
        results["bytes_per_memory"] = bytes_per_memory()
        for row in results["bytes_per_memory"]:
            print(
                f"bytes/memory {row['codec']:>5}: {row['bytes']:>7}  "
                f"(full fp16 KV {row['full_fp16_kv_bytes']} -> {row['ratio']}x smaller)"
            )

        rng = np.random.default_rng(1)
        pool = [rng.standard_normal((2, LAYERS * HEADS * TOKENS * HEAD_DIM)).astype(np.float32) for _ in range(64)]
        all_emb = np.zeros((args.n, DIM), np.float32)

        if args.codec != "pq":
            plain_rate = plain_write_rate(work, rng, pool, codec_class(args.codec)(), args)
        db = m3db.connect(path, spec=spec("int4" if args.codec == "pq" else args.codec))
        t0 = time.perf_counter()
        added = 0
        train_s = 0.0
        while added < args.n:
            if args.codec == "pq" and added >= min(args.pq_train, args.n) and not train_s:
                t = time.perf_counter()
                db.train_codec("pq", sample=args.pq_train)
                train_s = results["pq_train_and_recompress_s"] = round(time.perf_counter() - t, 1)
                print(f"  pq trained on {args.pq_train} memories and recompressed them: {train_s} s", flush=True)
                plain_rate = plain_write_rate(work, rng, pool, db.store.codec, args)  # bytes as pq writes them
                t0 += time.perf_counter() - t - train_s  # the baseline's own time is not add time
            n = min(args.batch, args.n - added)
            items, emb = batch_items(rng, added, n, pool)
            db.add_memories(items)
            all_emb[added : added + n] = emb
            added += n
            if added % (args.batch * 20) == 0:
                print(f"  added {added}/{args.n} ({added / (time.perf_counter() - t0):.0f}/s)", flush=True)
        add_s = time.perf_counter() - t0 - train_s
        results["add_per_s"] = round(args.n / add_s)
        results["plain_file_write_per_s"] = round(plain_rate)
        results["add_vs_plain_write"] = round(results["add_per_s"] / plain_rate, 3)
        print(
            f"add: {results['add_per_s']}/s committed (plain file write of the same bytes: {round(plain_rate)}/s, "
            f"ratio {results['add_vs_plain_write']})"
        )

        t = time.perf_counter()
        db.close()
        results["close_s"] = round(time.perf_counter() - t, 2)
        expansions = [int(e) for e in args.expansion.split(",")]
        t = time.perf_counter()
        db = m3db.connect(path, read_only=True, config={"expansion_search": expansions[0]})
        results["open_s"] = round(time.perf_counter() - t, 3)
        results["disk_bytes"] = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)
        results["segment_bytes_per_memory"] = round(
            sum(os.path.getsize(os.path.join(path, "segments", f)) for f in os.listdir(os.path.join(path, "segments")))
            / args.n
        )

        queries = embeddings(rng, args.queries)
        norms = np.linalg.norm(all_emb, axis=1)
        truths = []
        for q in queries:
            sims = all_emb @ q / norms
            top = np.argpartition(-sims, 5)[:5]
            truths.append((set(top.tolist()), np.sort(sims[top])[0]))  # not sims: 4 MB a query at 1M
        results["expansion_search"] = {}
        for e in expansions[1:]:  # the first is measured below with everything else
            with m3db.connect(path, read_only=True, config={"expansion_search": e}) as other:
                for q in queries[:10]:
                    other.recall(q, k=5, decode=True)
                times, hits = [], 0
                for q, (truth, fifth) in zip(queries, truths):
                    t = time.perf_counter()
                    got = other.recall(q, k=5, decode=True)
                    times.append(time.perf_counter() - t)
                    found = np.asarray(got.ids, dtype=np.int64)
                    scores = all_emb[found] @ q / norms[found]
                    hits += sum(1 for i, s in zip(got.ids, scores) if i in truth or s >= fifth - 1e-3)
            results["expansion_search"][e] = {
                "recall_at_5": round(hits / (5 * len(queries)), 4),
                "p50_ms": percentile_ms(times, 50),
                "p99_ms": percentile_ms(times, 99),
            }
        for q in queries[:10]:  # warm caches
            db.recall(q, k=5, decode=True)
        lat = {
            "none": [],
            "lang = 'fr' (10%, repeated: cached)": [],
            "bucket = ? (1%, new: uncached)": [],
            "exact numpy scan (baseline)": [],
        }
        hits = 0
        for qi, q in enumerate(queries):
            t = time.perf_counter()
            got = db.recall(q, k=5, decode=True)
            lat["none"].append(time.perf_counter() - t)
            t = time.perf_counter()
            db.recall(q, k=5, where="lang = 'fr'", decode=True)
            lat["lang = 'fr' (10%, repeated: cached)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            # 100 distinct parameter values cycled through a 64-entry cache: every query misses
            db.recall(q, k=5, where="bucket = ?", params=[qi % 100], decode=True)
            lat["bucket = ? (1%, new: uncached)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            sims = all_emb @ q / norms
            truth = np.argpartition(-sims, 5)[:5]
            lat["exact numpy scan (baseline)"].append(time.perf_counter() - t)
            fifth = np.sort(sims[truth])[0]
            hits += sum(1 for i in got.ids if i in set(truth.tolist()) or sims[i] >= fifth - 1e-3)
        results["recall_at_5"] = round(hits / (5 * len(queries)), 4)
        results["expansion_search"][expansions[0]] = {
            "recall_at_5": results["recall_at_5"],
            "p50_ms": percentile_ms(lat["none"], 50),
            "p99_ms": percentile_ms(lat["none"], 99),
        }
        results["recall_latency_ms"] = {
            k: {"p50": percentile_ms(v, 50), "p99": percentile_ms(v, 99)} for k, v in lat.items()
        }
        base = results["recall_latency_ms"]["exact numpy scan (baseline)"]["p50"]
        for k, v in results["recall_latency_ms"].items():
            print(
                f"recall k=5 decoded, filter {k:<38} p50 {v['p50']:>8.3f} ms  p99 {v['p99']:>8.3f} ms  "
                f"({v['p50'] / base:.2f}x the exact scan)"
            )
        print(f"ANN recall@5 vs brute force: {results['recall_at_5']}")
        for e in expansions:
            row = results["expansion_search"][e]
            print(
                f"expansion_search {e:>4}: recall@5 {row['recall_at_5']:.4f}, recall k=5 decoded "
                f"p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms"
            )
        results["recall_at_5_iid_gaussian_20k"] = iid_worst_case(rng)
        print(f"ANN recall@5 on i.i.d. Gaussian vectors (no structure, 20k): {results['recall_at_5_iid_gaussian_20k']}")
        results["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(
            f"open (read-only): {results['open_s']} s, disk {results['disk_bytes'] / 1e6:.0f} MB "
            f"(segments {results['segment_bytes_per_memory']} bytes a memory), "
            f"max RSS {results['max_rss_mb']} MB"
        )
        db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

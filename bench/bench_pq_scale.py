"""pq at scale: training a codebook on a large database, and recompressing every memory into it.

Builds `--n` memories in the sparse mode's shape (15 memory layers x 3 KV heads x 8 tokens x 64
dims, 384-dim embeddings) in int4, the codec a knowledge base starts in, then times the two
halves of `db.train_codec("pq", sample=S, m=...)` / `m3db recompress --codec pq --sample S`
separately:
  train       maintenance.train: read S memories picked at random (at most 2,048 in this
              shape: what training can use), k-means every codebook (15 x 3 x keys/values),
              measure the stated error on the held-out eighth;
  recompress  maintenance.recompress: every memory read, decoded, re-encoded in pq, appended to
              fresh segments, fsynced, one catalog swap, old segments removed.
Then the pq database is opened read-only: disk size, open time, recall k=5 decoded latency.

Data (synthetic, no model): keys and values drawn like tests/test_pq.py's kv_like, shaped like
real K/V: a per-(layer, head) offset, a few dominant directions with uneven per-dimension scales
(real K/V have outlier dimensions) and noise; keys rank 6 (structured, as real keys are),
values rank 24 with more noise (values resist PQ). The structure is fixed, the draws differ for
every memory, so the training sample is a sample of one distribution, as a knowledge base's is.
Positions: 8 distinct sorted positions in 0..127 per head. Embeddings: i.i.d. Gaussian (this
bench does not measure ANN quality: bench_engine.py does).

Threads: numpy's BLAS is limited to `--threads` (2 by default; the development machine has 2
shared cores); the figures are printed with the load average before and after.

    python bench/bench_pq_scale.py --n 2000                  # quick check
    python bench/bench_pq_scale.py --n 100000 --out bench/out/pq_scale_100k.json
"""

import argparse
import os
import sys

THREADS_DEFAULT = "2"
if __name__ == "__main__":  # before numpy is imported: BLAS reads these once
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            THREADS_DEFAULT = sys.argv[i + 1]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, THREADS_DEFAULT)

import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import m3db  # noqa: E402
from m3db.storage import maintenance  # noqa: E402

LAYERS, HEADS, TOKENS, HEAD_DIM, DIM, REF_LEN = 15, 3, 8, 64, 384, 128


def spec():
    return m3db.MemorySpec(
        model_fingerprint="bench-pq-scale",
        memory_layers=range(LAYERS),
        kv_heads=HEADS,
        head_dim=HEAD_DIM,
        tokens_per_head=TOKENS,
        embedding_dim=DIM,
        codec="int4",
    )


def kv_like(rng, n, *, rank, noise, structure_seed):
    """(L, H, n, D) float32: a per-(layer, head) offset, `rank` dominant directions with
    per-dimension scales falling from 3 to 0.3, and Gaussian noise (tests/test_pq.py's recipe).
    The structure comes from `structure_seed` alone, so every call draws from one distribution."""
    structure = np.random.default_rng(structure_seed)
    mean = structure.standard_normal((LAYERS, HEADS, 1, HEAD_DIM)) * 2
    basis = structure.standard_normal((LAYERS, HEADS, rank, HEAD_DIM)) * np.linspace(3, 0.3, HEAD_DIM)
    coef = rng.standard_normal((LAYERS, HEADS, n, rank))
    return (mean + coef @ basis + noise * rng.standard_normal((LAYERS, HEADS, n, HEAD_DIM))).astype(np.float32)


def memories(rng, start, n):
    """n add_memories() items: keys (rank 6, noise 0.2), values (rank 24, noise 0.5, half scale)."""
    keys = kv_like(rng, n * TOKENS, rank=6, noise=0.2, structure_seed=99)  # (L, H, n*T, D)
    values = 0.5 * kv_like(rng, n * TOKENS, rank=24, noise=0.5, structure_seed=98)
    # (L, H, n, T, D) -> (n, L, H, T, D): memory i holds vectors i*T .. i*T+T-1 of each head
    keys = keys.reshape(LAYERS, HEADS, n, TOKENS, HEAD_DIM).transpose(2, 0, 1, 3, 4)
    values = values.reshape(LAYERS, HEADS, n, TOKENS, HEAD_DIM).transpose(2, 0, 1, 3, 4)
    stride = REF_LEN // TOKENS
    positions = np.arange(TOKENS) * stride + rng.integers(0, stride, (n, LAYERS, HEADS, TOKENS))  # sorted, distinct
    emb = rng.standard_normal((n, DIM)).astype(np.float32)
    return [
        dict(
            keys=np.ascontiguousarray(keys[i]),
            values=np.ascontiguousarray(values[i]),
            positions=positions[i].astype(np.uint8),
            embedding=emb[i],
            text=f"reference {start + i}",
            metadata={"bucket": (start + i) % 100},
        )
        for i in range(n)
    ]


def parse_m(text):
    """'8' -> 8; '4,8' -> {"keys": 4, "values": 8}."""
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else {"keys": parts[0], "values": parts[1]}


def disk_bytes(path):
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


def rss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def load():
    return [round(x, 2) for x in os.getloadavg()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="memories in the database")
    ap.add_argument("--sample", type=int, default=2000, help="memories to train on (the CLI's default: 2000)")
    ap.add_argument("--m", default="4,8", help="bytes per vector: M, or KEYS,VALUES (default 4,8: the 400x point)")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", default=THREADS_DEFAULT, help="BLAS threads (default 2)")
    ap.add_argument("--dir", default=None, help="where to build (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    results = {
        "n": args.n,
        "sample": args.sample,
        "m": parse_m(args.m),
        "data": "synthetic K/V like tests/test_pq.py kv_like: keys rank 6 + noise 0.2, values rank 24 + noise 0.5",
        "spec": "sparse shape: 15 layers x 3 KV heads x 8 tokens x 64, int4 before, 384-dim embeddings",
        "threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "cpus": os.cpu_count(),
        "load_start": load(),
    }
    print(f"n {args.n}, sample {args.sample}, m {args.m}, cpus {os.cpu_count()}, BLAS threads {args.threads}")
    print(f"data: {results['data']}")
    print(f"load average at start: {results['load_start']}", flush=True)
    work = tempfile.mkdtemp(prefix="m3db-pq-scale-", dir=args.dir)
    path = os.path.join(work, "kb")
    try:
        rng = np.random.default_rng(1)
        db = m3db.connect(path, spec=spec())
        t0 = time.perf_counter()
        made = 0.0
        added = 0
        while added < args.n:
            n = min(args.batch, args.n - added)
            t = time.perf_counter()
            items = memories(rng, added, n)
            made += time.perf_counter() - t
            db.add_memories(items)
            added += n
            if added % (args.batch * 10) == 0 or added == args.n:
                rate = added / (time.perf_counter() - t0 - made)
                print(f"  added {added}/{args.n} (int4, {rate:.0f}/s, load {load()[0]})", flush=True)
        results["add_int4_s"] = round(time.perf_counter() - t0 - made, 1)
        results["generate_s"] = round(made, 1)
        db.close()
        results["disk_int4_bytes"] = disk_bytes(path)

        db = m3db.connect(path)  # writable, as m3db recompress opens it
        rss0 = rss_mb()
        results["load_before_train"] = load()
        t = time.perf_counter()
        codec = maintenance.train(db.store, "pq", sample=args.sample, m=results["m"])
        results["train_s"] = round(time.perf_counter() - t, 1)
        results["train_max_rss_mb"] = {"before": rss0, "after": rss_mb()}
        results["train_vectors_per_codebook"] = codec.vectors
        # maintenance.train reads a sample only up to READ_VECTORS vectors per (layer, head)
        results["memories_read"] = min(args.sample, args.n, maintenance.READ_VECTORS // TOKENS)
        results["stated_error"] = {k: round(v, 4) for k, v in codec.error.items()}
        print(
            f"train: {results['train_s']} s (sample={args.sample}: {results['memories_read']} memories read, "
            f"{codec.vectors} vectors per codebook, 90 codebooks), stated error keys "
            f"{results['stated_error']['keys']} values {results['stated_error']['values']}, "
            f"max RSS {rss0} -> {rss_mb()} MB, load {load()}",
            flush=True,
        )
        results["load_before_recompress"] = load()
        t = time.perf_counter()
        report = maintenance.recompress(db.store, codec)
        results["recompress_s"] = round(time.perf_counter() - t, 1)
        results["recompress_per_s"] = round(args.n / (time.perf_counter() - t))
        results["bytes_before"], results["bytes_after"] = report["bytes_before"], report["bytes_after"]
        print(
            f"recompress: {results['recompress_s']} s for {args.n} memories ({results['recompress_per_s']}/s), "
            f"segments {report['bytes_before'] / 1e6:.0f} -> {report['bytes_after'] / 1e6:.0f} MB "
            f"({report['bytes_after'] / args.n:.0f} bytes per memory with its text and repair fields), load {load()}",
            flush=True,
        )
        db.close()

        t = time.perf_counter()
        db = m3db.connect(path, read_only=True)
        results["open_s"] = round(time.perf_counter() - t, 3)
        results["disk_pq_bytes"] = disk_bytes(path)
        queries = rng.standard_normal((args.queries, DIM)).astype(np.float32)
        for q in queries[:10]:  # warm
            db.recall(q, k=5, decode=True)
        lat = []
        for q in queries:
            t = time.perf_counter()
            db.recall(q, k=5, decode=True)
            lat.append(time.perf_counter() - t)
        results["recall_k5_decoded_ms"] = {
            "p50": round(float(np.percentile(lat, 50)) * 1000, 3),
            "p99": round(float(np.percentile(lat, 99)) * 1000, 3),
        }
        assert db.get(int(db.store.locations.ids[0])).keys.shape == (LAYERS, HEADS, TOKENS, HEAD_DIM)
        db.close()
        results["max_rss_mb"] = rss_mb()
        results["load_end"] = load()
        print(
            f"pq database: disk {results['disk_int4_bytes'] / 1e6:.0f} MB (int4) -> "
            f"{results['disk_pq_bytes'] / 1e6:.0f} MB, open read-only {results['open_s']} s, recall k=5 decoded "
            f"p50 {results['recall_k5_decoded_ms']['p50']} ms p99 {results['recall_k5_decoded_ms']['p99']} ms, "
            f"max RSS {results['max_rss_mb']} MB, load at end {results['load_end']}"
        )
        print(
            f"train + recompress (db.train_codec): {results['train_s'] + results['recompress_s']:.1f} s; "
            f"building the int4 database took {results['add_int4_s']} s"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""Package benchmark: pack and verify throughput (MB/s) and attach time, each against a baseline
measured in the same run (this machine is shared and noisy, so only ratios travel):

- pack       vs copying the database's segment files into one file with one fsync;
- verify     vs sha256 of the package file alone (verify also decodes every record);
- attach     cold (first open: the catalog and index are extracted to the cache) and warm
             (the cache entry exists) vs opening the unpacked database directory read-only;
- recall     p50 latency on the attached package vs on the database directory;
- residency  in a fresh process after a warm attach: the resident bytes of the package file's
             mapping (from /proc/self/smaps) against its segment bytes, showing that attaching
             does not read the segments; then again after 200 recalls that decode memories.

SmolLM2-shaped memories (15 memory layers, 3 KV heads, 8 tokens per head, head dim 64, int8:
about 50 KB each) with 384-dim embeddings with topic structure.

    python bench/bench_package.py                 # 100k memories (about 5 GB; several minutes)
    python bench/bench_package.py --n 5000        # quick
    python bench/bench_package.py --dir /big/disk --codec int4
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import m3db  # noqa: E402

LAYERS, HEADS, TOKENS, HEAD_DIM, DIM = 15, 3, 8, 64, 384
MB = 1 << 20


def make_spec(codec):
    return m3db.MemorySpec(
        model_fingerprint="bench",
        memory_layers=range(LAYERS),
        kv_heads=HEADS,
        head_dim=HEAD_DIM,
        tokens_per_head=TOKENS,
        embedding_dim=DIM,
        codec=codec,
    )


def embeddings(rng, n):
    """500 topics in a 48-dim latent space projected to 384 dims plus noise."""
    proj = np.random.default_rng(99).standard_normal((48, DIM)).astype(np.float32)
    centers = np.random.default_rng(98).standard_normal((500, 48)).astype(np.float32)
    z = centers[rng.integers(500, size=n)] + 0.5 * rng.standard_normal((n, 48)).astype(np.float32)
    return (z @ proj + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)).astype(np.float32)


def build(path, n, codec, batch=1000):
    rng = np.random.default_rng(0)
    shape = (LAYERS, HEADS, TOKENS, HEAD_DIM)
    pool = [rng.standard_normal((2, *shape)).astype(np.float32) for _ in range(64)]
    positions = np.tile(np.arange(TOKENS, dtype=np.uint8), (LAYERS, HEADS, 1))
    with m3db.connect(path, spec=make_spec(codec)) as db:
        for start in range(0, n, batch):
            m = min(batch, n - start)
            emb = embeddings(rng, m)
            db.add_memories(
                [
                    dict(
                        keys=pool[(start + i) % 64][0],
                        values=pool[(start + i) % 64][1],
                        positions=positions,
                        embedding=emb[i],
                        text=f"reference {start + i}: " + "lorem ipsum " * 30,
                        metadata={"bucket": (start + i) % 100, "lang": "fr" if (start + i) % 10 == 0 else "en"},
                        document=f"doc/{(start + i) // 8}",
                    )
                    for i in range(m)
                ]
            )
            print(f"\r  built {start + m:,}/{n:,}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def copy_baseline(db_path, out):
    """Concatenate the segment files into one file, one fsync: what any packer must at least do."""
    segs = sorted(os.path.join(db_path, "segments", f) for f in os.listdir(os.path.join(db_path, "segments")))
    t = time.perf_counter()
    with open(out, "wb") as w:
        for s in segs:
            with open(s, "rb") as r:
                shutil.copyfileobj(r, w, 8 * MB)
        w.flush()
        os.fsync(w.fileno())
    return time.perf_counter() - t, sum(os.path.getsize(s) for s in segs)


def sha256_file(path):
    import hashlib

    h = hashlib.sha256()
    t = time.perf_counter()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MB):
            h.update(chunk)
    return time.perf_counter() - t


def timed(fn, repeat=1):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, out


RESIDENCY = r"""
import json, sys, time, numpy as np, m3db
def rss():
    out = {"package_mapping": 0}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile", "VmRSS")):
            k, v = line.split(":"); out[k] = int(v.split()[0]) * 1024
    inside = False
    for line in open("/proc/self/smaps"):  # resident bytes of the package file's own mapping
        head = line.split()
        if len(head) > 5 and "-" in head[0] and ":" in head[3]:
            inside = line.rstrip().endswith(sys.argv[1])
        elif inside and line.startswith("Rss:"):
            out["package_mapping"] += int(head[1]) * 1024
    return out
before = rss()
t = time.perf_counter()
p = m3db.connect(sys.argv[1], config={"cache_dir": sys.argv[2]})
attach_s = time.perf_counter() - t
after = rss()
rng = np.random.default_rng(5)
for q in rng.standard_normal((200, 384)).astype(np.float32):
    p.recall(q, k=5, decode=True)
print(json.dumps({"before": before, "after_attach": after, "after_recalls": rss(), "attach_s": attach_s}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="memories in the knowledge base")
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--dir", default=None, help="where to build (needs about 3x the package size free)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "package.json"))
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="m3db-bench-package-", dir=args.dir)
    db_path, pkg, cache = os.path.join(root, "kb"), os.path.join(root, "kb.m3kb"), os.path.join(root, "cache")
    r = {"n": args.n, "codec": args.codec, "cpus": os.cpu_count()}
    try:
        t = time.perf_counter()
        build(db_path, args.n, args.codec)
        r["build_s"] = time.perf_counter() - t

        copy_s, seg_bytes = copy_baseline(db_path, os.path.join(root, "copy.bin"))
        os.remove(os.path.join(root, "copy.bin"))
        r["segment_bytes"] = seg_bytes
        r["copy_MBps"] = seg_bytes / MB / copy_s
        with m3db.connect(db_path, read_only=True) as db:
            t = time.perf_counter()
            db.pack(pkg, name="bench", license="CC0-1.0")
            pack_s = time.perf_counter() - t
        size = os.path.getsize(pkg)
        r["package_bytes"] = size
        r["pack_s"] = pack_s
        r["pack_MBps"] = size / MB / pack_s
        r["pack_vs_copy"] = r["pack_MBps"] / r["copy_MBps"]

        r["sha256_MBps"] = (
            size / MB / min(sha256_file(pkg) for _ in range(2))
        )  # the second pass: page cache warm, as verify's
        verify_s, report = timed(lambda: m3db.verify(pkg))
        assert report.ok, report.problems
        r["verify_MBps"] = size / MB / verify_s
        r["verify_vs_sha256"] = r["verify_MBps"] / r["sha256_MBps"]
        verify_fast_s, _ = timed(lambda: m3db.verify(pkg, arrays=False))
        r["verify_no_arrays_MBps"] = size / MB / verify_fast_s

        def open_close(path, **kw):
            db = m3db.connect(path, **kw)
            n = len(db)
            db.close()
            return n

        r["open_directory_s"], _ = timed(lambda: open_close(db_path, read_only=True), repeat=3)
        r["attach_cold_s"], _ = timed(lambda: open_close(pkg, config={"cache_dir": cache}))
        r["attach_warm_s"], n = timed(lambda: open_close(pkg, config={"cache_dir": cache}), repeat=3)
        assert n == args.n
        r["attach_warm_vs_open_directory"] = r["attach_warm_s"] / r["open_directory_s"]
        r["cache_entry_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)

        rng = np.random.default_rng(1)
        queries = rng.standard_normal((300, DIM)).astype(np.float32)
        for name, path, kw in (
            ("directory", db_path, {"read_only": True}),
            ("package", pkg, {"config": {"cache_dir": cache}}),
        ):
            with m3db.connect(path, **kw) as db:
                lat = []
                for q in queries:
                    t = time.perf_counter()
                    db.recall(q, k=5)
                    lat.append(time.perf_counter() - t)
                r[f"recall_p50_ms_{name}"] = float(np.percentile(lat, 50) * 1000)
        r["recall_package_vs_directory"] = r["recall_p50_ms_package"] / r["recall_p50_ms_directory"]

        out = subprocess.run([sys.executable, "-c", RESIDENCY, pkg, cache], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"the residency probe failed:\n{out.stderr}")
        res = json.loads(out.stdout)
        r["residency"] = res
        r["package_resident_after_attach_MB"] = res["after_attach"]["package_mapping"] / MB
        r["package_resident_after_recalls_MB"] = res["after_recalls"]["package_mapping"] / MB
        r["rss_after_attach_MB"] = (res["after_attach"]["VmRSS"] - res["before"]["VmRSS"]) / MB
        r["segments_MB"] = seg_bytes / MB
    finally:
        shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(r, f, indent=2)
    print(f"{'memories':<34}{args.n:,} ({args.codec}), package {r['package_bytes'] / MB:,.0f} MB")
    print(
        f"{'pack':<34}{r['pack_MBps']:8.0f} MB/s   copy baseline {r['copy_MBps']:.0f} MB/s   "
        f"ratio {r['pack_vs_copy']:.2f}"
    )
    print(
        f"{'verify (decodes every record)':<34}{r['verify_MBps']:8.0f} MB/s   "
        f"sha256 baseline {r['sha256_MBps']:.0f} MB/s   ratio {r['verify_vs_sha256']:.2f}"
    )
    print(f"{'verify (arrays=False)':<34}{r['verify_no_arrays_MBps']:8.0f} MB/s")
    print(
        f"{'attach, cold cache':<34}{r['attach_cold_s'] * 1000:8.0f} ms   "
        f"(extracts {r['cache_entry_bytes'] / MB:.0f} MB of catalog + index)"
    )
    print(
        f"{'attach, warm cache':<34}{r['attach_warm_s'] * 1000:8.0f} ms   "
        f"open directory baseline {r['open_directory_s'] * 1000:.0f} ms   "
        f"ratio {r['attach_warm_vs_open_directory']:.2f}"
    )
    print(
        f"{'recall p50 (k=5)':<34}{r['recall_p50_ms_package']:8.2f} ms   "
        f"directory {r['recall_p50_ms_directory']:.2f} ms   ratio {r['recall_package_vs_directory']:.2f}"
    )
    print(
        f"{'package pages resident, attach':<34}{r['package_resident_after_attach_MB']:8.2f} MB   "
        f"of {r['segments_MB']:.0f} MB of segments "
        f"(whole process RSS grew {r['rss_after_attach_MB']:.0f} MB: DuckDB, the index view)"
    )
    print(f"{'... after 200 decoded recalls':<34}{r['package_resident_after_recalls_MB']:8.2f} MB")


if __name__ == "__main__":
    main()

"""The Ray build against the local build, and the single writer's ceiling (docs/distributed.md).

1. documents/s building the same documents locally (add_documents) and on a local Ray cluster
   with 1 and 2 workers, in one run, with the ratios;
2. the single writer's ceiling: memories/s committed from pre-encoded records (keys and values
   already int4 bytes, as workers send them; SmolLM2's dense shape), no model involved;
3. from these, an estimate for 1M documents on N workers.

    python bench/bench_ray.py                  # the bundled model, 24 Wikipedia summaries
    python bench/bench_ray.py --model tiny     # the tiny random decoder (the pipeline's overhead)
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def build_rates(args, folder):
    import ray

    import m3db
    from m3db.bindings.ray import BundledModels, TinyModels, build

    if args.model == "tiny":
        from m3db.model.memory_model import MemoryModel
        from m3db.testing import HashEmbedder

        docs = [
            {"text": f"Document {i} on topic {i % 7}. " * (8 + i % 20), "source": f"d{i}"} for i in range(args.docs)
        ]
        local_models = dict(model=MemoryModel.tiny(), embedder=HashEmbedder())
        models = TinyModels()
    else:
        docs = m3db.sources.wikipedia(limit=args.docs)
        local_models = {}
        models = BundledModels()
    out = {}
    t = time.perf_counter()
    with m3db.connect(os.path.join(folder, "local.m3db"), **local_models) as db:
        db.models()  # the model's load is not part of the rate (each Ray worker loads its own, counted)
        t = time.perf_counter()
        db.add_documents(docs, batch_size=args.batch_size, progress=False)
        memories = len(db)
    out["local"] = time.perf_counter() - t
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    for workers in (1, 2):
        t = time.perf_counter()
        build(os.path.join(folder, f"ray{workers}.m3db"), docs, models=models, workers=workers,
              batch_size=args.batch_size, progress=False)  # fmt: skip
        out[f"ray, {workers} worker{'s' if workers > 1 else ''}"] = time.perf_counter() - t
    ray.shutdown()
    return out, len(docs), memories


def writer_ceiling(folder, n=960, per_commit=48):
    """Commit n pre-encoded SmolLM2-dense-shaped int4 memories, `per_commit` per commit."""
    import m3db
    from m3db.storage.codec import EncodedArray, Int4Codec

    spec = m3db.MemorySpec(
        model_fingerprint="bench",
        memory_layers=range(30),
        kv_heads=3,
        head_dim=64,
        tokens_per_head=32,
        embedding_dim=384,
        codec="int4",
    )
    codec, rng = Int4Codec(), np.random.default_rng(0)
    shape = (30, 3, 32, 64)
    items = []
    for i in range(per_commit):  # reused: encoding is the workers' cost, not the writer's
        k, v = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
        items.append(
            dict(
                keys=EncodedArray("int4", 1, shape, codec.encode(k)),
                values=EncodedArray("int4", 1, shape, codec.encode(v)),
                positions=np.tile(np.arange(32, dtype=np.uint8), (30, 3, 1)),
                embedding=rng.standard_normal(384).astype(np.float32),
                text=f"reference {i} " * 20,
                document=None,
            )
        )
    with m3db.connect(os.path.join(folder, "ceiling.m3db"), spec=spec) as db:
        t = time.perf_counter()
        for c in range(n // per_commit):
            for j, item in enumerate(items):
                item["document"] = {"source": f"doc-{c}-{j // 3}"}
            db.add_memories(items)
        elapsed = time.perf_counter() - t
        record = int(np.mean([db.locations.cols["length"][i] for i in range(len(db))]))
    return n / elapsed, record


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bundled", "tiny"], default="bundled")
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8, dest="batch_size")
    args = p.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-ray-")
    try:
        ceiling, record = writer_ceiling(folder)
        print(
            f"single writer: {ceiling:,.0f} memories/s committed from pre-encoded int4 records ({record:,} bytes each)"
        )
        times, n, memories = build_rates(args, folder)
        print(f"\n{n} documents -> {memories} memories, model {args.model}, {os.cpu_count()} CPUs, one run:")
        base = n / times["local"]
        for name, seconds in times.items():
            rate = n / seconds
            print(f"  {name:<16} {seconds:7.1f} s  {rate:6.2f} documents/s  {memories / seconds:6.2f} memories/s  "
                  f"x{rate / base:.2f} of local")  # fmt: skip
        per_doc = memories / n
        worker = memories / times["local"]
        print(f"\nestimate for 1M documents ({per_doc:.2f} memories each, {per_doc * 1e6:,.0f} memories):")
        print(f"  the writer alone needs {per_doc * 1e6 / ceiling / 3600:.1f} h at {ceiling:,.0f} memories/s")
        for rate, what in ((worker, "measured here, CPU"), (100.0, "assumed, one GPU"), (1000.0, "assumed, one GPU")):
            for workers in (8, 64):
                encode = per_doc * 1e6 / (rate * workers)
                single = max(encode, per_doc * 1e6 / ceiling)
                print(f"  {workers:3d} workers at {rate:7.1f} memories/s each ({what}): single writer "
                      f"{single / 3600:8.1f} h, sharded {encode / 3600:8.1f} h")  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Answer quality in the trained pq codec against int4, on bench/quality.py's questions.

The same questions, knowledge base and leakage-filtered retrieval as bench/quality.py (its
functions, imported). Each memory mode's knowledge base is built once in int4, copied, and
the copy recompressed into pq (`db.train_codec("pq", ...)`, trained on the knowledge base's
own memories, as `m3db recompress --codec pq` does); both copies are then read by the same
model. Per mode and codec: stored bytes per memory (records without their text), the gold
answer's log-prob (mean, and the paired difference pq - int4 with its standard error), and
exact match with its paired difference (questions pq answers and int4 does not, minus the
reverse). Issue 18's rule: the sparse mode in pq within 0.15 nats of int4, EM not lower beyond
its paired noise.

    python bench/bench_pq_quality.py --per-task 15 --distractors 45   # ~10 min
    python bench/bench_pq_quality.py --quick                          # smoke test (~3 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402  (bench/quality.py: questions, retrieval, evaluation)
import torch  # noqa: E402

import m3db  # noqa: E402
from m3db.model.embedder import Embedder  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402

# mode -> pq sizes (bytes per head vector, keys,values): the sparse mode's first is issue 18's
# 400x point
PQ_SIZES = {"sparse": ["4,8", "8,16", "16,16"], "dense": ["8", "16"]}


def pq_size(text):
    parts = [int(x) for x in text.split(",")]
    return parts[0] if len(parts) == 1 else {"keys": parts[0], "values": parts[1]}


def stored_bytes(db) -> float:
    ((per_memory,),) = db.sql("SELECT avg(length - octet_length(encode(text))) FROM memories")
    return float(per_memory)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 questions per task, 16 distractors")
    ap.add_argument("--per-task", type=int, default=30)
    ap.add_argument("--distractors", type=int, default=90)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    ap.add_argument("--sparse-sizes", nargs="+", default=PQ_SIZES["sparse"], help="pq sizes: M or KEYS,VALUES")
    ap.add_argument("--dense-sizes", nargs="+", default=PQ_SIZES["dense"])
    args = ap.parse_args()
    sizes = {"sparse": args.sparse_sizes, "dense": args.dense_sizes}
    if args.quick:
        args.per_task, args.distractors = 4, 16
    t_start = time.perf_counter()

    def say(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    dense = MemoryModel.load(adapter=None)
    sparse = dense.with_settings(MemorySettings.sparse(dense.decoder.cfg.n_layer))  # with the bundled adapter
    models = {k: v for k, v in (("sparse", sparse), ("dense", dense)) if k in args.modes}
    embedder = quality.SharedEmbeddings(Embedder())
    questions, docs, _ = quality.build_questions(args.per_task, args.distractors, dense.count_tokens, args.seed)
    say(
        f"{len(questions)} questions, {len(docs)} articles; the sparse mode reads through the adapter: "
        f"{sparse.adapter is not None}"
    )
    tmp = tempfile.TemporaryDirectory(prefix="m3db-pq-quality-")
    results = {}
    for mode, model in models.items():
        int4 = os.path.join(tmp.name, f"{mode}-int4.m3db")
        with m3db.connect(int4, model=model, embedder=embedder, codec="int4") as db:
            db.add_documents(docs, progress=False)
            say(f"built {mode}: {len(db)} memories")
        paths = [("int4", int4)]
        for size in sizes[mode]:
            pq = os.path.join(tmp.name, f"{mode}-pq-{size}.m3db")
            shutil.copytree(int4, pq)
            with m3db.connect(pq, model=model, embedder=embedder) as db:
                t = time.perf_counter()
                trained = db.train_codec("pq", sample=len(db), m=pq_size(size))
                say(
                    f"{mode}: pq {size} trained and recompressed in {time.perf_counter() - t:.0f} s, {trained['error']}"
                )
            paths.append((f"pq {size}", pq))
        for codec, path in paths:
            with m3db.connect(path, model=model, embedder=embedder, read_only=True, config={"cache_bytes": 1}) as db:
                retriever = quality.FilteredRetriever(db, model, decode=True)
                cond = quality.Condition(f"{mode} {codec}", "memory")
                rows = quality.evaluate(cond, model, retriever, questions, args.batch_size, say)
                results[mode, codec] = (rows, stored_bytes(db))

    print(f"\n{len(questions)} questions; memory mode, leakage-filtered retrieval, k=5\n")
    print(
        "| mode | codec | bytes per memory (no text) | logprob | pq - int4 (mean ± se) | EM | EM pq - int4 (paired) |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in models:
        base, _ = results[mode, "int4"]
        for codec in ["int4"] + [f"pq {size}" for size in sizes[mode]]:
            rows, size = results[mode, codec]
            d = [r["logprob"] - b["logprob"] for r, b in zip(rows, base)]
            se = statistics.stdev(d) / len(d) ** 0.5
            gained = sum(r["em"] and not b["em"] for r, b in zip(rows, base))
            lost = sum(b["em"] and not r["em"] for r, b in zip(rows, base))
            print(
                f"| {mode} | {codec} | {size:,.0f} | "
                f"{statistics.mean(r['logprob'] for r in rows):.3f} | "
                f"{'-' if codec == 'int4' else f'{statistics.mean(d):+.3f} ± {se:.3f}'} | "
                f"{statistics.mean(r['em'] for r in rows):.3f} | "
                f"{'-' if codec == 'int4' else f'+{gained} -{lost}'} |"
            )


if __name__ == "__main__":
    main()

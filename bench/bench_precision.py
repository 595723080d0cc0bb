"""Reading quality at each decoder precision (fp32, int8, int4) on bench/quality.py's questions.

The same questions, knowledge base and leakage-filtered retrieval as bench/quality.py (its
functions, imported), read by the same weights at each precision (`MemoryModel.at_precision`;
memories are encoded once, in fp32, as every precision does). Conditions: no memory, text RAG,
the dense default memory (all layers, 32 tokens per head, int4 codec), and the sparse mode
through the bundled reader adapter (layers 15-29, 8 tokens per head). Per precision against
fp32, per condition:
  d logprob   mean (and mean absolute) change of log p(gold answer), nats per question;
  same reply  greedy 20-token replies identical to fp32's (bench/quality.py's generation);
  EM          exact match, as bench/quality.py counts it.
The default precision must keep |mean d logprob| <= 0.05 and >= 95% identical replies
(issue 17's rule); the figures say which precisions do.

    python bench/bench_precision.py             # 30 questions per task (~15 min)
    python bench/bench_precision.py --quick     # 4 per task (~2 min)
"""

from __future__ import annotations

import argparse
import os
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
from m3db.model.quantize import PRECISIONS  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402

CONDITIONS = [  # name, mode, memory settings ("dense" / "sparse"), reader adapter
    ("none", "none", "dense", False),
    ("rag", "rag", "dense", False),
    ("memory (dense default)", "memory", "dense", False),
    ("sparse + adapter", "memory", "sparse", True),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 questions per task, 16 distractors")
    ap.add_argument("--per-task", type=int, default=30)
    ap.add_argument("--distractors", type=int, default=90)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.per_task, args.distractors = 4, 16
    t_start = time.perf_counter()

    def say(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    dense = MemoryModel.load(adapter=None)
    n_layer = dense.decoder.cfg.n_layer
    sparse = dense.with_settings(MemorySettings.sparse(n_layer))  # the bundled adapter, when it ships
    if sparse.adapter is None:
        say("no bundled reader adapter for the sparse mode: 'sparse + adapter' is left out")
    models = {"dense": dense, "sparse": sparse}
    conditions = [c for c in CONDITIONS if not c[3] or sparse.adapter is not None]
    embedder = quality.SharedEmbeddings(Embedder())
    questions, docs, _ = quality.build_questions(args.per_task, args.distractors, dense.count_tokens, args.seed)
    say(f"{len(questions)} questions, {len(docs)} articles")
    tmp = tempfile.TemporaryDirectory(prefix="m3db-precision-")
    dbs = {}
    for key, model in models.items():
        if not any(c[2] == key and c[1] == "memory" for c in conditions):
            continue
        t = time.perf_counter()
        db = m3db.connect(os.path.join(tmp.name, f"{key}.m3db"), model=model, embedder=embedder, codec="int4")
        db.add_documents(docs, progress=False)
        dbs[key] = db
        say(f"built {key}: {len(db)} memories in {time.perf_counter() - t:.0f} s")

    results = {}  # (precision, condition) -> rows
    for precision in PRECISIONS:
        t = time.perf_counter()
        readers = {k: m.at_precision(precision) for k, m in models.items()}
        say(f"{precision}: quantized in {time.perf_counter() - t:.1f} s")
        for name, mode, key, _ in conditions:
            model = readers[key]
            retriever = None
            if mode != "none":
                retriever = quality.FilteredRetriever(
                    dbs[key] if key in dbs else dbs["dense"], model, decode=mode == "memory"
                )
            cond = quality.Condition(name, mode)
            results[precision, name] = quality.evaluate(cond, model, retriever, questions, args.batch_size, say)

    print(f"\n{len(questions)} questions; against fp32 at each precision (mean over questions)\n")
    print("| condition | precision | logprob | d logprob (mean ± se) | mean abs d | same reply | EM |")
    print("|---|---|---|---|---|---|---|")
    for name, *_ in conditions:
        ref = results["fp32", name]
        for precision in PRECISIONS:
            rows = results[precision, name]
            d = [r["logprob"] - f["logprob"] for r, f in zip(rows, ref)]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
            same = sum(r["reply"] == f["reply"] for r, f in zip(rows, ref))
            print(
                f"| {name} | {precision} | {statistics.mean(r['logprob'] for r in rows):.3f} | "
                f"{statistics.mean(d):+.3f} ± {se:.3f} | {statistics.mean(abs(x) for x in d):.3f} | "
                f"{same}/{len(rows)} ({same / len(rows):.0%}) | {statistics.mean(r['em'] for r in rows):.3f} |"
            )


if __name__ == "__main__":
    main()

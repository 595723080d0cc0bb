"""Time to first token and answer latency as a user feels them: the question to the first token,
through `db.generate` on a knowledge base on disk (embed the question, recall, read and decode
the memories, prefill, the first step), for none / text RAG / memory, per k and precision.

    python bench/bench_ttft.py                                   # README's knowledge base (300 summaries), built once
    python bench/bench_ttft.py --kb kb.m3db --precisions int4,fp32 --ks 1,5 --rounds 2
    python bench/bench_ttft.py --docs 10000 --kb big.m3db        # a ~10,000-memory knowledge base (a long build)

Every figure comes from `Answer.timings` (docs/knowledge.md): measured inside the one generation
path, so what this prints is what every surface pays. Modes are interleaved question by
question (the machine is shared and noisy: read the ratios, measured in the same run). Warm: the
knowledge base open, its decoded memories cached; cold: a fresh connection per question (the
decoded-memory cache empty; the OS page cache dropped too when this process may write
/proc/sys/vm/drop_caches, said in the output). The 64-token answer is forced to 64 tokens
(stop_tokens=[]), so modes compare equal work. Also printed: where memory's first token goes
(embed, search, read, prefill, the first step), so the next fix is aimed.
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import m3db  # noqa: E402
from m3db import sources  # noqa: E402

MODES = ("none", "rag", "memory")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} vCPUs, {simd}"


def drop_page_cache() -> bool:
    """Drop the OS page cache where this process may (root on Linux); False where it may not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def build(path, docs):
    if os.path.exists(path):
        return
    print(f"building {path} from {docs} Wikipedia summaries (once)...", flush=True)
    with m3db.connect(path) as db:
        db.add_documents(sources.wikipedia(limit=docs))


def questions_for(path, n):
    """n questions "What is TITLE known for?", titles spread over the knowledge base (words, not
    numbers: Wikipedia's summaries of "0" and "1" make odd questions)."""
    with m3db.connect(path, read_only=True) as db:
        every = [r[0] for r in db.sql("SELECT title FROM documents WHERE title IS NOT NULL ORDER BY id")]
    titles = [t for t in every if t[:1].isalpha()] or every
    step = max(1, len(titles) // n)
    return [f"What is {t} known for?" for t in titles[::step][:n]]


def ask(db, question, mode, k, max_tokens):
    options = {"memory": mode, "max_tokens": max_tokens, "stop_tokens": []}
    if mode != "none":
        options["k"] = k
    return db.generate(question, **options).timings


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kb = os.path.join("bench", "out", "ttft-kb.m3db")
    ap.add_argument("--kb", default=kb, help="the knowledge base (built once)")
    ap.add_argument("--docs", type=int, default=300, help="Wikipedia summaries to build it from")
    ap.add_argument("--questions", type=int, default=9)
    ap.add_argument("--precisions", default="int4,fp32")
    ap.add_argument("--ks", default="5,1")
    ap.add_argument("--rounds", type=int, default=1, help="times each question is asked per condition (warm)")
    ap.add_argument("--cold", type=int, default=3, help="questions asked cold per condition (0: none)")
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.kb)), exist_ok=True)
    build(args.kb, args.docs)
    questions = questions_for(args.kb, args.questions)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"CPU: {cpu_name()}; knowledge base {args.kb}; {len(questions)} questions, e.g. {questions[0]!r}")
    results = {}  # (precision, mode, k, warm|cold) -> {"first": [...], "answer": [...], "parts": [...]}

    def note(key, first, answer=None):
        entry = results.setdefault(key, {"first": [], "answer": [], "parts": []})
        entry["first"].append(first["first_token"])
        entry["parts"].append(first)
        if answer is not None:
            entry["answer"].append(answer["total"])

    for precision in args.precisions.split(","):
        with m3db.connect(args.kb, read_only=True, precision=precision) as db:
            ask(db, questions[0], "memory", ks[0], 2)  # loads the model, quantizes, warms the caches
            for _ in range(args.rounds):
                for q in questions:
                    for k in ks:
                        for mode in MODES if k == ks[0] else ("rag", "memory"):
                            first = ask(db, q, mode, k, 1)
                            answer = ask(db, q, mode, k, args.answer_tokens)
                            note((precision, mode, k if mode != "none" else 0, "warm"), first, answer)
        dropped = None
        for q in questions[: args.cold]:
            for mode in MODES:
                dropped = drop_page_cache()
                with m3db.connect(args.kb, read_only=True, precision=precision) as db:
                    note((precision, mode, ks[0] if mode != "none" else 0, "cold"), ask(db, q, mode, ks[0], 1))
        if args.cold:
            print(f"{precision}: cold = a fresh connection per question; page cache dropped: {bool(dropped)}")

    print(f"\nmedian milliseconds ({args.answer_tokens}-token answers forced to full length)")
    print(
        "| precision | k | when | none TTFT | RAG TTFT | memory TTFT | RAG / memory | memory / none "
        "| answer RAG / memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        for k in ks:
            for when in ("warm", "cold"):
                none = results.get((precision, "none", 0, when))
                rag = results.get((precision, "rag", k, when))
                mem = results.get((precision, "memory", k, when))
                if not (rag and mem):
                    continue
                n, r, m = (median(x["first"]) if x else float("nan") for x in (none, rag, mem))
                answer = median(rag["answer"]) / median(mem["answer"]) if rag["answer"] and mem["answer"] else None
                print(
                    f"| {precision} | {k} | {when} | {n:,.0f} | {r:,.0f} | {m:,.0f} | {r / m:.2f}x | {m / n:.2f}x | "
                    + (f"{answer:.2f}x |" if answer else "- |")
                )
    print("\nwhere memory's first token goes (median ms, warm)")
    print("| precision | k | embed | search | read | prefill | first step | TTFT |")
    print("|---|---|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        for k in ks:
            entry = results.get((precision, "memory", k, "warm"))
            if not entry:
                continue
            parts = entry["parts"]

            def part(name, parts=parts):
                return median([p.get(name, 0.0) for p in parts])

            step = median([p["first_token"] - p["recall"] - p["prefill"] for p in parts])
            print(
                f"| {precision} | {k} | {part('embed'):.1f} | {part('search'):.1f} | {part('read'):.1f} | "
                f"{part('prefill'):.1f} | {step:.1f} | {part('first_token'):.1f} |"
            )
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"\n({started}; the machine is shared: compare ratios from one run, not figures across runs)")


if __name__ == "__main__":
    main()

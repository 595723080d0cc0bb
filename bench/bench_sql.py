"""SQL benchmark: a filtered recall through db.sql() against the same recall through db.recall().

Builds a database of synthetic memories with bench_engine.py's generator (SmolLM2-shaped
records, 384-dim embeddings with topic structure, metadata `bucket` 0-99 and `lang`, 10% 'fr'),
then, for each filter, runs the same query vectors three ways, interleaved in one run (this
machine is shared and noisy): db.recall(), the filtered recall in SQL, and the same SQL with
an expression in its SELECT list, which sends the rows through DuckDB. It prints the median
and p90 latencies and the ratios to db.recall(). The target: SQL costs at most 1.5x the Python
API. All get the same k and filter, and see the per-commit filter cache warm, as a repeated
query does.

    python bench/bench_sql.py               # 100k memories (about two minutes)
    python bench/bench_sql.py --n 10000     # quick
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import bench_engine as engine  # noqa: E402  (its generator; bench_engine imports m3db)

import m3db  # noqa: E402

FILTERS = [
    # (name, SQL condition with ?, params) - selectivities 10%, 2% and 45%
    ("lang = 'fr'", "lang = ?", ["fr"]),
    ("bucket < 2", "bucket < ?", [2]),
    ("lang = 'en' AND bucket < 50", "lang = ? AND bucket < ?", ["en", 50]),
]


def build(path, n, batch=2000):
    rng = np.random.default_rng(1)
    pool = [
        rng.standard_normal((2, engine.LAYERS * engine.HEADS * engine.TOKENS * engine.HEAD_DIM)).astype(np.float32)
        for _ in range(64)
    ]
    db = m3db.connect(path, spec=engine.spec("int8"))
    t = time.perf_counter()
    added = 0
    while added < n:
        items, _ = engine.batch_items(rng, added, min(batch, n - added), pool)
        db.add_memories(items)
        added += len(items)
        if added % 20_000 == 0 or added == n:
            print(f"  built {added:,}/{n:,} memories ({time.perf_counter() - t:.0f} s)", flush=True)
    return db


def timed(fn, samples):
    t = time.perf_counter()
    out = fn()
    samples.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="memories")
    ap.add_argument("--queries", type=int, default=200, help="query vectors per filter")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--dir", default=None, help="where to build (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="m3db-bench-sql-", dir=args.dir)
    results = {"n": args.n, "k": args.k, "queries": args.queries, "filters": []}
    try:
        db = build(os.path.join(work, "kb"), args.n)
        queries = engine.embeddings(np.random.default_rng(7), args.queries)
        for name, condition, params in FILTERS:
            # the plain filtered recall (m3db answers it without a DuckDB round trip), and the same
            # recall with an expression DuckDB must compute (the rows go through DuckDB)
            sql = f"SELECT id, score, text FROM recall(?, k => {args.k}) WHERE {condition} ORDER BY score DESC"
            sql_duckdb = (
                f"SELECT id, score, upper(text) AS t FROM recall(?, k => {args.k}) "
                f"WHERE {condition} ORDER BY score DESC"
            )
            python_ms, sql_ms, duckdb_ms = [], [], []
            for q in queries[:5]:  # warm every path (filter cache, plan cache, DuckDB)
                db.recall(q, k=args.k, where=condition, params=params)
                db.sql(sql, [q, *params])
                db.sql(sql_duckdb, [q, *params])
            for i, q in enumerate(queries):
                # rotate which goes first, so none always runs on a warmer cache
                runs = [("py", python_ms), ("sql", sql_ms), ("duckdb", duckdb_ms)]
                for kind, samples in runs[i % 3 :] + runs[: i % 3]:
                    if kind == "py":
                        got_py = timed(lambda: db.recall(q, k=args.k, where=condition, params=params), samples)
                    elif kind == "sql":
                        got_sql = timed(lambda: db.sql(sql, [q, *params]), samples)
                    else:
                        got_duckdb = timed(lambda: db.sql(sql_duckdb, [q, *params]), samples)
                for path, got in (("SQL", got_sql), ("SQL through DuckDB", got_duckdb)):
                    if [r[0] for r in got] != got_py.ids:
                        raise SystemExit(
                            f"{path} and Python recalls differ for filter {name!r} (query {i}): "
                            f"{[(r[0], r[1]) for r in got]} vs {list(zip(got_py.ids, got_py.scores))}"
                        )
            plan = got_py.plan
            row = {"filter": name, "selectivity": round(plan.get("selectivity", 1.0), 4), "strategy": plan["strategy"]}
            for key, samples in (("python", python_ms), ("sql", sql_ms), ("sql_duckdb", duckdb_ms)):
                row[f"{key}_median_ms"] = round(float(np.median(samples)) * 1000, 3)
                row[f"{key}_p90_ms"] = round(float(np.percentile(samples, 90)) * 1000, 3)
            row["ratio"] = round(row["sql_median_ms"] / row["python_median_ms"], 2)
            row["ratio_duckdb"] = round(row["sql_duckdb_median_ms"] / row["python_median_ms"], 2)
            results["filters"].append(row)
            print(
                f"{name:<28} selectivity {row['selectivity']:>6.1%} {row['strategy']:<10} "
                f"python {row['python_median_ms']:.3f} ms  sql {row['sql_median_ms']:.3f} ms ({row['ratio']:.2f}x)  "
                f"sql through DuckDB {row['sql_duckdb_median_ms']:.3f} ms ({row['ratio_duckdb']:.2f}x)   "
                f"p90: {row['python_p90_ms']:.3f} / {row['sql_p90_ms']:.3f} / {row['sql_duckdb_p90_ms']:.3f} ms",
                flush=True,
            )
        results["worst_ratio"] = max(r["ratio"] for r in results["filters"])
        results["worst_ratio_duckdb"] = max(r["ratio_duckdb"] for r in results["filters"])
        print(
            f"worst SQL/Python ratio (medians): {results['worst_ratio']:.2f}x (target <= 1.5x); through DuckDB "
            f"{results['worst_ratio_duckdb']:.2f}x; {args.n:,} memories, k = {args.k}"
        )
        db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

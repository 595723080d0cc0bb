"""Server benchmark: what batching buys, latency, and what HTTP costs, measured in one run.

A knowledge base of Wikipedia summaries built with the bundled model (SmolLM2-135M-Instruct,
MiniLM) is served by a real `m3db serve` process; the same chat requests (greedy, memory
mode, `--max-tokens` new tokens) are sent
- one at a time, by one client;
- by `--clients` concurrent clients, each sending its requests back to back;
and, with the server idle, decoded in this process by `db.generate` (no HTTP). Printed:
aggregate generated tokens/s concurrent vs one at a time (the batcher's gain), p50/p95
latency of each, and HTTP's overhead over in-process generation (same requests, same tokens).
With `--replicas 1,2`, then, for each N, `m3db serve --ray --replicas N` (a local Ray instance,
each replica loading the model itself) gets the same concurrent requests: aggregate tokens/s,
its ratio to the plain server's concurrent tokens/s, and whether the answers are the same.
The machine is shared and noisy: every figure is a ratio measured in the same run.

    python bench/bench_server.py                          # 8 clients, 64 tokens (a few minutes)
    python bench/bench_server.py --clients 4 --rounds 1   # quicker
    python bench/bench_server.py --replicas 1,2           # and Ray Serve replicas (needs m3db[ray])
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import m3db  # noqa: E402
from m3db import sources  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

QUESTIONS = [
    "Where is the Akashi Kaikyo Bridge?",
    "What is Aachen known for?",
    "Who was Aaron in the Bible?",
    "What is an abacus used for?",
    "Tell me about the Aare river.",
    "What does ABBA sing?",
    "Where is Aberdeen?",
    "What is abstract art?",
    "Who was Abraham Lincoln?",
    "What is acid rain?",
    "Describe the Academy Awards.",
    "What is an accordion?",
]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def body(question, max_tokens):
    return {
        "model": "kb",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def timed_post(c, question, max_tokens):
    """One chat request on client c (an httpx.Client kept open, as an application keeps its
    OpenAI client): (seconds, completion tokens, text)."""
    t0 = time.perf_counter()
    r = c.post("/v1/chat/completions", json=body(question, max_tokens))
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    out = r.json()
    return elapsed, out["usage"]["completion_tokens"], out["choices"][0]["message"]["content"]


def concurrent_phase(clients, questions, max_tokens):
    """Every client at once, each sending its share of the questions back to back: the results
    (client by client, in order) and the wall time."""
    shares = [questions[i :: len(clients)] for i in range(len(clients))]
    start = threading.Barrier(len(clients))

    def client(c, share):
        start.wait()
        return [timed_post(c, q, max_tokens) for q in share]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        together = [r for rs in pool.map(client, clients, shares) for r in rs]
    return together, time.perf_counter() - t0


def warm_replicas(clients, replicas, seconds=600):
    """Warm-up requests from every client at once until `replicas` processes have generated
    (each replica loads the model on its first request, and Serve's router picks the replica,
    so one round may miss one). /v1/server names the answering process ("pid") and how many
    batches it has generated."""
    deadline = time.monotonic() + seconds
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        while True:
            list(pool.map(lambda c: timed_post(c, "Warm up.", 2), clients))
            states = [c.get("/v1/server").json() for c in clients for _ in range(4)]
            warm = {s["pid"] for s in states if s["generation"]["batches"] > 0}
            if len(warm) >= replicas:
                return warm
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(warm)} of {replicas} replicas warm within {seconds} s")


def run_replicas(path, replicas, questions, args):
    """`m3db serve PATH --ray --replicas N` on a local Ray instance of its own (no --ray-address:
    the command starts one, and stops it on SIGTERM), warmed up, then the concurrent phase:
    (results, wall time)."""
    server = ServerProcess(
        [path], "--ray", "--replicas", str(replicas), "--name", "kb", "--max-batch", str(args.clients), timeout=300
    )
    try:
        # /health answers once one replica is up; the command prints this once all of them are
        deadline = time.monotonic() + 300
        while "replicas on Ray Serve; read-only" not in server.output():
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{replicas} replicas did not start:\n{server.output()}")
            time.sleep(1)
        clients = [server.client(timeout=600) for _ in range(args.clients)]
        warm_replicas(clients, replicas)
        together, wall = concurrent_phase(clients, questions, args.max_tokens)
        for c in clients:
            c.close()
    finally:
        server.stop(timeout=120)  # Ray takes the deployment down and stops its local instance
        server.close()
    return together, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per answer (default 64)")
    ap.add_argument("--docs", type=int, default=40, help="Wikipedia summaries in the knowledge base")
    ap.add_argument("--kb", help="an existing knowledge base built with the bundled model (else one is built)")
    ap.add_argument(
        "--replicas",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[],
        help="then Ray Serve replicas: a comma list of replica counts, e.g. 1,2 (default: none)",
    )
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="m3db-bench-server-")
    path = args.kb or os.path.join(tmp, "kb.m3db")
    if not args.kb:
        t0 = time.perf_counter()
        with m3db.connect(path) as db:
            db.add_documents(sources.wikipedia(limit=args.docs), progress=False)
            print(f"built {len(db)} memories from {args.docs} documents in {time.perf_counter() - t0:.0f} s")
    n = args.clients * args.rounds
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]

    server = ServerProcess([path], "--name", "kb", "--max-batch", str(args.clients), timeout=300)
    try:
        clients = [server.client(timeout=600) for _ in range(args.clients)]
        for c in clients:  # the model loads on first use; every client's connection opens
            timed_post(c, "Warm up.", 2)
        before = clients[0].get("/v1/server").json()["generation"]
        # one client, one request at a time
        t0 = time.perf_counter()
        serial = [timed_post(clients[0], q, args.max_tokens) for q in questions]
        serial_wall = time.perf_counter() - t0
        # `clients` clients at once, each sending its share back to back
        middle = clients[0].get("/v1/server").json()["generation"]
        together, together_wall = concurrent_phase(clients, questions, args.max_tokens)
        stats = clients[0].get("/v1/server").json()["generation"]
        for c in clients:
            c.close()
    finally:
        server.stop()
        server.close()

    # the same requests in this process, the server gone (the CPUs are this process's alone)
    with m3db.connect(path, read_only=True) as db:
        db.generate(QUESTIONS[0], max_tokens=4)  # load the model
        t0 = time.perf_counter()
        inproc = []
        for q in questions:
            s = time.perf_counter()
            a = db.generate([{"role": "user", "content": q}], max_tokens=args.max_tokens)
            inproc.append((time.perf_counter() - s, a.text))
        inproc_wall = time.perf_counter() - t0

    serial_tokens = sum(t for _, t, _ in serial)
    together_tokens = sum(t for _, t, _ in together)
    same = sum(a == b for (_, _, a), (_, b) in zip(serial, inproc))
    lat_serial = [e for e, _, _ in serial]
    lat_together = [e for e, _, _ in together]
    figures = {
        "requests": n,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "tokens_per_s_one_at_a_time": round(serial_tokens / serial_wall, 2),
        "tokens_per_s_concurrent": round(together_tokens / together_wall, 2),
        "batching_gain": round((together_tokens / together_wall) / (serial_tokens / serial_wall), 2),
        "latency_one_at_a_time_p50_s": round(statistics.median(lat_serial), 3),
        "latency_one_at_a_time_p95_s": round(percentile(lat_serial, 0.95), 3),
        "latency_concurrent_p50_s": round(statistics.median(lat_together), 3),
        "latency_concurrent_p95_s": round(percentile(lat_together, 0.95), 3),
        "in_process_s_per_request": round(inproc_wall / n, 3),
        "http_s_per_request": round(serial_wall / n, 3),
        "http_overhead": round(serial_wall / inproc_wall - 1, 4),
        "answers_equal_to_in_process": f"{same}/{n}",
        "batches_one_at_a_time": middle["batches"] - before["batches"],
        "batches_concurrent": stats["batches"] - middle["batches"],
        "largest_batch": stats["largest_batch"],
    }
    # each N against the plain server's concurrent phase in this run (same requests, clients,
    # tokens): on a machine of few cores the replicas share its cores, so the ratio measures
    # Ray Serve's overhead there, and the scaling only where each replica has cores of its own
    for replicas in args.replicas:
        results, wall = run_replicas(path, replicas, questions, args)
        tokens_per_s = sum(t for _, t, _ in results) / wall
        same = sum(a == b for (_, _, a), (_, _, b) in zip(results, together))
        figures[f"tokens_per_s_replicas_{replicas}"] = round(tokens_per_s, 2)
        figures[f"replicas_{replicas}_vs_plain"] = round(tokens_per_s / (together_tokens / together_wall), 2)
        figures[f"replicas_{replicas}_answers_equal_to_plain"] = f"{same}/{n}"
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Soak test: a real `m3db serve --write` process under steady mixed load for `--minutes`.

A knowledge base of Wikipedia summaries built with the bundled model (or `--kb`, reused and
written to) is served with an API key, and client threads send, at modest rates (the point is
steady load over time, not throughput):
- chat completions with memory (8-16 new tokens, a third streamed);
- /v1/memories/search, half of them with a `where` filter;
- /v1/sql statements (counts, joins, recall());
- POST /v1/documents with unique sources (every source answered 2xx is recorded);
- disconnects: a streaming chat closed after its first event, or a document POST closed
  before its answer.
Every `--every` seconds the server process is sampled (RSS, open file descriptors and threads
from /proc) with the p50/p99 latency per request kind and the 2xx/4xx/5xx counts of that window;
a 5xx, a timeout or a broken connection is printed as a finding. At the end the server is
stopped with SIGTERM, the knowledge base reopened read-only: every acknowledged document must be
there and check() clean. Printed: the samples, the first and last windows compared (ten minutes
each, or a third of a shorter run); written: the samples as JSON (`--out`) and a plot (`--plot`;
an ASCII sparkline table when matplotlib is missing).

    OMP_NUM_THREADS=1 python bench/bench_soak.py --minutes 60 --out soak.json
    python bench/bench_soak.py --minutes 3 --kb kb.m3db          # a quick run on a built base
"""

import argparse
import json
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import httpx  # noqa: E402
from bench_server import QUESTIONS, percentile  # noqa: E402

import m3db  # noqa: E402
from m3db import sources  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

KINDS = ["chat", "chat_stream", "search", "search_where", "sql", "documents", "disconnect"]
SQL = [
    ("SELECT count(*) FROM memories", None),
    ("SELECT count(*) FROM documents WHERE source LIKE ?", ["soak/%"]),
    (
        "SELECT d.title, count(*) AS n FROM documents d JOIN memories m ON m.document_id = d.id "
        "GROUP BY ALL ORDER BY n DESC LIMIT 5",
        None,
    ),
    ("SELECT r.id, d.title FROM recall(?, k => 3) r JOIN documents d ON d.id = r.document_id", ["a river in Europe"]),
    ("SELECT topic, count(*) FROM memories GROUP BY topic ORDER BY 2 DESC LIMIT 10", None),
]
SEARCHES = ["suspension bridge", "a river in Switzerland", "a musical instrument", "a band from Sweden", "a city"]


class Recorder:
    """Every request's (time, kind, seconds, status); status is the HTTP code or 'timeout'/'error'."""

    def __init__(self, t0):
        self.t0 = t0
        self.lock = threading.Lock()
        self.events = []
        self.findings = []
        self.acknowledged = {}  # source -> memory ids, from 2xx answers of POST /v1/documents
        self.maybe = []  # sources of document POSTs closed before their answer

    def add(self, kind, seconds, status, detail=None):
        t = time.monotonic() - self.t0
        with self.lock:
            self.events.append((t, kind, seconds, status))
            if not (isinstance(status, int) and status < 500) and not (kind == "disconnect" and status == "closed"):
                finding = {"t": round(t, 1), "kind": kind, "status": status, "detail": (detail or "")[:500]}
                self.findings.append(finding)
                print(f"FINDING t={t:.0f}s {kind}: {status} {finding['detail']}", flush=True)


def timed(rec, kind, fn):
    """Run fn() -> (status, detail); record it with its latency."""
    s = time.perf_counter()
    try:
        status, detail = fn()
    except httpx.TimeoutException as e:
        status, detail = "timeout", repr(e)
    except httpx.HTTPError as e:
        status, detail = "error", repr(e)
    rec.add(kind, time.perf_counter() - s, status, detail)
    return status


def chat_body(rng, stream):
    return {
        "model": "kb",
        "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
        "max_tokens": rng.randint(8, 16),
        "temperature": 0,
        "stream": stream,
    }


def chat_worker(server, rec, stop, seed, pause):
    rng = random.Random(seed)
    with server.client(timeout=120) as c:
        while not stop.is_set():
            if rng.random() < 1 / 3:

                def streamed():
                    with c.stream("POST", "/v1/chat/completions", json=chat_body(rng, True)) as r:
                        if r.status_code >= 300:
                            return r.status_code, r.read().decode(errors="replace")
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                        if not lines or lines[-1] != "data: [DONE]":
                            return "error", f"stream ended without [DONE]: {lines[-2:]}"
                        return r.status_code, None

                timed(rec, "chat_stream", streamed)
            else:

                def plain():
                    r = c.post("/v1/chat/completions", json=chat_body(rng, False))
                    return r.status_code, r.text if r.status_code >= 300 else None

                timed(rec, "chat", plain)
            stop.wait(rng.uniform(*pause))


def search_worker(server, rec, stop, seed, topics):
    rng = random.Random(seed)
    with server.client(timeout=120) as c:
        while not stop.is_set():
            body = {"query": rng.choice(SEARCHES), "k": rng.randint(1, 5)}
            kind = "search"
            if topics and rng.random() < 0.5:
                body |= {"where": "topic = ?", "params": [rng.choice(topics)]}
                kind = "search_where"

            def search():
                r = c.post("/v1/memories/search", json=body)
                return r.status_code, r.text if r.status_code >= 300 else None

            timed(rec, kind, search)
            stop.wait(rng.uniform(0.5, 1.5))


def sql_worker(server, rec, stop, seed):
    rng = random.Random(seed)
    with server.client(timeout=120) as c:
        while not stop.is_set():
            query, params = rng.choice(SQL)

            def sql():
                r = c.post("/v1/sql", json={"query": query} | ({"params": params} if params else {}))
                return r.status_code, r.text if r.status_code >= 300 else None

            timed(rec, "sql", sql)
            stop.wait(rng.uniform(1.0, 3.0))


def document(run, n, rng, paragraphs=1):
    """A unique document of invented facts (new to the model): one paragraph is one or two
    chunks."""
    place = f"Vell-{run}-{n}"
    facts = []
    for _ in range(paragraphs):
        facts += [
            f"{place} is a town on the river Orsk, founded in {rng.randint(1100, 1900)}.",
            f"Its mayor is {rng.choice(['Ana', 'Bo', 'Cleo', 'Dag', 'Eli'])} {rng.choice(['Marr', 'Tove', 'Quill'])}.",
            f"It is known for {rng.choice(['glass', 'cheese', 'clocks', 'boats', 'wool'])} and has "
            f"{rng.randint(2, 90) * 1000} inhabitants.",
        ]
    return {"text": " ".join(facts), "source": f"soak/{run}/{n}", "title": place, "metadata": {"topic": "Soak"}}


def documents_worker(server, rec, stop, seed, run, pause):
    rng = random.Random(seed)
    n = 0
    with server.client(timeout=300) as c:
        while not stop.is_set():
            docs = []
            for _ in range(rng.randint(1, 2)):
                docs.append(document(run, n, rng))
                n += 1

            def add():
                r = c.post("/v1/documents", json={"documents": docs})
                if r.status_code < 300:
                    with rec.lock:
                        for d in r.json()["data"]:
                            rec.acknowledged[d["source"]] = d["memory_ids"]
                    return r.status_code, None
                return r.status_code, r.text

            timed(rec, "documents", add)
            stop.wait(rng.uniform(*pause))


def disconnect_worker(server, rec, stop, seed, run, pause):
    """A client that goes away early: a streaming chat closed after its first event, or a POST of a
    long document (about 10 chunks) given up 0.2-1.5 s in, while the server embeds or encodes
    it: its ingest should stop at its next stop point, storing nothing. Each on its own
    connection, closed."""
    rng = random.Random(seed)
    n = 0
    while not stop.wait(rng.uniform(*pause)):
        if rng.random() < 0.5:

            def stream_then_close():
                with server.client(timeout=120) as c:
                    with c.stream("POST", "/v1/chat/completions", json=chat_body(rng, True)) as r:
                        if r.status_code >= 300:
                            return r.status_code, r.read().decode(errors="replace")
                        for line in r.iter_lines():
                            if line.startswith("data: "):
                                break
                return "closed", None

            timed(rec, "disconnect", stream_then_close)
        else:
            doc = document(run, f"gone-{n}", rng, paragraphs=20)
            n += 1
            patience = rng.uniform(0.2, 1.5)

            def post_then_close():
                with server.client(timeout=httpx.Timeout(30, read=patience)) as c:
                    try:
                        r = c.post("/v1/documents", json={"documents": [doc]})
                    except httpx.ReadTimeout:
                        with rec.lock:
                            rec.maybe.append(doc["source"])
                        return "closed", None
                    if r.status_code < 300:  # answered in time: acknowledged after all
                        with rec.lock:
                            for d in r.json()["data"]:
                                rec.acknowledged[d["source"]] = d["memory_ids"]
                    return r.status_code, r.text if r.status_code >= 300 else None

            timed(rec, "disconnect", post_then_close)


def proc_status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()

    def mb(key):
        return round(int(fields[key].split()[0]) / 1024, 1) if key in fields else None

    return {
        "rss_mb": mb("VmRSS"),
        "rss_anon_mb": mb("RssAnon"),  # the heap: what a leak grows
        "rss_file_mb": mb("RssFile"),  # mapped files read (the segments' mmaps): page cache, bounded by their size
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


def latency_summary(events):
    """{kind: {n, p50, p99}} over (t, kind, seconds, status) events answered 2xx."""
    out = {}
    for kind in KINDS:
        lat = [s for _, k, s, st in events if k == kind and (st == "closed" or (isinstance(st, int) and st < 300))]
        if lat:
            out[kind] = {"n": len(lat), "p50": round(percentile(lat, 0.5), 3), "p99": round(percentile(lat, 0.99), 3)}
    return out


def status_counts(events):
    counts = {"2xx": 0, "4xx": 0, "5xx": 0, "other": 0}
    for _, _, _, st in events:
        if isinstance(st, int):
            counts[f"{st // 100}xx" if st // 100 in (2, 4, 5) else "other"] += 1
        elif st != "closed":
            counts["other"] += 1
    return counts


def sample(server, rec, since, until):
    with rec.lock:
        window = [e for e in rec.events if since <= e[0] < until]
    s = {"t": round(until, 1), **proc_status(server.proc.pid)}
    s["status"] = status_counts(window)
    s["closed_early"] = sum(1 for e in window if e[3] == "closed")
    s["latency"] = latency_summary(window)
    try:
        with server.client(timeout=30) as c:
            info = c.get("/v1/server").json()
        g = info["generation"]
        s["generation"] = {k: g.get(k) for k in ("requests", "batches", "cancelled", "queued", "running")}
        s["sql"] = {k: info["sql"].get(k) for k in ("statements", "cancelled", "running", "waiting")}
    except (httpx.HTTPError, KeyError, ValueError) as e:
        rec.add("server_info", 0.0, "error", repr(e))
    try:  # the decoded-memory cache (a server with /metrics): misses are memories decoded into it
        with server.client(timeout=30) as c:
            r = c.get("/metrics")
        if r.status_code == 200:
            for line in r.text.splitlines():
                for name in ("hits", "misses"):
                    if line.startswith(f"m3db_memory_cache_{name}_total"):
                        s.setdefault("cache", {})[name] = int(float(line.split()[-1]))
    except httpx.HTTPError:
        pass
    return s


def row(s):
    lat = s["latency"]

    def p(kind, q):
        return f"{lat[kind][q]:.2f}" if kind in lat else "-"

    st = s["status"]
    return (
        f"{s['t'] / 60:6.1f} {s['rss_mb']:8.1f} {s.get('rss_anon_mb') or '-':>6} {s.get('rss_file_mb') or '-':>6} "
        f"{s['fds']:4d} {s['threads']:4d} "
        f"{st['2xx']:5d} {st['4xx']:4d} {st['5xx']:4d} {st['other']:4d} {s['closed_early']:4d} "
        + " ".join(f"{p(k, 'p50'):>5}/{p(k, 'p99'):>5}" for k in KINDS[:-1])
    )


HEADER = (
    f"{'min':>6} {'rss MB':>8} {'anon':>6} {'file':>6} {'fds':>4} {'thr':>4} "
    f"{'2xx':>5} {'4xx':>4} {'5xx':>4} {'oth':>4} {'gone':>4} "
    + " ".join(f"{k[:11]:>11}" for k in KINDS[:-1])
    + "   (latency p50/p99 s)"
)


def verdict(samples, events, span):
    """The first and last `span` seconds compared: RSS (mean of the samples), fds and threads
    (the last sample of each), p99 per kind over all requests of each span."""
    end = samples[-1]["t"]
    first = [s for s in samples if s["t"] <= span]
    last = [s for s in samples if s["t"] > end - span]
    ev_first = [e for e in events if e[0] < span]
    ev_last = [e for e in events if e[0] >= end - span]
    rss0 = statistics.mean(s["rss_mb"] for s in first)
    rss1 = statistics.mean(s["rss_mb"] for s in last)
    split = {}
    for key in ("rss_anon_mb", "rss_file_mb"):
        if all(s.get(key) is not None for s in first + last):
            split[key + "_first"] = round(statistics.mean(s[key] for s in first), 1)
            split[key + "_last"] = round(statistics.mean(s[key] for s in last), 1)
    lat0, lat1 = latency_summary(ev_first), latency_summary(ev_last)
    p99 = {}
    for kind in KINDS:
        if kind in lat0 and kind in lat1:
            p99[kind] = {
                "first": lat0[kind]["p99"],
                "last": lat1[kind]["p99"],
                "ratio": round(lat1[kind]["p99"] / lat0[kind]["p99"], 2),
            }
    return {
        "span_minutes": round(span / 60, 1),
        "rss_mb_first": round(rss0, 1),
        "rss_mb_last": round(rss1, 1),
        "rss_growth_mb": round(rss1 - rss0, 1),
        "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 1),
        "rss_mb_max": max(s["rss_mb"] for s in samples),
        **split,
        "fds_first": first[-1]["fds"],
        "fds_last": last[-1]["fds"],
        "fds_max": max(s["fds"] for s in samples),
        "threads_first": first[-1]["threads"],
        "threads_last": last[-1]["threads"],
        "threads_max": max(s["threads"] for s in samples),
        "p99_s": p99,
        "requests_first": len(ev_first),
        "requests_last": len(ev_last),
    }


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values, width=60):
    values = [v for v in values if v is not None]
    if not values:
        return ""
    step = max(1, len(values) // width)
    values = [max(values[i : i + step]) for i in range(0, len(values), step)]
    lo, hi = min(values), max(values)
    return "".join(SPARK[int((v - lo) / (hi - lo) * (len(SPARK) - 1)) if hi > lo else 0] for v in values)


def plot(samples, path, span):
    """A PNG of RSS, fds, threads and p99 per kind over time; else an ASCII sparkline table (returned)."""
    t = [s["t"] / 60 for s in samples]
    series = {
        "RSS (MB)": [s["rss_mb"] for s in samples],
        "open fds": [s["fds"] for s in samples],
        "threads": [s["threads"] for s in samples],
    }
    p99 = {k: [s["latency"].get(k, {}).get("p99") for s in samples] for k in KINDS[:-1]}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines = [f"{name:>16} {min(v):>8} .. {max(v):<8} {sparkline(v)}" for name, v in series.items()]
        for k, v in p99.items():
            vals = [x for x in v if x is not None]
            if vals:
                lines.append(f"{'p99 ' + k:>16} {min(vals):>8} .. {max(vals):<8} {sparkline(vals)}")
        return "\n".join(lines)
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    for ax in axes:  # the spans the verdict compares
        ax.axvspan(0, span / 60, color="0.9")
        ax.axvspan(t[-1] - span / 60, t[-1], color="0.9")
    for ax, (name, v) in zip(axes, series.items()):
        ax.plot(t, v, marker=".", lw=1, label="total" if ax is axes[0] else None)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    for k, v in p99.items():
        pts = [(x, y) for x, y in zip(t, v) if y is not None]
        if pts:
            axes[3].plot(*zip(*pts), marker=".", lw=1, label=k)
    for key, label in (("rss_anon_mb", "anon (heap)"), ("rss_file_mb", "file (mapped segments)")):
        if all(s.get(key) is not None for s in samples):
            axes[0].plot(t, [s[key] for s in samples], marker=".", lw=1, label=label)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8, ncol=3, loc="center left")
    axes[3].set_yscale("log")
    top = max(y for v in p99.values() for y in v if y is not None)
    axes[3].set_ylim(top=top * 30)  # room above the curves for the legend
    axes[3].set_ylabel("p99 latency (s)")
    axes[3].legend(fontsize=8, ncol=6, loc="upper left")
    axes[3].grid(alpha=0.3)
    axes[3].set_xlabel("minutes")
    fig.suptitle("m3db serve --write under mixed load (30 s windows; shaded: the spans compared)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60, help="how long to load the server (default 60)")
    ap.add_argument("--kb", help="an existing knowledge base built with the bundled model (reused, and written to)")
    ap.add_argument("--docs", type=int, default=300, help="Wikipedia summaries when building (default 300)")
    ap.add_argument("--every", type=float, default=30, help="seconds between samples (default 30)")
    ap.add_argument("--chat-clients", type=int, default=2, help="chat client threads (default 2)")
    ap.add_argument("--chat-pause", type=float, nargs=2, default=(1.0, 3.0), help="seconds between chats")
    ap.add_argument("--doc-pause", type=float, nargs=2, default=(15.0, 25.0), help="seconds between document adds")
    ap.add_argument("--gone-pause", type=float, nargs=2, default=(15.0, 30.0), help="seconds between disconnects")
    ap.add_argument("--out", default="soak.json", help="the samples as JSON (default soak.json)")
    ap.add_argument("--plot", default="docs/images/soak.png", help="the PNG plot (default docs/images/soak.png)")
    ap.add_argument("--server-log", help="keep the server's log in this file")
    ap.add_argument("--replot", metavar="JSON", help="only draw --plot again from the samples of an earlier --out")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot) as f:
            done = json.load(f)
        plot(done["samples"], args.plot, done["verdict"]["span_minutes"] * 60)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the server (finally below)

    path = args.kb or os.path.join(tempfile.mkdtemp(prefix="m3db-bench-soak-"), "kb.m3db")
    if not args.kb:
        t0 = time.perf_counter()
        with m3db.connect(path) as db:
            db.add_documents(sources.wikipedia(limit=args.docs), progress=False)
            print(
                f"built {len(db)} memories from {args.docs} documents in {time.perf_counter() - t0:.0f} s", flush=True
            )
    run = secrets.token_hex(4)
    key = secrets.token_urlsafe(24)
    server = ServerProcess([path], "--name", "kb", "--write", api_key=key, timeout=300)
    print(f"server pid {server.proc.pid} on {server.url}; run id {run}", flush=True)
    stop = threading.Event()
    try:
        with server.client(timeout=300) as c:
            c.post(
                "/v1/chat/completions",
                json={"model": "kb", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            ).json()
            rows = c.post("/v1/sql", json={"query": "SELECT DISTINCT topic FROM memories WHERE topic IS NOT NULL"})
            topics = sorted(r[0] for r in rows.json()["rows"] if r[0] != "Soak")
            memories0 = c.post("/v1/sql", json={"query": "SELECT count(*) FROM memories"}).json()["rows"][0][0]
        print(f"{memories0} memories; topics for filters: {topics[:8]}", flush=True)
        t0 = time.monotonic()
        rec = Recorder(t0)
        workers = [
            threading.Thread(target=chat_worker, args=(server, rec, stop, i, args.chat_pause), daemon=True)
            for i in range(args.chat_clients)
        ]
        workers += [
            threading.Thread(target=search_worker, args=(server, rec, stop, 100, topics), daemon=True),
            threading.Thread(target=sql_worker, args=(server, rec, stop, 200), daemon=True),
            threading.Thread(target=documents_worker, args=(server, rec, stop, 300, run, args.doc_pause), daemon=True),
            threading.Thread(
                target=disconnect_worker, args=(server, rec, stop, 400, run, args.gone_pause), daemon=True
            ),
        ]
        for w in workers:
            w.start()
        samples = []
        duration = args.minutes * 60
        print(HEADER, flush=True)
        since = 0.0
        while True:
            until = min(since + args.every, duration)
            time.sleep(max(0.0, t0 + until - time.monotonic()))
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {server.proc.returncode}:\n{server.output()[-4000:]}")
            samples.append(sample(server, rec, since, until))
            print(row(samples[-1]), flush=True)
            since = until
            if until >= duration:
                break
        stop.set()
        for w in workers:
            w.join(timeout=300)
        hung = [w.name for w in workers if w.is_alive()]
        if hung:
            rec.findings.append({"t": None, "kind": "client", "status": "hang", "detail": f"threads {hung}"})
            print(f"FINDING client threads still waiting after 300 s: {hung}", flush=True)
        t_stop = time.perf_counter()
        code = server.stop(signal.SIGTERM, timeout=60)
        stop_s = time.perf_counter() - t_stop
        log = server.output()
        if args.server_log:
            with open(args.server_log, "w") as f:
                f.write(log)
    finally:
        stop.set()
        server.close()

    # the knowledge base reopened by this process: every acknowledged write is there, check() is clean
    with m3db.connect(path, read_only=True) as db:
        stored = {r[0] for r in db.sql("SELECT source FROM documents WHERE source LIKE ?", [f"soak/{run}/%"])}
        ids = sorted(i for m in rec.acknowledged.values() for i in m)
        present_ids = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT id FROM memories WHERE id IN ({','.join('?' * len(chunk))})"
            present_ids |= {r[0] for r in db.sql(q, chunk)}
        report = db.check()
        memories1 = len(db)
    acked = set(rec.acknowledged)
    missing = sorted(acked - stored)
    missing_ids = sorted(set(ids) - present_ids)
    maybe_stored = sum(s in stored for s in rec.maybe)
    unexpected = sorted(stored - acked - set(rec.maybe))
    log_lines = log.splitlines()
    tracebacks = [i for i, line in enumerate(log_lines) if "Traceback" in line]
    errors = [line for line in log_lines if " ERROR " in line or line.startswith("ERROR")]
    stopped_ingests = sum("was stopped before its commit" in line for line in log_lines)
    final = {
        "exit_code": code,
        "stop_seconds": round(stop_s, 2),
        "memories_before": memories0,
        "memories_after": memories1,
        "acknowledged_documents": len(acked),
        "acknowledged_present": len(acked) - len(missing),
        "missing_sources": missing[:20],
        "acknowledged_memory_ids": len(ids),
        "missing_memory_ids": missing_ids[:20],
        "disconnected_posts": len(rec.maybe),
        "disconnected_posts_stored": maybe_stored,
        "unexpected_sources": unexpected[:20],
        "check_ok": report.ok,
        "check_checked": report.checked,
        "check_problems": [str(p) for p in report.problems[:20]],
        "server_log_tracebacks": len(tracebacks),
        "server_log_errors": errors[:20],
        "server_log_stopped_ingests": stopped_ingests,
    }
    for i in tracebacks[:3]:
        print("server log:\n" + "\n".join(log_lines[max(0, i - 2) : i + 30]))

    span = min(600.0, duration / 3)
    v = verdict(samples, rec.events, span)
    totals = status_counts(rec.events)
    result = {
        "config": {
            "minutes": args.minutes,
            "every_s": args.every,
            "chat_clients": args.chat_clients,
            "chat_pause_s": list(args.chat_pause),
            "doc_pause_s": list(args.doc_pause),
            "gone_pause_s": list(args.gone_pause),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "totals": totals | {"requests": len(rec.events), "closed_early": sum(e[3] == "closed" for e in rec.events)},
        "per_kind": latency_summary(rec.events),
        "findings": rec.findings,
        "verdict": v,
        "final": final,
        "samples": samples,
    }
    art = plot(samples, args.plot, span)
    if art:
        result["sparklines"] = art
        print(art)
    else:
        print(f"plot written to {args.plot}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print("\ntotals:", json.dumps(result["totals"]))
    print("per kind (whole run):", json.dumps(result["per_kind"]))
    print(f"\nfirst {v['span_minutes']} min vs last {v['span_minutes']} min:")
    print(
        f"  RSS      {v['rss_mb_first']} MB -> {v['rss_mb_last']} MB: {v['rss_growth_mb']:+} MB "
        f"({v['rss_growth_pct']:+}%), max {v['rss_mb_max']} MB"
    )
    if "rss_anon_mb_first" in v:
        print(
            f"    of it  anon (heap) {v['rss_anon_mb_first']} -> {v['rss_anon_mb_last']} MB, "
            f"file (mapped segments) {v['rss_file_mb_first']} -> {v['rss_file_mb_last']} MB"
        )
    print(f"  fds      {v['fds_first']} -> {v['fds_last']} (max {v['fds_max']})")
    print(f"  threads  {v['threads_first']} -> {v['threads_last']} (max {v['threads_max']})")
    for kind, p in v["p99_s"].items():
        print(f"  p99 {kind:13} {p['first']:.3f} s -> {p['last']:.3f} s (x{p['ratio']})")
    print(f"\n5xx: {totals['5xx']}; timeouts/errors: {totals['other']}; findings: {len(rec.findings)}")
    print(
        f"server: exit {code} {stop_s:.1f} s after SIGTERM; acknowledged documents present "
        f"{final['acknowledged_present']}/{len(acked)} (memory ids {len(ids) - len(missing_ids)}/{len(ids)}); "
        f"disconnected posts stored {maybe_stored}/{len(rec.maybe)}; unexpected sources {len(unexpected)}; "
        f"check() ok={report.ok} ({report.checked} memories); server log: {len(tracebacks)} tracebacks, "
        f"{stopped_ingests} ingests stopped before their commit"
    )
    ok = not missing and not missing_ids and report.ok and totals["5xx"] == 0 and code == 0 and not rec.findings
    print("verdict:", "clean" if ok else "FINDINGS (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""GET /metrics: what an operator watches, in Prometheus's text format (prometheus-client).

Requests and their latency by endpoint (the route's template, never the raw path: a label per
memory id would grow without bound) and status, 401s and 429s included; per answer, recall,
time to first token and decode seconds, memories read and tokens generated (from
Answer.timings, the one generation path's own measure); and, read when scraped, the queue, the
refusals, the decoded-memory cache's hits and misses and the memories held. Every series is
labelled with the knowledge base; none with an API key. A server of several knowledge bases
(tenants.py) keeps one Metrics for all of them: the router names each request's knowledge base
in its scope ("m3db.kb"), and a request refused before it was routed (a 401) is labelled "".

The registry is the app's own (not prometheus-client's global one), so two apps in one process
never share or collide. /metrics needs the API key like every endpoint, unless the server
opens it (`m3db serve --public-metrics`: a scraper without the key; the figures name no key,
memory or document).
"""

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COUNTS = (0, 1, 2, 3, 5, 10, 20, 50)
UNMATCHED = "unmatched"  # the endpoint label of a path no route serves (a 404)


class Metrics:
    """The app's metrics: `serve` each knowledge base, `observe_answer` from its batcher, `asgi`
    around the app, `endpoint`."""

    def __init__(self, routes):
        self.routes = routes
        self.served: list = []  # (kb, batcher) of each knowledge base served
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("kb",)
        r = self.registry
        self.requests = Counter(
            "m3db_requests", "HTTP requests answered", ("kb", "endpoint", "method", "status"), registry=r
        )
        self.latency = Histogram(
            "m3db_request_seconds", "HTTP request latency", ("kb", "endpoint"), buckets=SECONDS, registry=r
        )
        self.recall = Histogram(
            "m3db_recall_seconds", "recall per answer: embed, search, read", labels, buckets=SECONDS, registry=r
        )
        self.first_token = Histogram(
            "m3db_time_to_first_token_seconds",
            "from a request's arrival to its first token (queue included)",
            labels,
            buckets=SECONDS,
            registry=r,
        )
        self.decode = Histogram(
            "m3db_decode_seconds", "decoding after the first token, per answer", labels, buckets=SECONDS, registry=r
        )
        self.read = Histogram("m3db_memories_read", "memories an answer read", labels, buckets=COUNTS, registry=r)
        self.tokens = Counter("m3db_generated_tokens", "tokens generated (rate(): tokens/s)", labels, registry=r)
        r.register(_StateCollector(self.served))

    def serve(self, kb, batcher) -> None:
        """Count `kb`'s answers (its batcher reports each) and read its state when scraped."""
        self.served.append((kb, batcher))
        batcher.on_answer = lambda result: self.observe_answer(kb.name, result)

    def observe_answer(self, kb: str, result: dict) -> None:
        """One finished answer of knowledge base `kb` (the batcher's result: timings,
        completion_tokens, memories)."""
        t = result.get("timings") or {}
        self.tokens.labels(kb).inc(result.get("completion_tokens", 0))
        self.read.labels(kb).observe(len(result.get("memories", ())))
        if t:
            self.recall.labels(kb).observe(t.get("recall", 0.0) / 1000)
            queued = t["total"] - t.get("recall", 0.0) - t.get("prefill", 0.0) - t.get("decode", 0.0)
            self.first_token.labels(kb).observe((max(queued, 0.0) + t.get("first_token", 0.0)) / 1000)
            self.decode.labels(kb).observe(max(t.get("decode", 0.0), 0.0) / 1000)

    def endpoint_of(self, path: str) -> str:
        for route in self.routes:
            if route.path_regex.match(path):
                return route.path
        return UNMATCHED

    def asgi(self, app):
        """`app` with every HTTP request counted and timed (the status of its response's start)."""
        metrics = self

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started, status = time.perf_counter(), [500]

            async def send_counted(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_counted)
            finally:
                endpoint = metrics.endpoint_of(scope["path"])
                kb = scope.get("m3db.kb", metrics.served[0][0].name if len(metrics.served) == 1 else "")
                metrics.requests.labels(kb, endpoint, scope["method"], str(status[0])).inc()
                metrics.latency.labels(kb, endpoint).observe(time.perf_counter() - started)

        counted.state = app.state
        return counted

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _StateCollector:
    """Figures read when scraped: each knowledge base's queue and counts, its decoded-memory
    cache, its memories held."""

    GAUGES = {"m3db_queue_depth": "generation requests queued", "m3db_running": "generation requests decoding"}
    COUNTERS = {
        "m3db_refused": "generation requests refused with 429 (queue full)",
        "m3db_cancelled": "generation requests cancelled (client gone)",
        "m3db_batches": "batches decoded",
        "m3db_memory_cache_hits": "decoded memories read from the cache",
        "m3db_memory_cache_misses": "decoded memories read from disk",
    }

    def __init__(self, served: list):
        self.served = served  # Metrics.served, read live

    def describe(self):
        return []  # nothing at registration: collect() reads the live batchers and databases

    def collect(self):
        families = {name: GaugeMetricFamily(name, doc, labels=["kb"]) for name, doc in self.GAUGES.items()}
        families |= {name: CounterMetricFamily(name, doc, labels=["kb"]) for name, doc in self.COUNTERS.items()}
        for kb, batcher in self.served:
            stats, dbs = batcher.stats(), kb.databases()
            hits, misses = sum(db.cache.hits for db in dbs), sum(db.cache.misses for db in dbs)
            values = {
                "m3db_queue_depth": stats["queued"],
                "m3db_running": stats["running"],
                "m3db_refused": stats["refused"],
                "m3db_cancelled": stats["cancelled"],
                "m3db_batches": stats["batches"],
                "m3db_memory_cache_hits": hits,
                "m3db_memory_cache_misses": misses,
            }
            for name, value in values.items():
                families[name].add_metric([kb.name], value)
        yield from families.values()

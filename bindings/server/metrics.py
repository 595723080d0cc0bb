"""GET /metrics: what an operator watches, in Prometheus's text format (prometheus-client).

Requests and their latency by endpoint (the route's template, never the raw path: a label per
memory id would grow without bound) and status, 401s and 429s included; per answer, recall,
time to first token and decode seconds, memories read and tokens generated (from
Answer.timings, the one generation path's own measure); and, read when scraped, the queue, the
refusals, the decoded-memory cache's hits and misses and the memories held. Every series is
labelled with the knowledge base; none with an API key.

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
    """The app's metrics: `observe_answer` from the batcher, `asgi` around the app, `endpoint`."""

    def __init__(self, kb, batcher, routes):
        self.kb, self.routes = kb, routes
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
        r.register(_StateCollector(kb, batcher))

    def observe_answer(self, result: dict) -> None:
        """One finished answer (the batcher's result: timings, completion_tokens, memories)."""
        kb, t = self.kb.name, result.get("timings") or {}
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
                kb = metrics.kb.name
                metrics.requests.labels(kb, endpoint, scope["method"], str(status[0])).inc()
                metrics.latency.labels(kb, endpoint).observe(time.perf_counter() - started)

        counted.state = app.state
        return counted

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _StateCollector:
    """Figures read when scraped: the batcher's queue and counts, the cache, the memories held."""

    def __init__(self, kb, batcher):
        self.kb, self.batcher = kb, batcher

    def describe(self):
        return []  # nothing at registration: collect() reads the live batcher and database

    def collect(self):
        kb, stats = self.kb.name, self.batcher.stats()
        gauges = {
            "m3db_queue_depth": ("generation requests queued", stats["queued"]),
            "m3db_running": ("generation requests decoding", stats["running"]),
        }
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["kb"])
            family.add_metric([kb], value)
            yield family
        counters = {
            "m3db_refused": ("generation requests refused with 429 (queue full)", stats["refused"]),
            "m3db_cancelled": ("generation requests cancelled (client gone)", stats["cancelled"]),
            "m3db_batches": ("batches decoded", stats["batches"]),
        }
        hits = misses = 0
        for db in self.kb.databases():
            hits, misses = hits + db.cache.hits, misses + db.cache.misses
        counters["m3db_memory_cache_hits"] = ("decoded memories read from the cache", hits)
        counters["m3db_memory_cache_misses"] = ("decoded memories read from disk", misses)
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(name, doc, labels=["kb"])
            family.add_metric([kb], value)
            yield family

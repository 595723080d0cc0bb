"""GET /metrics of a real `m3db serve` process, read with prometheus-client's own parser:
requests by endpoint and status (401s, 404s and 429s too), per-answer recall, time to first
token and decode, tokens, the queue and the decoded-memory cache; the key guards it unless
--public-metrics opens it, and no series names a key."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("starlette")
parser = pytest.importorskip("prometheus_client.parser")
httpx = pytest.importorskip("httpx")

from tests.server_process import ServerProcess  # noqa: E402
from tests.test_server import KEY, TINY, build  # noqa: E402


def scrape(http) -> dict:
    """{(name, frozenset(labels.items())): value} of every sample /metrics shows."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    samples = {}
    for family in parser.text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess([build(tmp_path_factory.mktemp("kb") / "kb.m3db")], *TINY, api_key=KEY)
    yield s
    assert s.stop() == 0, s.output()
    s.close()


def test_requests_answers_and_state_are_counted(server):
    with server.client() as http:
        before = scrape(http)
        body = {"model": "kb", "messages": [{"role": "user", "content": "Where is Zorblax?"}], "max_tokens": 6}
        for _ in range(3):
            assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert http.post("/v1/memories/search", json={"query": "bread", "k": 2}).status_code == 200
        assert http.get("/v1/memories/0").status_code == 200
        assert http.get("/v1/memories/99999").status_code == 404
        assert http.get("/no/such/path").status_code == 404
        after = scrape(http)
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/metrics").status_code == 401  # the key guards it by default
        assert anonymous.get("/v1/models").status_code == 401
    with server.client() as http:
        last = scrape(http)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("m3db_requests_total", endpoint="/v1/chat/completions", method="POST", status="200") == 3
    assert grew("m3db_requests_total", endpoint="/v1/memories/search", status="200") == 1
    # a path with an id is counted under its route's template, not one series per id
    assert grew("m3db_requests_total", endpoint="/v1/memories/{memory_id}", status="200") == 1
    assert grew("m3db_requests_total", endpoint="/v1/memories/{memory_id}", status="404") == 1
    assert grew("m3db_requests_total", endpoint="unmatched", status="404") == 1
    assert value(last, "m3db_requests_total", endpoint="/v1/models", status="401") >= 1
    assert grew("m3db_request_seconds_count", endpoint="/v1/chat/completions") == 3
    # one observation per answer, from Answer.timings
    for name in ("m3db_recall_seconds_count", "m3db_time_to_first_token_seconds_count", "m3db_decode_seconds_count"):
        assert grew(name, kb="kb") == 3, name
    assert grew("m3db_recall_seconds_sum", kb="kb") > 0 and grew("m3db_time_to_first_token_seconds_sum", kb="kb") > 0
    assert 0 < grew("m3db_generated_tokens_total", kb="kb") <= 18
    assert grew("m3db_memories_read_sum", kb="kb") >= 3  # each answer read at least one memory
    reads = grew("m3db_memory_cache_hits_total", kb="kb") + grew("m3db_memory_cache_misses_total", kb="kb")
    assert reads >= 3
    assert value(after, "m3db_queue_depth", kb="kb") == 0 and value(after, "m3db_refused_total", kb="kb") == 0
    text = "".join(f"{n}{sorted(ls)}" for n, ls in last)
    assert KEY not in text and "Bearer" not in text


def test_public_metrics_opens_only_metrics(tmp_path):
    s = ServerProcess([build(tmp_path / "kb.m3db")], *TINY, "--public-metrics", api_key=KEY)
    try:
        with httpx.Client(base_url=s.url) as anonymous:
            assert anonymous.get("/metrics").status_code == 200
            assert anonymous.get("/v1/models").status_code == 401
            assert anonymous.post("/metrics").status_code == 405  # the path is open; GET alone answers
    finally:
        assert s.stop() == 0, s.output()
        s.close()

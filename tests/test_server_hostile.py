"""`m3db serve` against hostile or careless clients: statements that would run for hours or
return millions of rows, generate() smuggled through /v1/sql, clients that send less than they
announce or never finish their headers, hundreds of idle connections under a low open-files
limit, parameters nested 500 deep, a batch of documents that fails half way, and a long ingest
that shutdown stops or its client leaves. One server for the module (the tiny model, short
limits), and more of their own for shutdown and ingests."""

import contextlib
import json
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

import m3db  # noqa: E402
from tests.server_models import tiny  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

TINY = ("--model", "tests.server_models:tiny")
SQL_TIMEOUT = 3  # over DuckDB's 2 s before it draws a progress bar: the log shows whether one is drawn
LIMITS = (
    "--write",
    "--sql-timeout",
    str(SQL_TIMEOUT),
    "--sql-max-rows",
    "1000",
    "--sql-max-bytes",
    "100000",
    "--body-timeout",
    "1",
    "--header-timeout",
    "1",
)
ENDLESS = "SELECT count(*) FROM range(10000000000000)"  # hours of DuckDB's time
LOW_FILES = 256  # the module server starts with this soft limit on open files
DOCS = [
    {"text": "Bread is made from flour, water and yeast.", "source": "bread", "metadata": {"year": 1999}},
    {"text": "Zorblax is a small moon; its capital is Vell.", "source": "zorblax", "metadata": {"year": 2001}},
]


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "kb.m3db"
    model, embedder = tiny()
    with m3db.connect(path, model=model, embedder=embedder) as db:
        db.add_documents(DOCS, progress=False)  # year: a BIGINT column
    return path


def start(paths, *args, soft_files=None) -> ServerProcess:
    """A server process; with soft_files, it starts under that soft limit on open files (the
    limit of this process while it starts, which the child inherits)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_files is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft_files, old[1]), old[1]))
    try:
        return ServerProcess(paths, *TINY, *args)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.fixture(scope="module")
def server(kb):
    s = start([kb], *LIMITS, soft_files=LOW_FILES)
    yield s
    assert s.stop() == 0, s.output()
    s.close()


@pytest.fixture
def http(server):
    # no kept-alive connections: this server closes an idle one after its 1 s header timeout, and
    # a request reusing it just then fails ("Server disconnected"): each request connects anew
    with server.client(timeout=20, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        yield c


def error_of(response, status, code):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and "Traceback" not in response.text, error
    return error


def sql_stats(http) -> dict:
    return http.get("/v1/server").json()["sql"]


# -- 1. a statement that would run for hours --------------------------------------------------


def test_endless_statement_is_stopped_and_the_server_keeps_answering(server, http):
    answers = {}

    def endless():
        with server.client(timeout=30) as c:
            started = time.monotonic()
            answers["endless"] = c.post("/v1/sql", json={"query": ENDLESS})
            answers["took"] = time.monotonic() - started

    thread = threading.Thread(target=endless)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    r = http.get("/v1/memories/0")  # needs the database: waits at most for the statement's limit
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < SQL_TIMEOUT + 2
    thread.join(30)
    error = error_of(answers["endless"], 400, "query_timeout")
    assert "--sql-timeout" in error["message"]
    assert SQL_TIMEOUT - 0.5 < answers["took"] < SQL_TIMEOUT + 3
    assert sql_stats(http)["timed_out"] >= 1
    # DuckDB's progress bar is off: nothing drawn into the server's log by the 3 s statement
    assert "\u2595" not in server.output() and "\u2588" not in server.output()


def test_writing_statements_are_bounded_and_write_nothing_when_stopped(http):
    def documents():
        return http.post("/v1/sql", json={"query": "SELECT count(*) FROM documents"}).json()["rows"][0][0]

    before = documents()
    endless = f"INSERT INTO documents (text) SELECT 'endless ' || ({ENDLESS})"
    error_of(http.post("/v1/sql", json={"query": endless}), 400, "query_timeout")
    many = "INSERT INTO documents (text) SELECT 'doc ' || range FROM range(20000000)"
    started = time.monotonic()
    error_of(http.post("/v1/sql", json={"query": many}), 400, "result_too_large")
    assert time.monotonic() - started < 5  # not the seconds reading 20 million rows takes
    assert documents() == before


def test_an_endless_recall_filter_is_stopped_too(http):
    where = f"({ENDLESS}) > 0"  # a filter is SQL from the client as well
    for path, body in (
        ("/v1/memories/search", {"query": "bread", "where": where}),
        ("/v1/chat/completions", {"model": "kb", "messages": [{"role": "user", "content": "hi"}], "where": where}),
    ):
        started = time.monotonic()
        error = error_of(http.post(path, json=body), 400, "query_timeout")
        assert error["param"] == "where" and time.monotonic() - started < SQL_TIMEOUT + 3
    r = http.post("/v1/memories/search", json={"query": "bread", "where": "year > ?", "params": [2000]})
    assert r.status_code == 200 and [m["document"] for m in r.json()["data"]] == ["zorblax"], r.text


def test_catalog_connection_draws_no_progress_bar(tmp_path):
    # in a process of its own, as a server's: DuckDB's default depends on the process (pytest's is off)
    code = (
        "import sys; from m3db.storage.catalog import Catalog; c = Catalog(sys.argv[1]); "
        "print(c.con.execute(\"SELECT current_setting('enable_progress_bar')\").fetchone()[0])\n"
        "try:\n    c.con.execute('SET enable_progress_bar = true'); print('changed')\nexcept Exception as e: print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "catalog.duckdb")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    setting, refusal = out.stdout.splitlines()
    assert setting == "False" and "locked" in refusal


def test_a_client_that_leaves_stops_its_statement(server, http):
    before = sql_stats(http)["cancelled"]
    with server.client(timeout=0.5) as c, pytest.raises(httpx.TimeoutException):
        c.post("/v1/sql", json={"query": ENDLESS})
    started = time.monotonic()
    r = http.get("/v1/memories/0")
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < SQL_TIMEOUT / 2  # the statement was stopped, not timed out
    deadline = time.monotonic() + 5
    while sql_stats(http)["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sql_stats(http)["cancelled"] == before + 1


def test_results_are_capped_in_rows_and_bytes(http):
    started = time.monotonic()
    error = error_of(http.post("/v1/sql", json={"query": "SELECT * FROM range(20000000)"}), 400, "result_too_large")
    assert "LIMIT" in error["message"] and "--sql-max-rows" in error["message"]
    assert time.monotonic() - started < 5  # refused at row 1001, not after reading 20 million
    r = http.post("/v1/sql", json={"query": "SELECT * FROM range(20000000) LIMIT 1000"})
    assert r.status_code == 200 and len(r.json()["rows"]) == 1000
    error = error_of(
        http.post("/v1/sql", json={"query": "SELECT repeat('x', 1000) FROM range(500)"}), 400, "result_too_large"
    )
    assert "--sql-max-bytes" in error["message"]


@contextlib.contextmanager
def own_server(tmp_path, *args):
    """A server of its own (other limits than the module's) on a copy of the knowledge base (the
    module's server holds it for writing)."""
    copy = tmp_path / "copy.m3db"
    model, embedder = tiny()
    with m3db.connect(copy, model=model, embedder=embedder) as db:
        db.add_documents(DOCS, progress=False)
    s = start([copy], *args)
    try:
        yield s
    finally:
        s.close()


def endless_statement(s) -> tuple[threading.Thread, dict]:
    """ENDLESS posted to server `s` from a thread, running once this returns; its answer lands
    in the dict under "r"."""
    answer = {}

    def post():
        with s.client(timeout=30) as c:
            answer["r"] = c.post("/v1/sql", json={"query": ENDLESS})

    thread = threading.Thread(target=post)
    thread.start()
    time.sleep(0.5)  # (/v1/server waits for the database too: it cannot tell when the statement runs)
    return thread, answer


def test_shutdown_interrupts_a_running_statement(tmp_path):
    # a long statement limit, a short grace
    with own_server(tmp_path, "--sql-timeout", "600", "--grace", "1") as s:
        thread, answer = endless_statement(s)
        started = time.monotonic()
        assert s.stop(signal.SIGTERM, timeout=15) == 0, s.output()
        assert time.monotonic() - started < 6
        thread.join(10)
        error_of(answer["r"], 503, "shutting_down")
        assert "closed" in s.output()


def test_statements_past_the_sql_queue_are_refused_at_once(tmp_path):
    """Each statement may hold the database up to the time limit: a crowd of them would hold every
    endpoint that reads it for crowd x limit. Past --sql-max-queue they get 429 at once."""
    with own_server(tmp_path, "--sql-timeout", "3", "--sql-max-queue", "1") as s:
        thread, answer = endless_statement(s)
        with s.client(timeout=30) as c:
            started = time.monotonic()
            error = error_of(c.post("/v1/sql", json={"query": "SELECT 1"}), 429, "queue_full")
            # at once, not after the running statement's limit
            assert time.monotonic() - started < SQL_TIMEOUT - 0.5 and "--sql-max-queue" in error["message"]
            thread.join(30)
            error_of(answer["r"], 400, "query_timeout")
            assert c.post("/v1/sql", json={"query": "SELECT 1"}).json()["rows"] == [[1]]  # a place again
            assert c.get("/v1/server").json()["sql"]["queue_full"] == 1


# -- 2. generate() in SQL --------------------------------------------------------------------


def test_generate_is_refused_in_sql_and_recall_stays(http):
    for query in (
        "SELECT * FROM generate('tell a story', max_tokens => 1800)",
        " UNION ALL ".join(f"SELECT text FROM generate('story {i}', max_tokens => 64)" for i in range(40)),
        "EXPLAIN SELECT * FROM generate('hi')",
        "SELECT * FROM recall('bread', k => 1) r, generate('hi') g",
    ):
        error = error_of(http.post("/v1/sql", json={"query": query}), 400, "unsupported_function")
        assert "/v1/chat/completions" in error["message"]
    assert sql_stats(http)["running"] == 0
    assert http.get("/v1/server").json()["generation"]["requests"] == 0
    r = http.post("/v1/sql", json={"query": "SELECT id FROM recall('bread', k => 1)"})
    assert r.status_code == 200 and len(r.json()["rows"]) == 1, r.text


# -- 3. slow and lying clients ----------------------------------------------------------------


def raw(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def read_all(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_body_shorter_than_its_content_length_is_answered_408(server):
    with raw(server) as sock:
        sock.sendall(
            b"POST /v1/sql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"query": '
        )
        started = time.monotonic()
        answer = read_all(sock)  # the server answers, then closes the connection
    assert time.monotonic() - started < 5
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_unfinished_headers_are_cut_off(server):
    with raw(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
        started = time.monotonic()
        assert read_all(sock) == b""  # closed by the server
    assert time.monotonic() - started < 5


def test_hundreds_of_idle_connections_under_a_low_files_limit(server, http):
    # the server raised its soft limit on open files to the hard one at startup
    limits = pathlib.Path(f"/proc/{server.proc.pid}/limits")
    text = limits.read_text() if limits.exists() else ""  # Linux only
    line = next((x for x in text.splitlines() if x.startswith("Max open files")), None)
    if line is not None:
        soft, hard = line.split()[3:5]
        assert soft == hard and (hard == "unlimited" or int(hard) > LOW_FILES), line
    sockets = []
    try:
        for _ in range(300):
            sock = raw(server)
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            sockets.append(sock)
        started = time.monotonic()
        assert http.get("/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 5
        for sock in sockets:  # each is closed by the header timeout
            sock.settimeout(5)
            assert read_all(sock) == b""
    finally:
        for sock in sockets:
            sock.close()
    assert http.get("/health").status_code == 200
    assert "out of system resource" not in server.output() and "Too many open files" not in server.output()


# -- 4. parameters nested deep ----------------------------------------------------------------


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def test_deeply_nested_params_are_a_400(http):
    for body, path in (
        ({"query": "SELECT ?", "params": [nested(500)]}, "/v1/sql"),
        ({"query": "SELECT $v", "params": {"v": nested(500)}}, "/v1/sql"),
        ({"query": "bread", "where": "year > ?", "params": [nested(500)]}, "/v1/memories/search"),
    ):
        error = error_of(http.post(path, json=body), 400, "invalid_value")
        assert error["param"] == "params" and "64 levels" in error["message"]
    r = http.post("/v1/sql", json={"query": "SELECT ?", "params": [nested(3)]})
    assert r.status_code == 200 and r.json()["rows"] == [[nested(3)]], r.text


# -- 5. a batch of documents that fails half way ----------------------------------------------


def test_a_failed_document_is_named_with_what_was_stored(http):
    body = {
        "documents": [
            {"text": "good one", "source": "g1"},
            {"text": "bad one", "source": "g2", "metadata": {"year": "abc"}},
            {"text": "never tried", "source": "g3"},
        ]
    }
    error = error_of(http.post("/v1/documents", json=body), 400, "invalid_input")
    assert error["message"].startswith("documents[1] (source 'g2'): "), error
    assert "documents[0] was stored" in error["message"] and "1 after it were not tried" in error["message"]
    assert error["param"] == "documents[1]"
    [stored] = error["stored"]
    assert stored["index"] == 0 and stored["source"] == "g1" and stored["added"] and stored["memory_ids"]
    rows = http.post("/v1/sql", json={"query": "SELECT source FROM documents ORDER BY source"}).json()["rows"]
    assert [r[0] for r in rows] == ["bread", "g1", "zorblax"]
    # a first document that fails: nothing stored, said so
    error = error_of(http.post("/v1/documents", json={"documents": body["documents"][1:2]}), 400, "invalid_input")
    assert error["message"].startswith("documents[0]") and "no document of this request was stored" in error["message"]
    assert error["stored"] == []


# -- 6. a long ingest: shutdown, and a client that leaves ---------------------------------------

# a ~300 KB document: seconds of chunking and encoding with the tiny model before its one commit
LONG_TEXT = " ".join(f"Stone {i} lies by the river in the city of Vell." for i in range(6000))
INGEST = {
    "documents": [
        {"text": "Quimby lies on the river Flent.", "source": "first"},
        {"text": LONG_TEXT, "source": "long"},
        {"text": "Never tried.", "source": "last"},
    ]
}


def post_in_thread(s, body, path="/v1/documents") -> tuple[threading.Thread, dict]:
    """`body` posted to server `s` from a thread; its answer lands in the dict under "r"."""
    answer = {}

    def post():
        with s.client(timeout=120) as c:
            answer["r"] = c.post(path, json=body)

    thread = threading.Thread(target=post)
    thread.start()
    return thread, answer


def wait_memories(s, count: int) -> None:
    """Until the served database holds `count` memories (/v1/server reads it beside a writer)."""
    with s.client(timeout=10) as c:
        for _ in range(600):
            if c.get("/v1/server").json()["memories"] == count:
                return
            time.sleep(0.05)
    pytest.fail(f"the server never held {count} memories")


def sources_of(path) -> set:
    model, embedder = tiny()
    with m3db.connect(path, model=model, embedder=embedder, read_only=True) as db:
        assert db.check().ok
        return {r[0] for r in db.sql("SELECT source FROM documents")}


def test_shutdown_during_an_ingest_answers_what_was_stored_within_the_grace(tmp_path):
    """SIGTERM while a long document is chunked and encoded: within the grace the client gets
    OpenAI's error shape naming the document stopped and listing those stored before it (which
    stay); the server exits soon after, not when the encoding would have ended."""
    with own_server(tmp_path, "--write", "--grace", "2") as s:
        thread, answer = post_in_thread(s, INGEST)
        wait_memories(s, len(DOCS) + 1)  # the first document is committed; the long one is under way
        started = time.monotonic()
        assert s.stop(signal.SIGTERM, timeout=60) == 0, s.output()
        assert time.monotonic() - started < 2 + 3, s.output()
        thread.join(10)
        error = error_of(answer["r"], 503, "shutting_down")
        assert error["message"].startswith("documents[1] (source 'long'): the server is shutting down"), error
        assert "documents[0] was stored" in error["message"] and "the 1 after it were not tried" in error["message"]
        [stored] = error["stored"]
        assert stored["index"] == 0 and stored["source"] == "first" and stored["added"], error
        assert "closed" in s.output()
    assert sources_of(tmp_path / "copy.m3db") == {"bread", "zorblax", "first"}


def test_a_client_that_leaves_an_ingest_frees_the_writer(tmp_path):
    """A client that disconnects from a long POST /v1/documents stops its ingest at the next stop
    point: the documents committed before stay, the one under way is not stored, and another
    client's write gets the only writer at once, not when the encoding would have ended."""
    with own_server(tmp_path, "--write") as s:
        data = json.dumps(INGEST).encode()
        sock = raw(s)
        head = f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
        sock.sendall(head.encode() + data)
        wait_memories(s, len(DOCS) + 1)  # the first document is committed; the long one is under way
        sock.close()
        with s.client(timeout=120) as c:
            started = time.monotonic()
            r = c.post("/v1/documents", json={"documents": [{"text": "A one-line note.", "source": "note"}]})
            assert r.status_code == 200 and r.json()["data"][0]["added"], r.text
            assert time.monotonic() - started < 5
        assert s.stop(signal.SIGTERM, timeout=60) == 0, s.output()
        assert "the client closed the connection: documents[1] was stopped before its commit" in s.output()
    assert sources_of(tmp_path / "copy.m3db") == {"bread", "zorblax", "first", "note"}

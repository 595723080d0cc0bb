"""`m3db mcp` as a real process, through the official MCP SDK's own client (ClientSession), over
stdio and over streamable HTTP: the tool list, each tool, bad arguments (an error result, never a
crash), a write refused without --write and accepted with it, the documents as resources, and
`ask` answering exactly as db.generate does in Python. The model is the tiny random decoder with
the hashing embedder (tests/server_models.py). A third process checks, byte by byte, that stdio
carries nothing but the protocol; several packages, the queue bound and the command's argument
checks run in this process."""

import contextlib
import functools
import importlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("mcp")
httpx = pytest.importorskip("httpx")
httpx2 = pytest.importorskip("httpx2")

import anyio  # noqa: E402
import mcp_types as types  # noqa: E402
from anyio.from_thread import start_blocking_portal  # noqa: E402
from mcp import ClientSession, StdioServerParameters, stdio_client  # noqa: E402
from mcp.client import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

import m3db  # noqa: E402
from m3db.bindings.mcp import server  # noqa: E402
from m3db.cli import main  # noqa: E402
from tests.server_models import tiny  # noqa: E402
from tests.server_process import ROOT, free_port  # noqa: E402

KEY = "mcp-test-key-0123"
TINY = ["--model", "tests.server_models:tiny"]
DOCS = [
    {
        "text": "Zorblax is a small moon of the planet Quendor. Its capital city is Vell.",
        "source": "zorblax.txt",
        "title": "Zorblax",
        "metadata": {"lang": "en"},
    },
    {"text": "Bread is made from flour, water and yeast.", "source": "bread.txt", "metadata": {"lang": "en"}},
    {"text": "Berlin ist die Hauptstadt Deutschlands.", "source": "berlin.txt", "metadata": {"lang": "de"}},
]
QUESTION, MAX_TOKENS = "Where is the capital of Zorblax?", 24
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "M3DB_API_KEY": ""}


def build(path, docs=DOCS):
    model, embedder = tiny()
    with m3db.connect(path, model=model, embedder=embedder) as db:
        db.add_documents(docs, progress=False)
    return path


class Connected:
    """An SDK ClientSession held open in a portal's event loop, called from plain tests."""

    def __init__(self, transport):
        self.stack = contextlib.ExitStack()
        self.portal = self.stack.enter_context(start_blocking_portal())
        read, write = self.stack.enter_context(self.portal.wrap_async_context_manager(transport))[:2]
        self.session = self.stack.enter_context(self.portal.wrap_async_context_manager(ClientSession(read, write)))
        self.initialized = self.portal.call(self.session.initialize)

    def __getattr__(self, name):  # list_tools, list_resources, read_resource, ...
        method = getattr(self.session, name)
        return lambda *args, **kwargs: self.portal.call(functools.partial(method, *args, **kwargs))

    def call(self, tool, **arguments) -> types.CallToolResult:
        return self.portal.call(self.session.call_tool, tool, arguments)

    def close(self):
        self.stack.close()


def ok(result: types.CallToolResult) -> dict:
    assert not result.is_error, result.content[0].text
    assert json.loads(result.content[0].text) == result.structured_content  # the same JSON as text
    return result.structured_content


def refused(result: types.CallToolResult, *words) -> str:
    """The text of an error result, which must name each of `words` and show no traceback."""
    assert result.is_error and result.structured_content is None, result
    text = result.content[0].text
    assert "Traceback" not in text and all(w in text for w in words), text
    return text


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    return build(tmp_path_factory.mktemp("mcp") / "kb.m3db")


@pytest.fixture(scope="module")
def python_answers(kb):
    """db.generate's answers in this process: what `ask` must give over either transport."""
    model, embedder = tiny()
    with m3db.connect(kb, read_only=True, model=model, embedder=embedder) as db:
        return {mode: db.generate(QUESTION, max_tokens=MAX_TOKENS, memory=mode) for mode in ("memory", "rag")}


@pytest.fixture(scope="module")
def stdio(kb, tmp_path_factory):
    """`m3db mcp kb` on stdio, read-only, started by the SDK's stdio client."""
    log = open(tmp_path_factory.mktemp("log") / "stdio.log", "w+")
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "m3db.cli", "mcp", str(kb), *TINY], env=ENV, cwd=str(ROOT)
    )
    client = Connected(stdio_client(params, errlog=log))
    yield client
    client.close()  # closing stdin ends the server, which closes the database
    log.seek(0)
    assert "closed" in log.read()
    log.close()


@pytest.fixture(scope="module")
def http(kb, tmp_path_factory):
    """`m3db mcp COPY --port P --write --api-key KEY`: streamable HTTP, accepting writes (on a copy
    of kb, whose answers are kb's until a test adds to it)."""
    copy = tmp_path_factory.mktemp("http") / "kb.m3db"
    shutil.copytree(kb, copy)
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    command = [sys.executable, "-m", "m3db.cli", "mcp", str(copy), *TINY, "--port", str(port), "--write"]
    proc = subprocess.Popen([*command, "--api-key", KEY], cwd=ROOT, env={**os.environ, **ENV}, stderr=log)
    output = pathlib.Path(log.name).read_text
    deadline = time.monotonic() + 60
    while "serving" not in output():
        assert proc.poll() is None and time.monotonic() < deadline, output()
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}/mcp"
    client = Connected(
        streamable_http_client(url, http_client=httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}))
    )
    client.url = url
    yield client
    client.close()
    proc.terminate()
    assert proc.wait(30) == 0, output()
    assert "closed" in output()
    log.close()
    os.unlink(log.name)


@pytest.fixture(params=["stdio", "http"])
def client(request):
    return request.getfixturevalue(request.param)


# -- over both transports -----------------------------------------------------------------------


def test_the_server_and_its_tools(client, request):
    assert client.initialized.server_info.name == "kb"
    assert "recall" in client.initialized.instructions
    tools = {t.name: t for t in client.list_tools().tools}
    writable = request.node.callspec.params["client"] == "http"
    assert list(tools) == ["recall", "ask", "sql"] + (["add_documents"] if writable else [])
    assert tools["recall"].input_schema["required"] == ["text"]
    assert tools["ask"].input_schema["properties"]["memory"]["enum"] == ["memory", "rag", "none"]
    assert tools["recall"].annotations.read_only_hint and tools["sql"].annotations.read_only_hint is not writable


def test_recall_with_and_without_a_filter(client):
    memories = ok(client.call("recall", text="the capital of Zorblax", k=2))["memories"]
    assert len(memories) == 2 and {"id", "score", "text", "document", "title", "metadata"} <= set(memories[0])
    german = ok(client.call("recall", text="capital", k=3, where="lang = ?", params=["de"]))["memories"]
    assert [(m["document"], m["metadata"]) for m in german] == [("berlin.txt", {"lang": "de"})]
    assert ok(client.call("recall", text="capital", where={"lang": "en"}))["memories"]


def test_ask_answers_as_db_generate_does(client, python_answers):
    for mode, want in python_answers.items():
        got = ok(client.call("ask", question=QUESTION, max_tokens=MAX_TOKENS, memory=mode))
        assert (got["answer"], got["finish_reason"], got["memory"]) == (want.text, want.finish_reason, mode)
        assert got["sources"] == [
            {"id": s.id, "document": s.document, "title": s.title, "text": s.text} for s in want.sources
        ]
        assert got["sources"]
    alone = ok(client.call("ask", question=QUESTION, max_tokens=4, memory="none"))
    assert alone["sources"] == [] and alone["memory"] == "none"


def test_sql_reads_under_the_caps(client):
    assert ok(
        client.call("sql", query="SELECT count(*) AS n FROM documents WHERE source = ?", params=["bread.txt"])
    ) == {
        "columns": ["n"],
        "rows": [[1]],
    }
    refused(client.call("sql", query="SELECT * FROM range(20000)"), "result_too_large", "LIMIT", "--sql-max-rows")
    refused(client.call("sql", query="SELECT * FROM generate('hi')"), "ask tool")
    refused(client.call("sql", query="SELECT nope FROM memories"), "[query]", "nope")


@pytest.mark.parametrize(
    "tool, arguments, words",
    [
        ("recall", {"text": "x", "where": "no_such_column = 1"}, ["no_such_column", "columns of `memories`"]),
        ("recall", {"text": "x", "k": 0}, ["argument k", "minimum of 1"]),
        ("recall", {"text": "x", "k": 10**6}, ["argument k", "maximum"]),
        ("recall", {"text": "x", "k": "five"}, ["argument k", "not of type 'integer'"]),
        ("recall", {"text": "x", "limit": 3}, ["unknown argument 'limit'", "accepted: text, k, where, params"]),
        ("recall", {}, ["'text' is missing"]),
        ("recall", {"text": "   "}, ["non-empty"]),
        ("ask", {"question": QUESTION, "k": 9}, ["k=9", "at most 5"]),
        ("ask", {"question": QUESTION, "memory": "dreams"}, ["argument memory", "'memory', 'rag', 'none'"]),
        ("ask", {"question": QUESTION, "memory": "none", "k": 2}, ["none are read"]),
        ("ask", {"question": QUESTION, "max_tokens": 10**6}, ["argument max_tokens", "maximum of 1024"]),
        ("ask", {"question": QUESTION, "where": "lang = ?"}, ["[query]"]),
        ("sql", {"query": "SELEKT 1"}, ["[query]"]),
        ("sql", {"query": "SELECT 1", "package": "a"}, ["unknown argument 'package'"]),
    ],
)
def test_bad_arguments_are_error_results(client, tool, arguments, words):
    refused(client.call(tool, **arguments), *words)


def test_an_unknown_tool_is_a_protocol_error(client):
    with pytest.raises(MCPError, match="no tool named 'forget'"):
        client.call("forget", id=1)
    assert ok(client.call("recall", text="bread"))  # the session goes on


def test_documents_are_resources(client):
    listed = client.list_resources()
    assert [(r.uri, r.name, r.title) for r in listed.resources] == [
        ("m3db://documents/1", "zorblax.txt", "Zorblax"),
        ("m3db://documents/2", "bread.txt", None),
        ("m3db://documents/3", "berlin.txt", None),
    ] and listed.next_cursor is None
    templates = client.list_resource_templates().resource_templates
    assert [t.uri_template for t in templates] == ["m3db://documents/{id}"]
    (content,) = client.read_resource("m3db://documents/1").contents
    assert content.text == DOCS[0]["text"] and content.mime_type == "text/plain"
    assert content.meta["source"] == "zorblax.txt" and content.meta["metadata"] == {"lang": "en"}
    for uri in ("m3db://documents/99", "m3db://documents/x", "file:///etc/passwd"):
        with pytest.raises(MCPError, match="document"):
            client.read_resource(uri)


# -- writes: refused without --write (stdio), accepted with it (HTTP) ----------------------------


def test_a_write_is_refused_without_write(stdio):
    refused(stdio.call("add_documents", documents=[{"text": "Vell has two bridges."}]), "read-only", "--write")
    refused(stdio.call("sql", query="DELETE FROM memories"), "read-only", "m3db mcp PATH --write")
    assert ok(stdio.call("sql", query="SELECT count(*) FROM memories"))["rows"] == [[3]]


def test_http_needs_the_api_key(http):
    for headers in ({}, {"Authorization": "Bearer wrong-key-000"}):
        r = httpx.post(http.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=headers)
        assert r.status_code == 401 and "API key" in r.text


def test_a_write_is_accepted_with_write(http):
    """Last in the file: it changes the HTTP server's copy of the knowledge base."""
    docs = [
        {"text": "Vell has two bridges over the river Quen.", "source": "vell.txt", "metadata": {"lang": "en"}},
        {"text": "Zorblax is a small moon of the planet Quendor. Its capital city is Vell.", "source": "zorblax.txt"},
    ]
    stored = ok(http.call("add_documents", documents=docs))["documents"]
    assert [(d["index"], d["source"], d["added"]) for d in stored] == [(0, "vell.txt", True), (1, "zorblax.txt", False)]
    assert stored[0]["memory_ids"] and stored[1]["memory_ids"] == []
    assert "vell.txt" in [r.name for r in http.list_resources().resources]
    hits = ok(http.call("recall", text="bridges over the river Quen", k=1))["memories"]
    assert hits[0]["document"] == "vell.txt"
    # a failing document is named, and the ones before it stay stored
    failed = refused(
        http.call(
            "add_documents",
            documents=[{"text": "Quen is a river.", "source": "quen.txt"}, {"text": "Other.", "source": "bread.txt"}],
        ),
        "documents[1]",
        "documents[0] was stored",
    )
    assert "Traceback" not in failed
    inserted = ok(
        http.call("sql", query="INSERT INTO documents (text, source) VALUES (?, ?)", params=["Hi.", "hi.txt"])
    )
    assert inserted["columns"][0] == "documents_added" and inserted["rows"][0][0] == 1
    sources = ok(http.call("sql", query="SELECT source FROM documents ORDER BY id"))["rows"]
    assert [s for (s,) in sources] == ["zorblax.txt", "bread.txt", "berlin.txt", "vell.txt", "quen.txt", "hi.txt"]


# -- stdio carries nothing but the protocol ------------------------------------------------------

NOISY = """
import os
from m3db.model.memory_model import MemoryModel
from tests.server_models import tiny

def noisy():
    print("a stray line while loading")
    generate = MemoryModel.generate

    def loud(self, *args, **kwargs):
        print("a stray line while decoding")
        os.write(1, b"a stray write to file descriptor 1\\n")
        return generate(self, *args, **kwargs)

    MemoryModel.generate = loud
    return tiny()
"""


def test_stdio_carries_only_the_protocol(kb, tmp_path):
    (tmp_path / "noisy_models.py").write_text(NOISY)
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    command = [sys.executable, "-m", "m3db.cli", "mcp", str(kb), "--model", "noisy_models:noisy"]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    requests = [
        (
            "initialize",
            {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
        ),
        ("tools/call", {"name": "recall", "arguments": {"text": "x", "k": "many"}}),
        ("tools/call", {"name": "ask", "arguments": {"question": QUESTION, "max_tokens": 4}}),
        ("tools/call", {"name": "recall", "arguments": {"text": "x", "where": "no_such_column = 1"}}),
        ("resources/read", {"uri": "m3db://documents/99"}),
    ]
    answers = []
    for i, (method, params) in enumerate(requests):
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params}) + "\n")
        if i == 0:
            proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        answers.append(json.loads(line))  # every line on stdout is a JSON-RPC message
    out, err = proc.communicate(timeout=60)  # closing stdin ends the server
    assert proc.returncode == 0 and out == "", (out, err)
    assert [a["id"] for a in answers] == list(range(len(requests)))
    assert answers[1]["result"]["isError"] and answers[3]["result"]["isError"]
    assert not answers[2]["result"]["isError"] and answers[4]["error"]["code"] == types.INVALID_PARAMS
    for stray in ("a stray line while loading", "a stray line while decoding", "a stray write to file descriptor 1"):
        assert stray in err
    assert "Traceback" not in err and "closed" in err


# -- in this process: several packages, the queue, the command's checks ---------------------------


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    for name, docs in (("news", DOCS[:2]), ("wiki", DOCS[2:])):
        with m3db.connect(build(root / name, docs), read_only=True) as db:
            db.pack(root / f"{name}.m3kb")
    return [root / "news.m3kb", root / "wiki.m3kb"]


def in_process(knowledge, check, **options):
    async def go():
        async with Client(server(knowledge, **options)) as client:
            await check(client)

    anyio.run(go)


def test_several_packages(packages):
    model, embedder = tiny()

    async def check(client):
        listed = (await client.list_resources()).resources
        assert [r.uri for r in listed] == [
            "m3db://packages/news/documents/1",
            "m3db://packages/news/documents/2",
            "m3db://packages/wiki/documents/1",
        ]
        (content,) = (await client.read_resource("m3db://packages/wiki/documents/1")).contents
        assert content.text == DOCS[2]["text"] and content.meta["package"] == "wiki"
        with pytest.raises(MCPError, match="packages/{package}"):
            await client.read_resource("m3db://documents/1")
        hits = (await client.call_tool("recall", {"text": "Hauptstadt", "k": 3})).structured_content["memories"]
        assert {h["package"] for h in hits} == {"news", "wiki"}
        rows = await client.call_tool("sql", {"query": "SELECT count(*) FROM documents", "package": "news"})
        assert rows.structured_content["rows"] == [[2]]
        missing = await client.call_tool("sql", {"query": "SELECT 1"})
        assert missing.is_error and "'package' is missing" in missing.content[0].text

    with m3db.attach(packages, model=model, embedder=embedder) as knowledge:
        in_process(knowledge, check)


def test_resources_are_listed_page_by_page(tmp_path):
    model, embedder = tiny()
    docs = [{"text": f"Document number {i} is short.", "source": f"d{i}.txt"} for i in range(130)]
    path = tmp_path / "kb.m3db"
    with m3db.connect(path, model=model, embedder=embedder) as db:
        db.add_documents(docs, progress=False, cold=True)

    async def check(client):
        first = await client.list_resources()
        second = await client.list_resources(cursor=first.next_cursor)
        assert len(first.resources) == 100 and len(second.resources) == 30 and second.next_cursor is None
        assert [r.name for r in first.resources + second.resources] == [d["source"] for d in docs]
        with pytest.raises(MCPError, match="not a cursor"):
            await client.list_resources(cursor="nonsense")

    with m3db.connect(path, read_only=True, model=model, embedder=embedder) as db:
        in_process(db, check)


def test_the_queue_refuses_past_its_bound():
    from m3db.bindings.mcp.generation import Generation, Ticket

    class Slow:
        def generate(self, question, **options):
            time.sleep(0.3)
            return question

    queue = Generation(Slow(), max_queue=1)
    first = threading.Thread(target=queue.answer, args=(Ticket(), "first"))
    first.start()
    time.sleep(0.1)
    with pytest.raises(Exception, match="busy.*--max-queue"):
        queue.answer(Ticket(), "second")
    first.join()
    cancelled = Ticket()
    cancelled.cancel()
    with pytest.raises(Exception, match="cancelled before its turn"):
        queue.answer(cancelled, "third")
    assert queue.answer(Ticket(), "fourth") == "fourth"
    assert queue.stop(1.0)
    with pytest.raises(Exception, match="shutting down"):
        queue.answer(Ticket(), "fifth")


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--api-key", "a-long-key-123"], "--api-key applies to HTTP: add --port"),
        (["--host", "0.0.0.0"], "--host applies to HTTP"),
        (["--port", "70000"], "--port 70000: expected 0-65535"),
        (["--sql-timeout", "0"], "sql_timeout must be a positive number"),
        (["nope.m3kb"], "no package at 'nope.m3kb'"),
    ],
)
def test_the_command_refuses_bad_options(kb, capsys, arguments, words):
    assert main(["mcp", str(kb), *arguments]) == 1
    assert words in capsys.readouterr().err


def test_a_port_in_use_fails_before_anything_loads(kb, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["mcp", str(kb), "--port", str(taken.getsockname()[1])]) == 1
    assert "already in use" in capsys.readouterr().err


def test_without_the_sdk_the_binding_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n == "m3db.bindings.mcp" or n.startswith("m3db.bindings.mcp.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mcp", None)  # `import mcp` now fails as if it were not installed
    with pytest.raises(m3db.DependencyError, match=r"pip install 'm3db\[mcp\]'"):
        importlib.import_module("m3db.bindings.mcp")

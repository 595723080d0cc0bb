"""Tenants (issue 31): several knowledge bases behind one server, each reached only by the keys
given it. Two knowledge bases of near-identical documents (they differ in one word: the capital
is Vell in "a", Drun in "b", and in their metadata), two keys, concurrent requests from both
through every endpoint: no answer, source, memory or row of one tenant may reach the other's key,
in-process (the ASGI app) and over HTTP (a real `m3db serve --kb ... --keys` process, whose keys
file is reloaded on SIGHUP); a name the key was not given is the 404 of a name not served."""

import concurrent.futures
import hashlib
import signal
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

import m3db  # noqa: E402
from m3db.bindings.server import Keys, tenants  # noqa: E402
from tests.server_models import tiny  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402
from tests.test_server import TINY  # noqa: E402

SECRET = {"a": "secret-of-team-a-0123", "b": "secret-of-team-b-4567"}
CAPITAL = {"a": "Vell", "b": "Drun"}
OTHER = {"a": "b", "b": "a"}


def documents(name):
    city = CAPITAL[name]
    return [
        {
            "text": f"Zorblax is a small moon of the planet Quendor. Its capital city is {city}.",
            "source": "zorblax.txt",
            "title": "Zorblax",
            "metadata": {"team": name},
        },
        {"text": f"The river of {city} runs north to the sea.", "source": "river.txt", "metadata": {"team": name}},
    ]


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keys_toml(rights: dict) -> str:
    """{tenant: (read, write)} as a keys file, each tenant's key by its SECRET."""
    out = []
    for name, (read, write) in rights.items():
        out.append(
            f'[[keys]]\nname = "team-{name}"\nsha256 = "{sha(SECRET[name])}"\nread = {read!r}\nwrite = {write!r}\n'
        )
    return "\n".join(out).replace("'", '"')


RIGHTS = {"a": (["a"], ["a"]), "b": (["b"], [])}  # a reads and writes a; b only reads b


@pytest.fixture(scope="module")
def kbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    model, embedder = tiny()
    for name in ("a", "b"):
        with m3db.connect(root / f"{name}.m3db", model=model, embedder=embedder) as db:
            db.add_documents(documents(name), progress=False)
    keys = root / "keys.toml"
    keys.write_text(keys_toml(RIGHTS))
    return root, keys


def leaks(name: str, text: str) -> bool:
    """Whether a response to tenant `name`'s key holds anything of the other tenant's."""
    other = OTHER[name]
    return CAPITAL[other] in text or f'"team": "{other}"' in text or f"team-{other}" in text


def exercise(http_for, name: str, round_: int) -> list[str]:
    """Every endpoint, as tenant `name`'s key, on its own knowledge base and on the other's;
    returns what went wrong (empty: nothing)."""
    http, other, wrong = http_for(name), OTHER[name], []

    def expect(response, status, what):
        if response.status_code != status:
            wrong.append(f"{name}: {what}: {response.status_code} {response.text[:200]}")
        if leaks(name, response.text):
            wrong.append(f"{name}: {what}: the other tenant's data: {response.text[:300]}")
        return response

    question = [{"role": "user", "content": f"What is the capital city of Zorblax? ({round_})"}]
    r = expect(
        http.post("/v1/chat/completions", json={"model": name, "messages": question, "max_tokens": 4}), 200, "chat"
    )
    if r.status_code == 200 and not any(CAPITAL[name] in m["text"] for m in r.json().get("memories", [])):
        wrong.append(f"{name}: chat read none of its own memories: {r.text[:300]}")
    body = {"model": name, "prompt": "The capital of Zorblax is", "max_tokens": 3, "stream": True}
    expect(http.post("/v1/completions", json=body), 200, "streamed completion")
    expect(http.post("/v1/embeddings", json={"model": name, "input": "capital"}), 200, "embeddings")
    r = expect(http.post("/v1/memories/search", json={"model": name, "query": "capital city", "k": 5}), 200, "search")
    if r.status_code == 200 and not any(CAPITAL[name] in d["text"] for d in r.json()["data"]):
        wrong.append(f"{name}: search found none of its own memories")
    expect(http.get("/v1/memories/0", params={"model": name}), 200, "get")
    sql = {"model": name, "query": "SELECT m.text, m.team FROM memories m ORDER BY id"}
    r = expect(http.post("/v1/sql", json=sql), 200, "sql")
    expect(http.get("/v1/models/" + name), 200, "model card")
    models = expect(http.get("/v1/models"), 200, "models").json()
    if [m["id"] for m in models["data"]] != [name]:
        wrong.append(f"{name}: /v1/models lists {models}")
    # the other tenant's knowledge base: the 404 of a name not served, for every way to name it
    for what, response in [
        ("chat", http.post("/v1/chat/completions", json={"model": other, "messages": question})),
        ("search", http.post("/v1/memories/search", json={"model": other, "query": "capital"})),
        ("get", http.get("/v1/memories/0", params={"model": other})),
        ("forget", http.delete("/v1/memories/0", params={"model": other})),
        ("sql", http.post("/v1/sql", json={"model": other, "query": "SELECT text FROM memories"})),
        ("add", http.post("/v1/documents", json={"model": other, "documents": [{"text": "x"}]})),
        ("card", http.get("/v1/models/" + other)),
        ("server", http.get("/v1/server", params={"model": other})),
    ]:
        expect(response, 404, f"{what} on the other tenant")
        if response.status_code == 404 and response.json()["error"]["code"] != "model_not_found":
            wrong.append(f"{name}: {what} on the other tenant: {response.text}")
    # no statement reaches another catalog: files are refused, other catalogs are not attached
    for query in ("SELECT * FROM b.memories", "ATTACH 'x.duckdb' AS x", "SELECT * FROM read_csv('keys.toml')"):
        r = http.post("/v1/sql", json={"model": name, "query": query})
        if r.status_code != 400 or leaks(name, r.text):
            wrong.append(f"{name}: {query!r}: {r.status_code} {r.text[:200]}")
    return wrong


def run_both(http_for, rounds=3) -> list[str]:
    """Both tenants' exercises, concurrently (so their generations overlap in the server)."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(exercise, http_for, name, i) for i in range(rounds) for name in ("a", "b")]
        return [w for f in futures for w in f.result()]


def writes(http_for) -> list[str]:
    wrong = []
    a, b = http_for("a"), http_for("b")
    r = a.post("/v1/documents", json={"model": "a", "documents": [{"text": "Vell has a harbour.", "source": "h.txt"}]})
    if r.status_code != 200:
        wrong.append(f"a may write a: {r.status_code} {r.text}")
    for what, r in [
        ("add", b.post("/v1/documents", json={"model": "b", "documents": [{"text": "Drun has a harbour."}]})),
        ("forget", b.delete("/v1/memories/0", params={"model": "b"})),
        ("sql", b.post("/v1/sql", json={"model": "b", "query": "DELETE FROM memories"})),
    ]:
        if r.status_code != 403 or r.json()["error"]["code"] != "permission_denied":
            wrong.append(f"b may not write b ({what}): {r.status_code} {r.text}")
    if b.post("/v1/sql", json={"model": "b", "query": "SELECT count(*) FROM memories"}).json()["rows"] != [[2]]:
        wrong.append("b's knowledge base changed")
    return wrong


def test_a_key_reaches_only_its_knowledge_bases_in_process(kbs):
    root, keys = kbs
    from starlette.testclient import TestClient

    model, embedder = tiny()
    dbs = {n: m3db.connect(root / f"{n}.m3db", model=model, embedder=embedder) for n in ("a", "b")}
    try:
        with TestClient(tenants(dbs, str(keys), write=True)) as client:
            clients = {}
            for n in ("a", "b"):
                clients[n] = TestClient(client.app, headers={"Authorization": f"Bearer {SECRET[n]}"})
            assert run_both(clients.__getitem__) == []
            assert writes(clients.__getitem__) == []
            assert client.get("/v1/models").status_code == 401
            a = clients["a"]
            r = a.post("/v1/models")
            assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
            r = a.post("/v1/memories/search", json={"query": "capital"})  # which knowledge base?
            assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
            assert a.get("/v1/memories/0").json()["error"]["param"] == "model"
            r = a.post("/v1/sql", content=b"{not json")
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
            assert a.get("/no/such/path").status_code == 404
            assert client.get("/v1/models", headers={"Authorization": "Bearer " + sha(SECRET["a"])}).status_code == 401
    finally:
        for db in dbs.values():
            db.close()


def test_a_key_reaches_only_its_knowledge_bases_over_http_and_a_reload_takes_effect(kbs, tmp_path):
    root, _ = kbs
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml(RIGHTS))
    kb_args = ("--kb", f"a={root / 'a.m3db'}", "--kb", f"b={root / 'b.m3db'}", "--keys", str(keys), "--write")
    server = ServerProcess([], *kb_args, *TINY, sends_key=SECRET["a"])
    try:
        clients = {
            n: httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {SECRET[n]}"}, timeout=60)
            for n in ("a", "b")
        }
        assert run_both(clients.__getitem__, rounds=2) == []
        assert writes(clients.__getitem__) == []
        # b is given a too: after SIGHUP, without a restart, b lists and reads it
        keys.write_text(keys_toml({"a": (["a"], ["a"]), "b": (["a", "b"], [])}))
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while [m["id"] for m in clients["b"].get("/v1/models").json()["data"]] != ["a", "b"]:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.2)
        r = clients["b"].post("/v1/memories/search", json={"model": "a", "query": "capital"})
        assert r.status_code == 200 and "Vell" in r.text
        # a file that does not check out keeps the keys read before, and says why in the log
        keys.write_text('[[keys]]\nname = "x"\nsha256 = "not hex"\nread = []\n')
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "not reloaded" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.2)
        assert clients["b"].get("/v1/models").status_code == 200
        for c in clients.values():
            c.close()
        assert server.stop() == 0, server.output()
        log = server.output()
        assert "Traceback" not in log, log
        for secret in SECRET.values():  # no secret, nor its hash, in the log
            assert secret not in log and sha(secret) not in log
    finally:
        server.close()


def test_the_keys_file_is_checked_when_read():
    served = {"a": True, "b": False}
    good = f'[[keys]]\nname = "t"\nsha256 = "{"0" * 64}"\nread = ["a", "b"]\nwrite = ["a"]\n'
    keys = Keys.parse(good.encode(), served)
    assert keys.match(b"anything") is None
    assert Keys.parse(good.replace("0" * 64, sha("s3cret")).encode(), served).match(b"s3cret").name == "t"
    bad = {
        "not valid TOML": "[[keys]\n",
        "holds no key": "",
        "unknown field 'raed'": good.replace("read =", "raed ="),
        "read is missing": good.replace('read = ["a", "b"]\n', ""),
        "does not serve": good.replace('"b"]', '"c"]'),
        "but not read it": good.replace('["a", "b"]', '["b"]'),
        "served read-only": good.replace('write = ["a"]', 'write = ["a", "b"]'),
        "64 hex digits": good.replace("0" * 64, "s3cret"),
        "named 't'": good + good.replace("0" * 64, "1" * 64),
        "sha256 of an earlier key": good + good.replace('name = "t"', 'name = "u"'),
        "unknown table": good + "[server]\nport = 1\n",
    }
    for message, text in bad.items():
        with pytest.raises(m3db.InvalidInputError, match=message):
            Keys.parse(text.encode(), served)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--kb", "a=x.m3db"), "give --keys FILE"),
        (("--kb", "a", "--keys", "k.toml"), "expected NAME=PATH"),
        (("--kb", "a=nowhere.m3db", "--keys", "k.toml"), "nothing at 'nowhere.m3db'"),
        (("--keys", "k.toml", "--api-key", "0123456789"), "--keys replaces --api-key"),
        (("--kb", "a=.", "--keys", "missing.toml"), "no such file"),
    ],
)
def test_serve_refuses_what_it_cannot_serve(args, message, kbs, capsys, tmp_path, monkeypatch):
    from m3db.cli.main import main

    monkeypatch.chdir(tmp_path)
    path = () if args[0] == "--kb" else (str(kbs[0] / "a.m3db"),)
    assert main(["serve", *path, *args]) == 1
    assert message in capsys.readouterr().err

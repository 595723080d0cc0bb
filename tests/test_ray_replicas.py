"""The server's replicas on Ray Serve (issue 31): a real `m3db serve PATH --ray --replicas 2`
process on a local Ray cluster this test starts. Both replicas answer (their own process each),
their answers equal a single in-process server's, writes are refused (read-only by design), and a
replica killed under load is replaced with no request lost (the clients retry a 5xx or a dropped
connection, as the openai client does). Slow: Ray and two replicas take a minute or two to start
on two cores."""

import concurrent.futures
import os
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

import m3db  # noqa: E402
from tests.server_models import tiny  # noqa: E402
from tests.server_process import ROOT, ServerProcess  # noqa: E402
from tests.test_server import KEY, TINY, build  # noqa: E402

QUESTIONS = ["Where is Zorblax?", "What is bread made from?", "Was ist die Hauptstadt Deutschlands?"]


@pytest.fixture(scope="module")
def cluster():
    # the replicas import the test's model factory (tests.server_models): they inherit this path
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def chat(http, question):
    body = {"model": "kb", "messages": [{"role": "user", "content": question}], "max_tokens": 6, "temperature": 0}
    return http.post("/v1/chat/completions", json=body)


def answer(response) -> tuple:
    data = response.json()
    return data["choices"][0]["message"]["content"], [(m["id"], m["text"]) for m in data["memories"]]


def with_retries(send, tries=8):
    """What a client of replicas does: retry a 5xx or a dropped connection (the openai client
    retries both), a moment apart."""
    for attempt in range(tries):
        try:
            r = send()
            if r.status_code < 500:
                return r
        except httpx.TransportError:
            pass
        time.sleep(0.5 * (attempt + 1))
    return r


def replica_pids(http, n=40) -> set:
    """The processes that answer n requests, sent four at a time (Serve's router sends a request
    to the less busy of two replicas: one at a time, either may answer them all)."""

    def pid(_):
        return with_retries(lambda: http.get("/v1/server")).json()["pid"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return set(pool.map(pid, range(n)))


def wait_for(condition, what, seconds, server):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds} s\n{server.output()}"
        time.sleep(1)


@pytest.mark.slow
def test_replicas_answer_alike_and_survive_a_killed_replica(cluster, tmp_path):
    kb = build(tmp_path / "kb.m3db")
    model, embedder = tiny()
    from starlette.testclient import TestClient

    from m3db.bindings.server import app

    with m3db.connect(kb, read_only=True, model=model, embedder=embedder) as db, TestClient(app(db)) as single:
        expected = {q: answer(chat(single, q)) for q in QUESTIONS}
    server = ServerProcess([kb], "--ray", "--replicas", "2", "--ray-address", cluster, *TINY, api_key=KEY, timeout=300)
    try:
        # /health answers once one replica is up; the command says "serving" once both are
        wait_for(lambda: "replicas on Ray Serve; read-only" in server.output(), "serving", 300, server)
        with server.client(timeout=120) as http:
            first = replica_pids(http)
            assert len(first) == 2, first  # both replicas answer, each its own process
            for q in QUESTIONS * 2:
                assert answer(with_retries(lambda q=q: chat(http, q))) == expected[q]
            r = http.post("/v1/documents", json={"documents": [{"text": "Vell has a harbour."}]})
            assert r.status_code == 403 and r.json()["error"]["code"] == "read_only", r.text

            # load from four clients while one replica is killed
            results, stop = [], threading.Event()

            def load(i):
                with server.client(timeout=120) as c:
                    while not stop.is_set():
                        q = QUESTIONS[i % len(QUESTIONS)]
                        r = with_retries(lambda: chat(c, q))
                        results.append((q, r.status_code, answer(r) if r.status_code == 200 else r.text))

            threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            time.sleep(3)
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
            victim = next(n for n in names if n.startswith("SERVE_REPLICA::") and "m3db" in n)
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            # Serve starts a replica in its place: two processes answer again, one of them new
            wait_for(
                lambda: (lambda now: len(now) == 2 and now != first)(replica_pids(http, 20)),
                "a new replica",
                240,
                server,
            )
            stop.set()
            for t in threads:
                t.join(180)
            assert results, "no request ran"
            lost = [r for r in results if r[1] != 200]
            assert not lost, lost[:3]
            assert all(got == expected[q] for q, _, got in results)
        assert server.stop() == 0, server.output()
        assert "stopped" in server.output()
    finally:
        server.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--write",), "read-only replicas"),
        (("--keys", "k.toml"), "drop --kb and --keys"),
        (("--replicas", "0"), "positive"),
    ],
)
def test_replicas_refuse_what_they_cannot_do(args, message, tmp_path, capsys):
    from m3db.cli.main import main

    kb = build(tmp_path / "kb.m3db")
    assert main(["serve", str(kb), "--ray", *args]) == 1
    assert message in capsys.readouterr().err

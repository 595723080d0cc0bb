"""`m3db serve` as a real process on a free port, through real clients: the official `openai`
client for the OpenAI endpoints, httpx for the memory endpoints and for bad input. The model is
the tiny random decoder with the hashing embedder (tests/server_models.py), so this stays fast;
the bundled model's run is marked slow."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("starlette")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import m3db  # noqa: E402
from m3db.model.memory import context_start  # noqa: E402
from tests.server_models import BUG, POISON, tiny  # noqa: E402
from tests.server_process import ROOT, ServerProcess  # noqa: E402

KEY = "test-key-0123456789"
TINY = ("--model", "tests.server_models:tiny")
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
QUESTIONS = [f"Question {i}: where is {w}?" for i, w in enumerate(["Zorblax", "Vell", "Berlin", "the bread"] * 8)]


@pytest.fixture(scope="module")
def model():
    return tiny()[0]


def build(path, docs=DOCS):
    m, e = tiny()
    with m3db.connect(path, model=m, embedder=e) as db:
        db.add_documents(docs, progress=False)
    return path


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    return build(tmp_path_factory.mktemp("kb") / "kb.m3db")


@pytest.fixture(scope="module")
def server(kb):
    s = ServerProcess([kb], *TINY, api_key=KEY)
    yield s
    assert s.stop() == 0, s.output()
    assert "closed" in s.output()
    s.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def http(server):
    with server.client() as c:
        yield c


def ask(client, question, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="kb", messages=[{"role": "user", "content": question}], **kw)


def error_of(response, status):
    """The OpenAI-shaped error of a response that must have `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"], error
    assert "Traceback" not in response.text
    return error


# -- the OpenAI endpoints, with the official client --------------------------------------------


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["kb"]
    assert client.models.retrieve("kb").id == "kb"


def test_chat_answers_with_memories_and_counts_tokens(client, model):
    messages = [{"role": "user", "content": "Where is Zorblax?"}]
    r = ask(client, "Where is Zorblax?", max_tokens=24)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt = model.tokenizer.apply_chat_template(messages)
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # where the time went (Answer.timings), from the request's arrival: the parts fit in the whole
    timings = r.usage.model_extra["timings"]
    assert {"embed", "search", "read", "recall", "prefill", "first_token", "decode", "total"} <= set(timings)
    assert timings["recall"] + timings["prefill"] + timings["decode"] <= timings["total"] * 1.001
    memories = r.model_extra["memories"]
    assert memories and {"id", "document", "text"} <= set(memories[0])
    assert {m["document"] for m in memories} <= {"zorblax.txt", "bread.txt", "berlin.txt"}
    assert r.model_extra["memory"] == "memory"
    # without memory, the server's answer is the model's own, decoded in this process
    r = ask(client, "Where is Zorblax?", max_tokens=24, extra_body={"memory": "none"})
    g = model.generate(messages, mode="none", max_tokens=24)
    assert r.choices[0].message.content == g.text and r.choices[0].finish_reason == g.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (g.prompt_tokens, len(g.tokens))


def test_stream_equals_non_stream_at_temperature_0(client):
    for question, kw in [("Where is Zorblax?", {}), ("Tell me about bread.", {"stop": ["e", "a"]})]:
        whole = ask(client, question, max_tokens=40, **kw)
        pieces, finish, memories, usage = [], None, None, None
        for chunk in ask(client, question, max_tokens=40, stream=True, stream_options={"include_usage": True}, **kw):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
                memories = (chunk.model_extra or {}).get("memories", memories)
        assert "".join(pieces) == whole.choices[0].message.content
        assert finish == whole.choices[0].finish_reason
        assert memories == whole.model_extra["memories"]
        assert usage.completion_tokens == whole.usage.completion_tokens
        if kw:
            assert not any(s in whole.choices[0].message.content for s in kw["stop"])


def test_stream_chunks_have_openai_shapes(http):
    body = {
        "model": "kb",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    # one id, created and model on every chunk; the first says the role, the last choice says
    # why it ended, then a usage chunk without choices
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *pieces, last, usage = chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in pieces)
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 5
    assert usage["usage"]["timings"]["first_token"] <= usage["usage"]["timings"]["total"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_finish_reasons_are_openai_values():
    from m3db.bindings.server.openai import finish_reason

    # m3db's Answer says "empty" when the model ends its turn before any text: to OpenAI, a stop
    assert [finish_reason(r) for r in ("stop", "length", "empty")] == ["stop", "length", "stop"]


def test_sampling_edges(http, model):
    greedy = http.post("/v1/chat/completions", json=chat_body("Where is Vell?", 8)).json()
    # a temperature too small to divide by is greedy decoding (it was a 500)
    tiny_t = http.post("/v1/chat/completions", json=dict(chat_body("Where is Vell?", 8), temperature=1e-300))
    assert tiny_t.status_code == 200, tiny_t.text
    assert tiny_t.json()["choices"][0]["message"] == greedy["choices"][0]["message"]
    # null means "not set" to many clients
    r = http.post("/v1/chat/completions", json=dict(chat_body("Where is Vell?", 8), n=None, presence_penalty=None))
    assert r.status_code == 200, r.text
    # without max_tokens, a long prompt gets the room its prompt leaves, not a 400
    long = {"model": "kb", "messages": [{"role": "user", "content": "Vell " * 350}]}
    r = http.post("/v1/chat/completions", json=long)
    assert r.status_code == 200, r.text
    usage, room = r.json()["usage"], 2048 - context_start(model.settings, model.sink_keys.shape[2])
    assert room - 256 < usage["prompt_tokens"] and 0 < usage["completion_tokens"] <= room - usage["prompt_tokens"]


def test_memory_modes_and_filter(client):
    none = ask(client, "Where is Zorblax?", max_tokens=8, extra_body={"memory": "none"})
    assert none.model_extra["memories"] == [] and none.model_extra["memory"] == "none"
    rag = ask(client, "Where is Zorblax?", max_tokens=8, extra_body={"memory": "rag", "k": 1})
    assert len(rag.model_extra["memories"]) == 1
    de = ask(client, "Where is Zorblax?", max_tokens=8, extra_body={"where": "lang = ?", "params": ["de"]})
    assert [m["document"] for m in de.model_extra["memories"]] == ["berlin.txt"]


def test_completions_one_and_several_prompts(client, model):
    one = client.completions.create(model="kb", prompt="The moon Zorblax", max_tokens=12, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1
    assert one.usage.prompt_tokens == len(model.tokenizer.encode("The moon Zorblax"))
    both = client.completions.create(model="kb", prompt=["The moon Zorblax", "Bread is"], max_tokens=12, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == one.choices[0].text  # batched with another prompt: the same answer
    assert both.usage.prompt_tokens == one.usage.prompt_tokens + len(model.tokenizer.encode("Bread is"))
    streamed = client.completions.create(
        model="kb", prompt="The moon Zorblax", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == one.choices[0].text


def test_embeddings(client):
    texts = ["capital of Quendor", "flour and yeast"]
    r = client.embeddings.create(model="kb", input=texts)  # the client asks for base64 by default
    expected = tiny()[1].embed(texts)
    assert len(r.data) == 2 and r.model == "kb"
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), expected, atol=1e-6)
    r = client.embeddings.create(model="kb", input="flour and yeast", encoding_format="float")
    np.testing.assert_allclose(r.data[0].embedding, expected[1], atol=1e-6)


def test_unsupported_sampling_fields_are_refused(client):
    for kw in ({"n": 2}, {"presence_penalty": 0.5}, {"logit_bias": {"5": 1}}, {"tools": [{"type": "function"}]}):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, "hi", max_tokens=4, **kw)
        assert "not supported" in str(e.value)
    ask(client, "hi", max_tokens=4, n=1, presence_penalty=0)  # the values meaning "off" are fine
    with pytest.raises(openai.NotFoundError, match="serves 'kb'"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_seeded_sampling_reproduces(client):
    a = ask(client, "Say something", max_tokens=16, temperature=1.0, seed=7)
    b = ask(client, "Say something", max_tokens=16, temperature=1.0, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content


# -- the memory endpoints, with httpx ----------------------------------------------------------


def test_search_get_sql(http):
    r = http.post("/v1/memories/search", json={"query": "moon of Quendor", "k": 2})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and data[0]["document"] == "zorblax.txt" and data[0]["score"] >= data[1]["score"]
    r = http.post("/v1/memories/search", json={"query": "moon", "where": "lang = ?", "params": ["de"]})
    assert [d["document"] for d in r.json()["data"]] == ["berlin.txt"]
    vector = tiny()[1].embed(["flour water yeast"])[0].tolist()
    r = http.post("/v1/memories/search", json={"vector": vector, "k": 1})
    assert r.json()["data"][0]["document"] == "bread.txt"
    first = data[0]["id"]
    m = http.get(f"/v1/memories/{first}").json()
    assert m["text"].startswith("Zorblax") and m["metadata"] == {"lang": "en"} and m["document"] == "zorblax.txt"
    error_of(http.get("/v1/memories/9999"), 404)
    rows = http.post("/v1/sql", json={"query": "SELECT lang, count(*) n FROM memories GROUP BY lang ORDER BY lang"})
    assert rows.json() == {"columns": ["lang", "n"], "rows": [["de", 1], ["en", 2]]}
    # JSON has no infinity (it was a 500, and the connection closed under the next request)
    rows = http.post(
        "/v1/sql", json={"query": "SELECT 'inf'::DOUBLE a, '-inf'::DOUBLE b, 'nan'::DOUBLE c, 1.5::DOUBLE d"}
    )
    assert rows.status_code == 200 and rows.json()["rows"] == [[None, None, None, 1.5]], rows.text
    schema = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/memories/search", "/v1/sql", "/v1/documents"} <= set(schema["paths"])
    chat = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"messages", "memory", "k", "where"} <= set(chat["properties"])


def test_writes_refused_on_a_read_only_server(http):
    assert error_of(http.post("/v1/documents", json={"documents": [{"text": "x"}]}), 403)["code"] == "read_only"
    assert error_of(http.delete("/v1/memories/0"), 403)["code"] == "read_only"
    error_of(http.post("/v1/sql", json={"query": "DELETE FROM memories"}), 403)
    error_of(http.post("/v1/sql", json={"query": "CREATE TABLE t (x INT)"}), 400)


def test_api_key(server):
    with httpx.Client(base_url=server.url) as anon:
        assert error_of(anon.get("/v1/models"), 401)["code"] == "invalid_api_key"
        error_of(anon.get("/v1/models", headers={"Authorization": "Bearer wrong-key-xxxxxxxx"}), 401)
        error_of(anon.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401)
        error_of(anon.get("/openapi.json"), 401)
        assert anon.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


BAD_CHAT = [
    ({"model": "kb"}, "missing_field"),
    ({"model": "kb", "messages": "hi"}, "invalid_type"),
    ({"model": "kb", "messages": []}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": 5}]}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "invalid_value"),
    ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, "invalid_type"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, "invalid_type"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, "invalid_type"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "invalid_type"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "colour": "red"}, "unknown_field"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "memory": "dense"}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "k": 99}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "k": 6}, "invalid_value"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "where": "no_such_column = 1"}, "query"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "where": "lang = ?"}, "query"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "where": "1; DROP TABLE memories"}, "query"),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "memory": "none", "k": 2}, "invalid_value"),
    (
        {"model": "kb", "messages": [{"role": "user", "content": "x" * 3000}], "max_tokens": 10},
        "context_length_exceeded",
    ),
    ({"model": "kb", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"x": 1}}, "invalid_value"),
    # torch takes a 64-bit seed: a larger one was a 500
    (
        {"model": "kb", "messages": [{"role": "user", "content": "hi"}], "temperature": 1, "seed": 10**30},
        "invalid_value",
    ),
    (
        {"model": "kb", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
        "invalid_value",
    ),
]


@pytest.mark.parametrize("body,code", BAD_CHAT, ids=[c for _, c in BAD_CHAT])
def test_bad_chat_requests_are_400(http, body, code):
    assert error_of(http.post("/v1/chat/completions", json=body), 400)["code"] == code


def test_malformed_and_oversized_bodies(http, server):
    for raw in (b"{not json", b"", b"[1, 2]", b'"text"', b'{"model": NaN}', b"\xff\xfe", b"[" * 100_000):
        error_of(http.post("/v1/chat/completions", content=raw), 400)
    big = json.dumps({"model": "kb", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]})
    assert error_of(http.post("/v1/chat/completions", content=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    error_of(http.post("/v1/chat/completions", content=chunks()), 413)
    error_of(http.get("/v1/nothing"), 404)
    error_of(http.get("/v1/chat/completions"), 405)
    surrogate = b'{"model": "kb", "messages": [{"role": "user", "content": "\\ud800"}]}'
    assert error_of(http.post("/v1/chat/completions", content=surrogate), 400)["code"] == "invalid_json"
    error_of(http.get("/v1/memories/abc"), 400)
    error_of(http.get("/v1/memories/\u0663"), 400)  # an Arabic-Indic 3: int() reads it, an id is ASCII
    error_of(http.get("/v1/memories/1?colour=red"), 400)
    error_of(http.post("/v1/memories/search", json={"query": "x", "vector": [1.0]}), 400)
    error_of(http.post("/v1/memories/search", json={"vector": [1.0, 2.0]}), 400)
    error_of(http.post("/v1/memories/search", json={"vector": ["a"]}), 400)
    error_of(http.post("/v1/memories/search", json={"query": "x", "k": 0}), 400)
    error_of(http.post("/v1/sql", json={"query": "SELEC 1"}), 400)
    error_of(http.post("/v1/sql", json={"query": "SELECT ?", "params": "x"}), 400)
    error_of(http.post("/v1/embeddings", json={"model": "kb", "input": [1, 2]}), 400)
    error_of(http.post("/v1/embeddings", json={"model": "kb", "input": "x", "dimensions": 3}), 400)
    error_of(http.post("/v1/completions", json={"model": "kb", "prompt": "hi", "echo": True}), 400)
    assert http.get("/health").status_code == 200  # still healthy after all of it


# -- concurrency -------------------------------------------------------------------------------


def chat_body(question, max_tokens=24):
    return {"model": "kb", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}


def post_all(server, bodies, path="/v1/chat/completions"):
    """POST every body at once, from its own thread; return the responses in order."""
    barrier = threading.Barrier(len(bodies))

    def one(body):
        with server.client() as c:
            barrier.wait()
            return c.post(path, json=body)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_32_concurrent_clients_get_the_answers_of_one_at_a_time(server, http):
    before = http.get("/v1/server").json()["generation"]
    bodies = [chat_body(q) for q in QUESTIONS]
    together = post_all(server, bodies)
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    after = http.get("/v1/server").json()["generation"]
    assert after["largest_batch"] > 1 and after["batches"] - before.get("batches", 0) < len(bodies)
    alone = [http.post("/v1/chat/completions", json=b) for b in bodies]
    for t, a in zip(together, alone):
        assert t.json()["choices"][0]["message"] == a.json()["choices"][0]["message"]
        assert t.json()["memories"] == a.json()["memories"]
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert [t.json()["usage"][n] for n in counts] == [a.json()["usage"][n] for n in counts]
    assert len({r.json()["choices"][0]["message"]["content"] for r in together}) > 1
    assert http.get("/health").status_code == 200


def test_a_disconnected_client_stops_its_generation(server, http):
    before = http.get("/v1/server").json()["generation"]
    with server.client() as c:
        body = dict(chat_body("Tell me a long story", max_tokens=1000), stream=True)
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
    # the server notices at its next write, and the worker at its next step
    for _ in range(100):
        state = http.get("/v1/server").json()["generation"]
        if state["running"] == 0 and state.get("cancelled", 0) > before.get("cancelled", 0):
            break
        time.sleep(0.05)
    assert state["running"] == 0 and state["cancelled"] > before.get("cancelled", 0), state
    assert state["tokens"] - before.get("tokens", 0) < 1000


@pytest.fixture(scope="module")
def small(kb):
    """A server with a short queue and small batches, and the tiny model with faults on demand
    (tests/server_models.py: faulty); SIGINT closes it when the module's tests are done."""
    s = ServerProcess([kb], "--model", "tests.server_models:faulty", "--max-queue", "4", "--max-batch", "2")
    yield s
    assert s.stop(signal.SIGINT) == 0, s.output()
    assert "closed" in s.output()
    s.close()


def test_full_queue_answers_429(small):
    bodies = [chat_body(q, max_tokens=48) for q in QUESTIONS]
    got = post_all(small, bodies)
    assert {r.status_code for r in got} <= {200, 429}
    refused = [r for r in got if r.status_code == 429]
    assert refused and error_of(refused[0], 429)["type"] == "rate_limit_error"
    with small.client() as c:
        for body, r in zip(bodies, got):
            if r.status_code == 200:
                alone = c.post("/v1/chat/completions", json=body).json()
                assert r.json()["choices"][0]["message"] == alone["choices"][0]["message"]


def decoded_together(server, bodies):
    """POST every body to /v1/chat/completions while a long stream holds the worker, and let go
    once all are queued: requests that can share a batch are decoded in one. Their responses."""
    # greedy, this prompt runs 941 tokens; the line iterator is held (one dropped closes the stream)
    long = {"model": "kb", "prompt": "Once upon a time", "max_tokens": 1000, "memory": "none", "stream": True}
    with server.client(timeout=30) as c, c.stream("POST", "/v1/completions", json=long) as r:
        lines = r.iter_lines()
        next(lines)
        with server.client(timeout=30) as c2, concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(c2.post, "/v1/chat/completions", json=b) for b in bodies]
            for _ in range(200):
                if c.get("/v1/server").json()["generation"]["queued"] == len(bodies):
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the requests did not queue behind the long stream")
            r.close()  # cancels the long stream
            return [f.result() for f in futures]


def settled(c) -> dict:
    """The generator's counters once its batch is let go (just after the batch's last answer)."""
    for _ in range(100):
        state = c.get("/v1/server").json()["generation"]
        if state["running"] == 0:
            break
        time.sleep(0.02)
    return state


def test_a_failing_request_fails_alone_and_frees_its_queue_slot(small):
    """A request that fails inside the batcher or in its handler gets a 500 in OpenAI's shape,
    never a hang; its companion in a batch gets its own answer; no queue slot leaks; a
    kept-alive connection stays usable."""
    poison = chat_body(f"Where is {POISON}Vell?", 8)
    good = chat_body("Where is Vell?", 8)
    with small.client(timeout=20) as c:
        for _ in range(6):  # more failures than queue slots: a leak would end in 429s
            assert error_of(c.post("/v1/chat/completions", json=poison), 500)["code"] == "server_error"
        assert error_of(c.post("/v1/chat/completions", json=dict(poison, stream=True)), 500)
        # a bug in a handler: answered as a 500 by the handler, so the connection stays open
        error_of(c.post("/v1/chat/completions", json=chat_body(f"Where is {BUG}Vell?", 8)), 500)
        alone = c.post("/v1/chat/completions", json=good).json()
        together = decoded_together(small, [poison, good])
        assert error_of(together[0], 500)["code"] == "server_error"
        assert together[1].status_code == 200, together[1].text
        assert together[1].json()["choices"][0]["message"] == alone["choices"][0]["message"]
        state = settled(c)
        assert state["largest_batch"] == 2 and state["queued"] == state["running"] == 0, state
        assert c.post("/v1/chat/completions", json=good).status_code == 200


def serve_cli(*args, timeout=60):
    """`m3db serve ARGS` run to its end: (exit code, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), M3DB_API_KEY="")
    cmd = [sys.executable, "-m", "m3db.cli", "serve", *map(str, args)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def test_serve_fails_loudly_on_a_newcomers_mistakes(tmp_path, kb, capsys):
    """The first things typed: each ends at once with `error: ...` saying what to do, exit 1,
    no traceback (in this process, through the command line's main, but for the last)."""
    from m3db.cli.main import main

    (tmp_path / "notes.txt").write_text("not a database")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            ((tmp_path / "kb.m3bd",), "no database at"),
            ((tmp_path / "notes.txt",), "an m3db database is a directory"),
            ((kb, tmp_path / "more.m3kb"), "no package at"),
            ((kb, "--port", str(port)), f"port {port} is already in use"),
            ((kb, "--host", "no-such-host.invalid"), "not an address this machine can listen on"),
        ]
        for args, message in cases:
            assert main(["serve", *map(str, args), *TINY]) == 1, args
            err = capsys.readouterr().err
            assert err.startswith("error: ") and message in err and "serving" not in err, (args, err)
    path = build(tmp_path / "open.m3db")
    with m3db.connect(path, model=tiny()[0], embedder=tiny()[1]):  # a writer in another process
        code, err = serve_cli(path, *TINY)
    assert code == 1 and err.startswith("error: ") and "open for writing in another process" in err, err
    assert "Traceback" not in err


# -- a writable server -------------------------------------------------------------------------


def test_writable_server_adds_forgets_and_closes_cleanly_on_sigterm(tmp_path):
    path = build(tmp_path / "kb.m3db")  # served as model "kb"
    s = ServerProcess([path], *TINY, "--write", "--grace", "2")
    try:
        with s.client() as c:
            r = c.post(
                "/v1/documents",
                json={
                    "documents": [
                        {"text": "Quimby lies on the river Flent.", "source": "quimby", "metadata": {"lang": "en"}}
                    ]
                },
            )
            assert r.status_code == 200, r.text
            (added,) = r.json()["data"]
            assert added["added"] and len(added["memory_ids"]) == 1
            new_id = added["memory_ids"][0]
            found = c.post("/v1/memories/search", json={"query": "river Flent", "k": 1}).json()["data"]
            assert found[0]["id"] == new_id
            assert (
                c.post(
                    "/v1/documents",
                    json={"documents": [{"text": "Quimby lies on the river Flent.", "source": "quimby"}]},
                ).json()["data"][0]["added"]
                is False
            )
            error_of(c.post("/v1/documents", json={"documents": [{"text": "other", "source": "quimby"}]}), 400)
            error_of(c.post("/v1/documents", json={"documents": [{"txt": "x"}]}), 400)
            for key in ("source", "text"):  # db.add's own arguments: a 500 (TypeError) before
                bad = {"documents": [{"text": "Vell is old.", "metadata": {key: "x"}}]}
                assert "not metadata" in error_of(c.post("/v1/documents", json=bad), 400)["message"]
            assert c.delete(f"/v1/memories/{new_id}").json()["deleted"] is True
            error_of(c.get(f"/v1/memories/{new_id}"), 404)
            error_of(c.delete(f"/v1/memories/{new_id}"), 404)
            r = c.post(
                "/v1/sql",
                json={
                    "query": "INSERT INTO documents (text, source) VALUES (?, ?)",
                    "params": ["Vell is a city.", "vell"],
                },
            )
            assert r.status_code == 200, r.text
        # SIGTERM while 16 clients wait for answers: each is answered or cut off, and the database closes
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(post_all, s, [chat_body(q, 1000)]) for q in QUESTIONS[:16]]
            time.sleep(0.5)
            assert s.stop(signal.SIGTERM) == 0, s.output()
            codes = []
            for f in futures:
                try:
                    codes.append(f.result()[0].status_code)
                except httpx.TransportError:
                    codes.append(None)  # cut off by the shutdown: fine, the server never half-answers
            # those still generating when the grace ends are told so (uvicorn's cancel was a bare 500)
            assert set(codes) <= {200, 503, None} and 503 in codes, codes
        assert "closed" in s.output()
    finally:
        s.close()
    with m3db.connect(path, read_only=True) as db:
        assert db.check().ok
        sources = {r[0] for r in db.sql("SELECT source FROM documents")}
        assert {"quimby", "vell"} <= sources and len(db) == 4


# -- packages ----------------------------------------------------------------------------------


def test_several_packages_serve_together(tmp_path, kb):
    a = tmp_path / "a.m3kb"
    b = tmp_path / "b.m3kb"
    with m3db.connect(kb, read_only=True) as db:
        db.pack(a)
    other = build(tmp_path / "other.m3db", [{"text": "Quimby lies on the river Flent.", "source": "quimby"}])
    with m3db.connect(other, read_only=True) as db:
        db.pack(b)
    s = ServerProcess([a, b], *TINY)
    try:
        with s.client() as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "a+b"
            found = c.post("/v1/memories/search", json={"query": "river Flent", "k": 4}).json()["data"]
            assert found[0]["package"] == "b" and found[0]["document"] == "quimby"
            assert {d["package"] for d in found} == {"a", "b"}
            m = c.get(f"/v1/memories/{found[0]['id']}", params={"package": "b"}).json()
            assert m["text"].startswith("Quimby") and m["package"] == "b"
            error_of(c.get(f"/v1/memories/{found[0]['id']}"), 400)  # which package?
            error_of(c.get("/v1/memories/0", params={"package": "zzz"}), 404)
            r = c.post("/v1/chat/completions", json=dict(chat_body("Where is Quimby?", 8), model="a+b"))
            assert r.status_code == 200, r.text
            assert {m["package"] for m in r.json()["memories"]} <= {"a", "b"}
            error_of(c.post("/v1/documents", json={"documents": [{"text": "x"}]}), 403)
        assert s.stop() == 0
    finally:
        s.close()
    # one package file alone serves too
    s = ServerProcess([b], *TINY)
    try:
        with s.client() as c:
            r = c.post("/v1/memories/search", json={"query": "river Flent", "k": 1}).json()["data"]
            assert r[0]["document"] == "quimby" and "package" not in r[0]
    finally:
        s.stop()
        s.close()


def test_precision_reads_on_quantized_weights(kb):
    """--precision int4: the server answers as the same model read at int4 in process (greedy),
    not as fp32: the flag reaches the decoder."""
    s = ServerProcess([kb], *TINY, "--precision", "int4")
    try:
        with s.client() as c:
            r = c.post("/v1/chat/completions", json=chat_body("When is the Zorblax festival?", 12))
            assert r.status_code == 200, r.text
            served = r.json()["choices"][0]["message"]["content"]
    finally:
        s.stop()
        s.close()
    model, embedder = tiny()
    with m3db.connect(kb, read_only=True, model=model, embedder=embedder, precision="int4") as db:
        local = db.generate("When is the Zorblax festival?", max_tokens=12)
    with m3db.connect(kb, read_only=True, model=model, embedder=embedder) as db:
        full = db.generate("When is the Zorblax festival?", max_tokens=12)
    assert served == local.text
    assert local.text != full.text  # the tiny decoder's int4 answer differs from fp32's: the check can fail


# -- the bundled model (slow) -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
def test_bundled_model_served(tmp_path):
    path = tmp_path / "kb.m3db"
    with m3db.connect(path) as db:
        db.add_documents(DOCS, progress=False)
    s = ServerProcess([path], timeout=300)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", max_retries=0, api_key="unused", timeout=600)
        whole = ask(client, "What is the capital city of Zorblax?", max_tokens=32)
        assert whole.choices[0].message.content and whole.model_extra["memories"][0]["document"] == "zorblax.txt"
        streamed = ask(client, "What is the capital city of Zorblax?", max_tokens=32, stream=True)
        assert (
            "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content
        )
        questions = ["What is the capital city of Zorblax?", "What is bread made from?", "Where is Berlin?"] * 3
        together = post_all(s, [chat_body(q, 24) for q in questions])
        with s.client() as c:
            for q, t in zip(questions, together):
                alone = c.post("/v1/chat/completions", json=chat_body(q, 24)).json()
                assert t.json()["choices"][0]["message"] == alone["choices"][0]["message"]
            assert c.get("/v1/server").json()["generation"]["largest_batch"] > 1
        e = client.embeddings.create(model="kb", input=["capital of Zorblax"])
        assert len(e.data[0].embedding) == 384 and e.usage.prompt_tokens > 2
        assert s.stop() == 0
    finally:
        s.close()


def test_a_prompt_over_the_context_without_max_tokens_does_not_blame_max_tokens(http):
    body = {"model": "kb", "messages": [{"role": "user", "content": "x" * 3000}]}
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded" and "with room for even one token" in error["message"]
    assert "max_tokens=" not in error["message"]  # the client sent none


# -- rag: references recalled while decoding -------------------------------------------------


def rag_overflow(model, chat=True, spare=40, max_tokens=8):
    """A chat message's content (or a completion's prompt) whose prompt leaves `spare` positions
    of the context beside max_tokens: it fits alone, not with any reference's text before it
    (each reference is the prefix and the memory's text, over 40 tokens here)."""
    room = model.decoder.cfg.max_seq_len - max_tokens - spare

    def length(text):
        if not chat:
            return len(model.tokenizer.encode(text))
        messages = [{"role": "user", "content": text}]
        return len(model.tokenizer.encode(model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)))

    text = "Where is Vell? " * ((room - length("")) // 15)
    while length(text) < room:
        text += "x"
    assert length(text) == room
    return text


def test_a_rag_prompt_that_fits_alone_but_not_with_its_references_is_a_400(client, http, model):
    """rag puts the references' text before the prompt, known only once recalled (while
    decoding): a prompt that fits alone but not with them is the client's to fix (fewer
    references, a shorter prompt, a lower max_tokens), not a 500 the openai client retries."""
    content = rag_overflow(model)
    body = {"model": "kb", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "memory": "rag"}
    assert http.post("/v1/chat/completions", json=dict(body, memory="none")).status_code == 200  # it fits alone
    for stream in (False, True):  # a stream that has sent nothing yet answers with the error itself
        r = http.post("/v1/chat/completions", json=dict(body, stream=stream))
        error = error_of(r, 400)
        assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error", error
        assert "fewer references (k), a shorter prompt or a lower max_tokens" in error["message"], error
    prompt = rag_overflow(model, chat=False)
    r = http.post("/v1/completions", json={"model": "kb", "prompt": prompt, "max_tokens": 8, "memory": "rag"})
    assert error_of(r, 400)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="fewer references"):
        ask(client, content, max_tokens=8, extra_body={"memory": "rag"})
    assert http.get("/health").status_code == 200


def test_in_a_batch_only_the_rag_row_over_the_context_fails(small, model):
    """Decoded in one batch with a request that fits, the rag request whose references overflow
    the context gets its 400; the other gets the answer it gets alone."""
    over = {
        "model": "kb",
        "messages": [{"role": "user", "content": rag_overflow(model)}],
        "max_tokens": 8,
        "memory": "rag",
    }
    good = dict(chat_body("Where is Vell?", 8), memory="rag")
    with small.client(timeout=30) as c:
        alone = c.post("/v1/chat/completions", json=good).json()
        before = c.get("/v1/server").json()["generation"]
        together = decoded_together(small, [over, good])
        assert error_of(together[0], 400)["code"] == "context_length_exceeded"
        assert together[1].status_code == 200, together[1].text
        assert together[1].json()["choices"][0]["message"] == alone["choices"][0]["message"]
        assert together[1].json()["memories"] == alone["memories"]
        after = settled(c)
        # the long stream, one batch of the two, then each alone
        assert after["batches"] - before["batches"] == 4 and after["queued"] == after["running"] == 0, after

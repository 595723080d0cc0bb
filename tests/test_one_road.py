"""One road for an answer: the same question through Python, SQL's generate(), `m3db ask`, the HTTP
server and generation over attached packages gets the same answer and the same sources, because
every surface goes through the knowledge layer's AnswerPlan (docs/architecture.md).

Real parts: the tiny decoder of the real architecture and the hashing embedder (the server's test
models), a real database directory, real packages, a real `m3db` process for the CLI and for the
server, the official openai client.
"""

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

import m3db  # noqa: E402
from tests.server_models import tiny  # noqa: E402
from tests.server_process import ROOT, ServerProcess  # noqa: E402

QUESTION = "Where is Zorblax?"
MAX_TOKENS = 24
DOCS = [
    {"text": "Zorblax is a small moon of the planet Quendor. Its capital city is Vell.", "source": "zorblax.txt"},
    {"text": "Bread is made from flour, water and yeast.", "source": "bread.txt"},
    {"text": "Berlin ist die Hauptstadt Deutschlands.", "source": "berlin.txt"},
]
TINY = "tests.server_models:tiny"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A database of DOCS, and two packages that split it (the first two documents, the last)."""
    root = tmp_path_factory.mktemp("road")
    model, embedder = tiny()
    with m3db.connect(root / "kb", model=model, embedder=embedder) as db:
        db.add_documents(DOCS, progress=False)
    for name, docs in (("a", DOCS[:2]), ("b", DOCS[2:])):
        with m3db.connect(root / name, model=model, embedder=embedder) as db:
            db.add_documents(docs, progress=False)
            db.pack(root / f"{name}.m3kb")
    return root


def python_answer(path, **options):
    model, embedder = tiny()
    with m3db.connect(path, read_only=True, model=model, embedder=embedder) as db:
        return db.generate(QUESTION, max_tokens=MAX_TOKENS, **options)


def test_python_sql_cli_and_http_give_one_answer(built):
    answer = python_answer(built / "kb")
    assert answer.sources and answer.mode == "memory"
    sources = [(s.id, s.document, s.text) for s in answer.sources]

    model, embedder = tiny()
    with m3db.connect(built / "kb", read_only=True, model=model, embedder=embedder) as db:
        (row,) = db.sql(f"SELECT text, sources FROM generate('{QUESTION}', max_tokens => {MAX_TOKENS})")
    assert row[0] == answer.text
    assert [(s["id"], s["document"], s["text"]) for s in row[1]] == sources

    cli = subprocess.run(
        [sys.executable, "-m", "m3db.cli", "ask", str(built / "kb"), QUESTION, "--model", TINY, "--json"]
        + ["--max-tokens", str(MAX_TOKENS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert out["answer"] == answer.text.strip()
    assert [(s["id"], s["document"], s["text"]) for s in out["sources"]] == sources

    server = ServerProcess([built / "kb"], "--model", TINY)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="kb", messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == answer.text
        assert [(m["id"], m["document"], m["text"]) for m in reply.model_extra["memories"]] == sources
    finally:
        assert server.stop() == 0, server.output()
        server.close()


def test_generation_over_attached_packages_in_python_and_over_http(built):
    packages = [built / "a.m3kb", built / "b.m3kb"]
    model, embedder = tiny()
    with m3db.connect(packages, model=model, embedder=embedder) as kbs:
        assert isinstance(kbs, m3db.PackageSet)
        answer = kbs.generate(QUESTION, max_tokens=MAX_TOKENS)
        assert {s.package for s in answer.sources} <= {"a", "b"} and answer.sources
        assert all(isinstance(i, tuple) and i[0] in ("a", "b") for c in answer.chunks for i in c[3])
        # each source is the package's own memory, named by its document there
        for s in answer.sources:
            assert kbs.get(s.package, s.id).text == s.text
        # recall by text, as Database.recall takes it
        assert kbs.recall(QUESTION, k=2)[0].package in ("a", "b")
    server = ServerProcess(packages, "--model", TINY)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="a+b", messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == answer.text
        got = [(m["package"], m["id"], m["document"], m["text"]) for m in reply.model_extra["memories"]]
        assert got == [(s.package, s.id, s.document, s.text) for s in answer.sources]
    finally:
        assert server.stop() == 0, server.output()
        server.close()


def test_every_surface_refuses_k_past_the_model_with_one_message(built):
    model, embedder = tiny()
    per_chunk = model.settings.memories_per_chunk
    with m3db.connect(built / "kb", read_only=True, model=model, embedder=embedder) as db:
        with pytest.raises(m3db.InvalidInputError, match=f"reads at most {per_chunk} memories per chunk") as python:
            db.generate(QUESTION, k=per_chunk + 1)
        with pytest.raises(m3db.InvalidInputError, match=f"reads at most {per_chunk} memories per chunk") as sql:
            db.sql(f"SELECT * FROM generate('{QUESTION}', k => {per_chunk + 1})")
    assert str(python.value) == str(sql.value)


def test_the_rules_of_an_answer_have_one_home():
    """The k bound, the context check and the generation modes are each written once."""
    sources = [
        p
        for folder in ("m3db", "bindings", "model")
        for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    ]

    def homes(pattern):
        return sorted(str(p.relative_to(ROOT)) for p in sources if re.search(pattern, p.read_text()))

    assert homes(r"reads at most \{") == ["m3db/knowledge/answer.py"]
    assert homes(r"over the model's context of") == ["model/generate.py"]
    assert homes(r"\(\s*\"memory\",\s*\"rag\",\s*\"none\"\s*\)|\"rag\":\s*\"rag\"") == ["m3db/knowledge/answer.py"]
    assert homes(r"document_names\(") == ["m3db/database.py", "m3db/storage/catalog.py"]


def test_the_decoder_loop_knows_the_engines_modes():
    from m3db.extend import GENERATION_MODES
    from m3db.model.generate import MODES

    assert set(MODES) == set(GENERATION_MODES)


def test_server_run_serves_from_python(built, tmp_path):
    """m3db.bindings.server.run: the hardened server without the CLI, in a process of its own."""
    script = tmp_path / "serve.py"
    script.write_text(
        "import sys\n"
        "import m3db\n"
        "from m3db.bindings.server import run\n"
        "from tests.server_models import tiny\n"
        "model, embedder = tiny()\n"
        "with m3db.connect(sys.argv[1], read_only=True, model=model, embedder=embedder) as db:\n"
        "    run(db, port=int(sys.argv[2]), say=lambda m: print(m, flush=True))\n"
        "print('closed', flush=True)\n"
    )
    server = ServerProcess([built / "kb"], script=script)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["kb"]
        reply = client.chat.completions.create(
            model="kb", messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].message.content == python_answer(built / "kb").text
    finally:
        assert server.stop() == 0, server.output()
        assert "closed" in server.output()
        server.close()

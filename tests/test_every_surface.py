"""Where users already work, one answer: an MCP client, a LangChain app, a LlamaIndex app and an
OpenAI client each get the same answer and the same sources for the same question on the same
knowledge base as `db.generate` in Python, because each goes through the one answer plan.

Real parts: the tiny decoder of the real architecture and the hashing embedder, a real database,
`m3db mcp` over stdio through the MCP SDK's own client, `m3db serve` through the official openai
client, LangChain's and LlamaIndex's own invoke/query.
"""

import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("starlette")
pytest.importorskip("mcp")
pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")
openai = pytest.importorskip("openai")

import m3db  # noqa: E402
from tests.server_models import tiny  # noqa: E402
from tests.server_process import ROOT, ServerProcess  # noqa: E402

QUESTION = "Where is Zorblax?"
MAX_TOKENS = 24
TINY = "tests.server_models:tiny"
DOCS = [
    {"text": "Zorblax is a small moon of the planet Quendor. Its capital city is Vell.", "source": "zorblax.txt"},
    {"text": "Bread is made from flour, water and yeast.", "source": "bread.txt", "title": "Bread"},
    {"text": "Berlin ist die Hauptstadt Deutschlands.", "source": "berlin.txt"},
]


def triples(sources):
    """(id, document, text) of each source, whatever shape a surface gives it in."""
    out = []
    for s in sources:
        get = s.get if isinstance(s, dict) else lambda name, s=s: getattr(s, name)
        out.append((get("id"), get("document"), get("text")))
    return out


def test_mcp_langchain_llamaindex_and_openai_answer_as_python_does(tmp_path):
    from langchain_core.messages import HumanMessage
    from mcp import StdioServerParameters, stdio_client

    from m3db.bindings.langchain import ChatM3DB
    from m3db.bindings.llamaindex import M3DBQueryEngine, M3DBVectorStore
    from tests.test_mcp import ENV, Connected

    path = tmp_path / "kb.m3db"
    model, embedder = tiny()
    with m3db.connect(path, model=model, embedder=embedder) as db:
        db.add_documents(DOCS, progress=False)
    with m3db.connect(path, read_only=True, model=model, embedder=embedder) as db:
        want = db.generate(QUESTION, max_tokens=MAX_TOKENS)
        assert want.sources
        sources = triples(want.sources)

        chat = ChatM3DB(db=db, max_tokens=MAX_TOKENS).invoke([HumanMessage(QUESTION)])
        assert chat.content == want.text
        assert triples(chat.response_metadata["sources"]) == sources

        response = M3DBQueryEngine(vector_store=M3DBVectorStore(db), max_tokens=MAX_TOKENS).query(QUESTION)
        assert str(response) == want.text
        assert triples(response.metadata["sources"]) == sources

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "m3db.cli", "mcp", str(path), "--model", TINY], env=ENV, cwd=str(ROOT)
    )
    with open(tmp_path / "mcp.log", "w+") as log:
        client = Connected(stdio_client(params, errlog=log))
        try:
            got = client.call("ask", question=QUESTION, max_tokens=MAX_TOKENS).structured_content
        finally:
            client.close()
    assert got["answer"] == want.text and triples(got["sources"]) == sources

    server = ServerProcess([path], "--model", TINY)
    try:
        reply = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="kb", messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS, temperature=0
        )
    finally:
        assert server.stop() == 0, server.output()
        server.close()
    assert reply.choices[0].message.content == want.text
    assert triples(reply.model_extra["memories"]) == sources

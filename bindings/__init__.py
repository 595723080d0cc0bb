"""m3db.bindings: adapters to other ecosystems, one room (subpackage) each, every one an optional
extra that the engine never imports:

- `m3db.bindings.server` (`m3db[server]`): an OpenAI-compatible HTTP API plus memory endpoints;
  `run(db, port=...)` serves from Python, `m3db serve` from the shell (docs/server.md);
- `m3db.bindings.transformers` (`m3db[transformers]`): your own Hugging Face causal LM as a
  memory model (docs/bindings.md);
- `m3db.bindings.ray` (`m3db[ray]`): knowledge-base builds on a Ray cluster (docs/distributed.md);
- `m3db.bindings.mcp` (`m3db[mcp]`): a knowledge base as an MCP server for agents; `run(db)` from
  Python, `m3db mcp` from the shell (docs/mcp.md);
- `m3db.bindings.langchain` (`m3db[langchain]`): a LangChain vector store and chat model
  (docs/langchain.md);
- `m3db.bindings.llamaindex` (`m3db[llamaindex]`): a LlamaIndex vector store and a query engine
  answering through db.generate (docs/llamaindex.md).

A binding uses the engine's public API only (`m3db`, `m3db.errors`, `m3db.extend`) and
`m3db.model`; tests/test_layering.py enforces it. Generation goes through the engine's one
answer plan (`m3db.extend.AnswerPlan`); a binding translates its protocol around it.
"""

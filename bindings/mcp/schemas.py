"""The tools' table: each tool's name, what it does, its arguments and its result, as the JSON
Schemas an MCP client lists (tools/list), and the check of a call's arguments against the same
schema, so what the agent is shown and what is refused cannot disagree.

A bad argument (a wrong type, a value out of bounds, an unknown or missing argument) is a
`Refusal` naming the argument and what it accepts; the tool then answers an error result.
Bounds are the HTTP server's (docs/server.md): k, the documents per call, max_tokens
(`--max-tokens`). Imports: the SDK's types, jsonschema (the SDK's own
dependency), m3db.extend's bounds, this binding's errors.
"""

import jsonschema
import mcp_types as types

from m3db.extend import GENERATION_MODES, MAX_K

from .errors import Refusal

MAX_RECALL = min(MAX_K, 1000)  # as POST /v1/memories/search
MAX_DOCUMENTS = 256  # per call, as POST /v1/documents
MAX_PARAMS = 64

WHERE = {
    "type": ["string", "object"],
    "description": "a SQL filter over the columns of `memories` (metadata keys are columns), e.g. "
    '"lang = \'en\'", or "lang = ? AND year > ?" with params, or an object {column: value}',
}
PARAMS = {"type": "array", "maxItems": MAX_PARAMS, "description": "values bound to the ?s of where, in order"}
NAME = {"type": ["string", "null"]}
METADATA = {"type": "object", "description": "metadata columns of its memories: {name: value}"}
ROW = {"type": "object"}  # a memory, a source or a stored document: described in the tool's text


def obj(properties: dict, required=(), **more) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), **more}


def closed(properties: dict, required=()) -> dict:
    """An input schema: these arguments and no others."""
    return obj(properties, required, additionalProperties=False)


def tables(*, max_tokens: int, default_max_tokens: int, packages: list | None, write: bool) -> dict:
    """{tool name: (description, input schema, output schema, read-only)} of every tool."""
    recall = closed(
        {
            "text": {"type": "string", "minLength": 1, "description": "what to look for: a question or a phrase"},
            "k": {"type": "integer", "minimum": 1, "maximum": MAX_RECALL, "default": 5, "description": "how many"},
            "where": WHERE,
            "params": PARAMS,
        },
        ["text"],
    )
    ask = closed(
        {
            "question": {"type": "string", "minLength": 1, "description": "the question, as a user would ask it"},
            "memory": {
                "type": "string",
                "enum": list(GENERATION_MODES),
                "default": "memory",
                "description": "memory: the decoder reads the recalled memories (the default); rag: their text "
                "is put before the question; none: the decoder alone",
            },
            "k": {
                "type": "integer",
                "minimum": 1,
                "maximum": 64,
                "description": "memories recalled per 64-token chunk of the answer (default and most: the model's, 5)",
            },
            "where": WHERE,
            "params": PARAMS,
            "max_tokens": {
                "type": "integer",
                "minimum": 1,
                "maximum": max_tokens,
                "default": default_max_tokens,
                "description": "the longest answer, in tokens",
            },
        },
        ["question"],
    )
    package = {"type": "string", "description": f"the package whose tables to query: one of {packages}"}
    sql = closed(
        {
            "query": {"type": "string", "minLength": 1, "description": "one SQL statement"},
            "params": {
                "type": ["array", "object"],
                "description": "values for ? (an array) or $name (an object); always bound, never spliced",
            },
            **({"package": package} if packages else {}),
        },
        ["query"] + (["package"] if packages else []),
    )
    document = closed(
        {
            "text": {"type": "string", "minLength": 1, "description": "the document's text (chunked into memories)"},
            "source": {**NAME, "description": "a unique name for it, e.g. a file name (default: a hash of its text)"},
            "title": {**NAME, "description": "its title"},
            "uri": {**NAME, "description": "where it came from"},
            "metadata": METADATA,
        },
        ["text"],
    )
    add = closed(
        {
            "documents": {"type": "array", "minItems": 1, "maxItems": MAX_DOCUMENTS, "items": document},
            "cold": {"type": "boolean", "description": "store text and embeddings only; encode on first read"},
            "replace": {"type": "boolean", "description": "a source already stored with other text is replaced"},
        },
        ["documents"],
    )
    memories = obj({"memories": {"type": "array", "items": ROW}}, ["memories"])
    answer = obj(
        {
            "answer": {"type": "string"},
            "finish_reason": {"type": "string"},
            "memory": {"type": "string"},
            "sources": {"type": "array", "items": ROW},
        },
        ["answer", "finish_reason", "memory", "sources"],
    )
    rows = obj({"columns": {"type": "array", "items": {"type": "string"}}, "rows": {"type": "array"}}, ["columns"])
    stored = obj({"documents": {"type": "array", "items": ROW}}, ["documents"])
    return {
        "recall": (
            "Find the memories (passages of the knowledge base's documents) nearest a text by meaning, best "
            "first, with their scores, documents and metadata; `where` filters them with SQL.",
            recall,
            memories,
            True,
        ),
        "ask": (
            "Answer a question from the knowledge base with its decoder, which reads the memories it recalls "
            "as it writes; returns the answer and its sources (the memories it read).",
            ask,
            answer,
            True,
        ),
        "sql": (
            "Run one SQL statement over the knowledge base (DuckDB SQL over the tables memories, documents, "
            "meta; recall(text, k => 5) as a table function). Read-only unless the server runs with --write, "
            "which allows INSERT INTO documents (text, source, ...) and DELETE FROM memories.",
            sql,
            rows,
            not write,
        ),
        "add_documents": (
            "Add documents to the knowledge base: each is chunked, embedded and encoded into memories, one "
            "commit per document; a document already stored with the same source and text is skipped.",
            add,
            stored,
            False,
        ),
    }


def tool(name: str, description: str, inputs: dict, outputs: dict, read_only: bool) -> types.Tool:
    return types.Tool(
        name=name,
        description=description,
        input_schema=inputs,
        output_schema=outputs,
        annotations=types.ToolAnnotations(read_only_hint=read_only, destructive_hint=not read_only),
    )


def check_arguments(name: str, arguments: dict, schema: dict) -> dict:
    """The arguments of a call to tool `name`, or a Refusal naming the one at fault."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(arguments))
    if error is None:
        return arguments
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema["properties"]))
        accepted = ", ".join(error.schema["properties"])
        at = f" in {where}" if where else ""
        raise Refusal(f"{name}: unknown argument {extra[0]!r}{at}; accepted: {accepted}")
    if error.validator == "required":
        missing = next(r for r in error.validator_value if r not in error.instance)
        raise Refusal(f"{name}: the argument {(where + '.' if where else '') + missing!r} is missing")
    raise Refusal(f"{name}: argument {where or '(arguments)'}: {error.message}")

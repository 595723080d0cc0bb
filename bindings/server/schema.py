"""The OpenAPI document of the server, built from the same field tables that check requests.

Requests are described by the field tables (fields.py); answers by the schemas below, one per
operation, each what its handler sends (tests/test_schemathesis.py runs Schemathesis against
a real server: every answer must match them). Operations have ids, request examples, and links
saying which answer feeds which request (the memory ids that adding documents or a search
gives, to read or forget), so a client generator, or Schemathesis's stateful tests, can chain
them. Imports: the server's field tables, the engine's generation modes.
"""

import copy

from m3db.extend import GENERATION_MODES

from .fields import object_schema
from .memory import ADD_FIELDS, DOCUMENT_FIELDS
from .openai import ROLES

ERROR = {
    "description": "an error, in OpenAI's shape",
    "content": {
        "application/json": {
            "schema": {"$ref": "#/components/schemas/Error"},
        }
    },
}

ERRORS = {
    "400": "bad input: malformed JSON, a wrong type, an unknown or unsupported field, a bad filter",
    "401": "a missing or wrong API key (when the server has one)",
    "403": "a write on a read-only server, or by a key that may not write this knowledge base",
    "404": "no such model, memory, package or path",
    "408": "the request body did not all arrive within the server's --body-timeout (the connection is closed)",
    "413": "a body over the limit",
    "429": "the generation or SQL queue is full: retry later",
    "5XX": "the server's own trouble: a damaged file, a failed disk, shutting down, or a bug (see its log)",
}

# headers an error always carries
ERROR_HEADERS = {
    "401": {"WWW-Authenticate": "the scheme to authenticate with: Bearer"},
    "429": {"Retry-After": "seconds to wait before retrying"},
}

INTEGER = {"type": "integer"}
COUNT = {"type": "integer", "minimum": 0}
TEXT = {"type": "string"}
MAYBE_TEXT = {"type": ["string", "null"]}
JSON_VALUE: dict = {}  # any JSON value (metadata values, SQL values)
FINISH = {"type": "string", "enum": ["stop", "length"], "description": "length: max_tokens cut it; stop: any other end"}


def obj(properties: dict, required=None, **more) -> dict:
    """An object schema; every property is required unless `required` names fewer."""
    return {
        "type": "object",
        "required": list(properties if required is None else required),
        "properties": properties,
        **more,
    }


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def array(items: dict, **more) -> dict:
    return {"type": "array", "items": items, **more}


# timings: Answer.timings, milliseconds by part (embed, search, read, recall, prefill,
# first_token, decode, total); m3db's addition to OpenAI's usage, which clients pass through
TIMINGS = {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}}
USAGE = obj(
    {"prompt_tokens": COUNT, "completion_tokens": COUNT, "total_tokens": COUNT, "timings": TIMINGS},
    required=["prompt_tokens", "completion_tokens", "total_tokens"],
)

SCHEMAS = {
    "Error": obj(
        {
            "error": obj(
                {
                    "message": TEXT,
                    "type": TEXT,
                    "code": TEXT,
                    "param": MAYBE_TEXT,
                    "stored": array(
                        obj(
                            {
                                "index": COUNT,
                                "source": MAYBE_TEXT,
                                "memory_ids": array(COUNT),
                                "added": {"type": "boolean"},
                            }
                        ),
                        description="POST /v1/documents: the documents stored before the one that failed",
                    ),
                },
                required=["message", "type", "code", "param"],
            )
        }
    ),
    "Model": obj({"id": TEXT, "object": {"const": "model"}, "created": INTEGER, "owned_by": TEXT}),
    "ModelList": obj({"object": {"const": "list"}, "data": array(ref("Model"))}),
    "MemoryRead": obj(
        {"id": COUNT, "document": MAYBE_TEXT, "title": MAYBE_TEXT, "text": TEXT, "package": TEXT},
        required=["id", "document", "title", "text"],
        description="a memory an answer read (package: when several packages are served)",
    ),
    "Usage": USAGE,
    "ChatCompletion": obj(
        {
            "id": TEXT,
            "object": {"const": "chat.completion"},
            "created": INTEGER,
            "model": TEXT,
            "choices": array(
                obj(
                    {
                        "index": COUNT,
                        "message": obj({"role": {"const": "assistant"}, "content": TEXT}),
                        "finish_reason": FINISH,
                        "logprobs": {"type": "null"},
                    }
                ),
                minItems=1,
            ),
            "usage": ref("Usage"),
            "memory": {"type": "string", "enum": list(GENERATION_MODES)},
            "memories": array(ref("MemoryRead")),
        }
    ),
    "Completion": obj(
        {
            "id": TEXT,
            "object": {"const": "text_completion"},
            "created": INTEGER,
            "model": TEXT,
            "choices": array(
                obj(
                    {
                        "index": COUNT,
                        "text": TEXT,
                        "finish_reason": FINISH,
                        "logprobs": {"type": "null"},
                        "memories": array(ref("MemoryRead")),
                    }
                ),
                minItems=1,
            ),
            "usage": ref("Usage"),
            "memory": {"type": "string", "enum": list(GENERATION_MODES)},
            "memories": array(ref("MemoryRead")),
        }
    ),
    # one event of a streamed answer: a chunk, a last chunk with the usage (stream_options), or
    # an error that happened after the answer began (then the stream ends with [DONE])
    "ChatCompletionChunk": obj(
        {
            "id": TEXT,
            "object": {"const": "chat.completion.chunk"},
            "created": INTEGER,
            "model": TEXT,
            "choices": array(
                obj(
                    {
                        "index": COUNT,
                        "delta": obj({"role": {"const": "assistant"}, "content": TEXT}, required=[]),
                        "finish_reason": {"anyOf": [FINISH, {"type": "null"}]},
                        "logprobs": {"type": "null"},
                    }
                )
            ),
            "usage": {"anyOf": [ref("Usage"), {"type": "null"}]},
            "memories": array(ref("MemoryRead")),
        },
        required=["id", "object", "created", "model", "choices"],
    ),
    "CompletionChunk": obj(
        {
            "id": TEXT,
            "object": {"const": "text_completion"},
            "created": INTEGER,
            "model": TEXT,
            "choices": array(
                obj(
                    {
                        "index": COUNT,
                        "text": TEXT,
                        "finish_reason": {"anyOf": [FINISH, {"type": "null"}]},
                        "logprobs": {"type": "null"},
                    }
                )
            ),
            "usage": {"anyOf": [ref("Usage"), {"type": "null"}]},
            "memories": array(ref("MemoryRead")),
        },
        required=["id", "object", "created", "model", "choices"],
    ),
    "EmbeddingList": obj(
        {
            "object": {"const": "list"},
            "data": array(
                obj(
                    {
                        "object": {"const": "embedding"},
                        "index": COUNT,
                        "embedding": {
                            "anyOf": [array({"type": "number"}), TEXT],
                            "description": "numbers, or base64 of float32 little-endian (encoding_format)",
                        },
                    }
                )
            ),
            "model": TEXT,
            "usage": obj({"prompt_tokens": COUNT, "total_tokens": COUNT}),
        }
    ),
    "SearchResult": obj(
        {
            "object": {"const": "list"},
            "data": array(
                obj(
                    {
                        "id": COUNT,
                        "score": {"type": "number"},
                        "text": TEXT,
                        "document": MAYBE_TEXT,
                        "title": MAYBE_TEXT,
                        "document_id": {"type": ["integer", "null"]},
                        "metadata": {"type": "object"},
                        "package": TEXT,
                    },
                    required=["id", "score", "text", "document", "title", "document_id", "metadata"],
                ),
                description="best first",
            ),
            "plan": {"type": "object", "description": "how recall searched (docs/engine.md)"},
        }
    ),
    "Memory": obj(
        {
            "id": COUNT,
            "text": TEXT,
            "document": MAYBE_TEXT,
            "title": MAYBE_TEXT,
            "document_id": {"type": ["integer", "null"]},
            "ordinal": {"type": ["integer", "null"]},
            "token_count": {"type": ["integer", "null"]},
            "metadata": {"type": "object"},
            "shape": {
                "anyOf": [array(COUNT), {"type": "null"}],
                "description": "layers, heads, tokens, head dim of its arrays (null: a cold memory)",
            },
            "package": TEXT,
        },
        required=["id", "text", "document", "title", "document_id", "ordinal", "token_count", "metadata", "shape"],
    ),
    "Forgotten": obj({"id": COUNT, "object": {"const": "memory"}, "deleted": {"const": True}}),
    "DocumentsAdded": obj(
        {
            "object": {"const": "list"},
            "data": array(
                obj(
                    {
                        "index": COUNT,
                        "source": MAYBE_TEXT,
                        "memory_ids": array(COUNT),
                        "added": {
                            "type": "boolean",
                            "description": "false: the same source and text were already stored (nothing new)",
                        },
                    }
                ),
                description="one per document, in the request's order",
            ),
        }
    ),
    "SqlResult": obj({"columns": array(TEXT), "rows": array(array(JSON_VALUE))}),
    "ServerState": obj(
        {
            "model": TEXT,
            "memories": COUNT,
            "packages": {"anyOf": [array(TEXT), {"type": "null"}]},
            "writable": {"type": "boolean"},
            "pid": COUNT,
            "limits": {"type": "object", "additionalProperties": {"type": "number"}},
            "generation": {"type": "object", "additionalProperties": COUNT},
            "sql": {"type": "object", "additionalProperties": COUNT},
        }
    ),
    "Health": obj({"status": {"const": "ok"}}),
    "OpenAPI": obj({"openapi": TEXT, "info": {"type": "object"}, "paths": {"type": "object"}}),
}


def event_stream(chunk: str) -> dict:
    """Server-sent events: each `data:` a JSON chunk (or an error object), the last `[DONE]`."""
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {"contentMediaType": "application/json", "contentSchema": {"anyOf": [ref(chunk), ref("Error")]}},
        ]
    }
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": data},
            "description": f"stream: true: one event per piece (data: a {chunk}), the last one data: [DONE]",
        }
    }


# (method, path) -> operationId, the answer's schema, whether it may stream (stream: true)
OPERATIONS = {
    ("GET", "/v1/models"): ("listModels", "ModelList", False),
    ("GET", "/v1/models/{model}"): ("getModel", "Model", False),
    ("POST", "/v1/chat/completions"): ("createChatCompletion", "ChatCompletion", True),
    ("POST", "/v1/completions"): ("createCompletion", "Completion", True),
    ("POST", "/v1/embeddings"): ("createEmbedding", "EmbeddingList", False),
    ("POST", "/v1/memories/search"): ("searchMemories", "SearchResult", False),
    ("GET", "/v1/memories/{memory_id}"): ("getMemory", "Memory", False),
    ("DELETE", "/v1/memories/{memory_id}"): ("forgetMemory", "Forgotten", False),
    ("POST", "/v1/documents"): ("addDocuments", "DocumentsAdded", False),
    ("POST", "/v1/sql"): ("runSql", "SqlResult", False),
    ("GET", "/v1/server"): ("getServerState", "ServerState", False),
    ("GET", "/health"): ("health", "Health", False),
    ("GET", "/openapi.json"): ("openapi", "OpenAPI", False),
}

# which answer feeds which request (OpenAPI links): operationId -> {link name: link}
ADDED, FOUND, READ = "$response.body#/data/0/memory_ids/0", "$response.body#/data/0/id", "$response.body#/id"
LINKS = {
    "addDocuments": {
        "GetAddedMemory": {"operationId": "getMemory", "parameters": {"path.memory_id": ADDED}},
        "ForgetAddedMemory": {"operationId": "forgetMemory", "parameters": {"path.memory_id": ADDED}},
        "SearchAddedText": {
            "operationId": "searchMemories",
            "requestBody": {"query": "$request.body#/documents/0/text", "k": 3},
        },
        "SelectAddedMemory": {
            "operationId": "runSql",
            "requestBody": {"query": "SELECT id, document_id, text FROM memories WHERE id = ?", "params": [ADDED]},
        },
    },
    "searchMemories": {
        "GetFoundMemory": {"operationId": "getMemory", "parameters": {"path.memory_id": FOUND}},
        "ForgetFoundMemory": {"operationId": "forgetMemory", "parameters": {"path.memory_id": FOUND}},
    },
    "getMemory": {
        "ForgetReadMemory": {"operationId": "forgetMemory", "parameters": {"path.memory_id": READ}},
        "SearchReadText": {"operationId": "searchMemories", "requestBody": {"query": "$response.body#/text", "k": 3}},
    },
    "forgetMemory": {
        # a forgotten memory is gone: reading or forgetting it again is a 404
        "GetForgottenMemory": {"operationId": "getMemory", "parameters": {"path.memory_id": READ}},
    },
}


def examples(model: str | None) -> dict:
    """A request body per operation that a server of the same knowledge base answers."""
    out = {
        "searchMemories": {"query": "the capital city", "k": 3},
        "addDocuments": {
            "documents": [
                {"text": "Vell is the capital of Zorblax.", "source": "notes/vell", "metadata": {"lang": "en"}}
            ]
        },
        "runSql": {"query": "SELECT id, text FROM memories ORDER BY id LIMIT ?", "params": [5]},
    }
    if model is not None:
        out["createChatCompletion"] = {"model": model, "messages": [{"role": "user", "content": "Where is Vell?"}]}
        out["createCompletion"] = {"model": model, "prompt": "The capital of Zorblax is"}
        out["createEmbedding"] = {"model": model, "input": "the capital city"}
    return out


# what the `check` of a field enforces, as JSON Schema (openai.py: messages_problem and the
# check of stream_options), so that what the document calls valid, the checks accept
MESSAGE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": list(ROLES)},
        "content": {
            "anyOf": [
                {"type": "string"},
                array(
                    {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                    }
                ),
            ],
            "description": "a text, or text parts (no images)",
        },
        "name": {"description": "accepted, not used"},
    },
}
# a metadata key becomes a column of `memories` (m3db.extend.check_metadata_key): a plain
# identifier, not one of the built-in columns nor a field of the document
METADATA_KEY = {
    "type": "string",
    "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,62}$",
    "description": "a plain identifier (letters, digits, _; not starting with a digit; at most 63), not a "
    "built-in column of memories (id, text, document_id, ...) nor text, source, title, uri, cold, replace",
}
STREAM_OPTIONS = {"type": "object", "additionalProperties": False, "properties": {"include_usage": {"type": "boolean"}}}


def nonempty(schema: dict) -> dict:
    """`schema` (a field's), its strings and arrays of strings at least one long."""
    for s in schema.get("anyOf", [schema]):
        if s.get("type") == "string":
            s["minLength"] = 1
        elif s.get("type") == "array":
            s["minItems"] = max(1, s.get("minItems", 0))
            if s.get("items", {}).get("type") == "string":
                s["items"]["minLength"] = 1
    return schema


# what the handlers refuse beyond the field tables (a 400 naming the field), as JSON Schema:
# operationId -> the fields that may not be empty, and rules over the body's fields (allOf)
STREAM_OPTIONS_NEED_STREAM = {  # stream_options (not null) only with stream: true
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}
PARAMS_NEED_TEXT_FILTER = {  # params bind the ?s of a where text (a where object binds its own)
    "dependentSchemas": {"params": {"required": ["where"], "properties": {"where": {"type": "string"}}}}
}
NONE_READS_NO_MEMORIES = {  # memory: "none" recalls nothing, so k, where and params mean nothing
    "if": {"required": ["memory"], "properties": {"memory": {"const": "none"}}},
    "then": {"not": {"anyOf": [{"required": ["k"]}, {"required": ["where"]}, {"required": ["params"]}]}},
}
QUERY_OR_VECTOR = {"oneOf": [{"required": ["query"]}, {"required": ["vector"]}]}
GENERATION_RULES = [STREAM_OPTIONS_NEED_STREAM, PARAMS_NEED_TEXT_FILTER, NONE_READS_NO_MEMORIES]
RULES = {
    "createChatCompletion": (["where"], GENERATION_RULES),
    "createCompletion": (["where", "prompt"], GENERATION_RULES),
    "createEmbedding": (["input"], []),
    "searchMemories": (["query", "where"], [QUERY_OR_VECTOR, PARAMS_NEED_TEXT_FILTER]),
    "runSql": (["query"], []),
}


def body_schema(fields, model: str | None = None, operation_id: str | None = None) -> dict:
    schema = object_schema(fields)
    properties = schema["properties"]
    nonempty_fields, rules = RULES.get(operation_id, ([], []))
    for name in nonempty_fields:
        nonempty(properties[name])
    if rules:
        schema["allOf"] = copy.deepcopy(rules)
    if fields is ADD_FIELDS:  # each document is an object of its own fields
        document = object_schema(DOCUMENT_FIELDS)
        document["properties"]["metadata"]["propertyNames"] = METADATA_KEY
        properties["documents"]["items"] = document
    if "messages" in properties:
        properties["messages"]["items"] = MESSAGE
    if "stream_options" in properties:
        options = properties["stream_options"]
        options["anyOf"] = [STREAM_OPTIONS if s.get("type") == "object" else s for s in options["anyOf"]]
    if "model" in properties and model is not None:  # one model is served: another is a 404
        properties["model"]["enum"] = [model]
    return schema


def path_parameter(name: str, model: str | None) -> dict:
    schema = {"type": "string"}
    if name == "memory_id":  # what the server reads as an id (memory.py): 1 to 19 ASCII digits
        schema = {"type": "string", "pattern": "^[0-9]{1,19}$"}
    elif name == "model" and model is not None:
        schema = {"type": "string", "enum": [model], "description": "the served model id (others: 404)"}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def success(operation_id: str | None, answer: str | None, streams: bool) -> dict:
    if answer is None:
        return {"description": "success (JSON)"}
    out = {
        "description": "success" + ("; server-sent events when the request asks to stream" if streams else ""),
        "content": {"application/json": {"schema": ref(answer)}},
    }
    if streams:
        out["content"]["text/event-stream"] = event_stream(answer + "Chunk")
    if operation_id in LINKS:
        out["links"] = copy.deepcopy(LINKS[operation_id])
    return out


def served_model(title: str) -> str | None:
    """The served model id, from the title app.py gives the document ("m3db: NAME")."""
    prefix = "m3db: "
    return title[len(prefix) :] if title.startswith(prefix) else None


def openapi(
    routes, *, title: str, version: str, auth: bool, model: str | None = None, packages: bool | None = None
) -> dict:
    """The OpenAPI 3.1 document for `routes`: (path, method, summary, body fields or None).
    model: the served model id (default: read from the title, "m3db: NAME"); packages: whether
    several packages are served (False: no ?package=, which one database refuses; default: listed)."""
    model = model if model is not None else served_model(title)
    paths: dict = {}
    bodies = examples(model)
    for path, method, summary, fields in routes:
        operation_id, answer, streams = OPERATIONS.get((method.upper(), path), (None, None, False))
        errors = {}
        for code, text in ERRORS.items():
            errors[code] = dict(copy.deepcopy(ERROR), description=text)
            if code in ERROR_HEADERS:
                errors[code]["headers"] = {
                    name: {"description": what, "schema": {"type": "string"}}
                    for name, what in ERROR_HEADERS[code].items()
                }
        op = {"summary": summary, "responses": {"200": success(operation_id, answer, streams), **errors}}
        if operation_id is not None:
            op["operationId"] = operation_id
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [path_parameter(p, model) for p in params]
        if "{memory_id}" in path and packages is not False:
            op["parameters"].append(
                {
                    "name": "package",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "the package holding the memory (only on a server of several packages)",
                }
            )
        if fields is not None:
            media = {"schema": body_schema(fields, model, operation_id)}
            if operation_id in bodies:
                media["example"] = bodies[operation_id]
            op["requestBody"] = {"required": True, "content": {"application/json": media}}
        paths.setdefault(path, {})[method.lower()] = op
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "m3db serve: an OpenAI-compatible API over a knowledge base of explicit memories, "
            "plus memory endpoints (docs/server.md)",
        },
        "paths": paths,
        "components": {"schemas": copy.deepcopy(SCHEMAS)},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc

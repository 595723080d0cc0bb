"""The OpenAPI document of the server, built from the same field tables that check requests.

Imports: the server's field tables.
"""

from .fields import object_schema
from .memory import ADD_FIELDS, DOCUMENT_FIELDS

ERROR = {
    "description": "an error, in OpenAI's shape",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "code": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                        },
                        "required": ["message", "type", "code"],
                    }
                },
            }
        }
    },
}

ERRORS = {
    "400": "bad input: malformed JSON, a wrong type, an unknown or unsupported field, a bad filter",
    "401": "a missing or wrong API key (when the server has one)",
    "403": "a write on a read-only server",
    "404": "no such model, memory, package or path",
    "413": "a body over the limit",
    "429": "the generation queue is full: retry later",
}


def body_schema(fields) -> dict:
    schema = object_schema(fields)
    if fields is ADD_FIELDS:  # each document is an object of its own fields
        schema["properties"]["documents"]["items"] = object_schema(DOCUMENT_FIELDS)
    return schema


def openapi(routes, *, title: str, version: str, auth: bool) -> dict:
    """The OpenAPI 3.1 document for `routes`: (path, method, summary, body fields or None)."""
    paths: dict = {}
    for path, method, summary, fields in routes:
        op = {
            "summary": summary,
            "responses": {
                "200": {"description": "success (JSON; server-sent events when a generation asks to stream)"},
                **{code: dict(ERROR, description=text) for code, text in ERRORS.items()},
            },
        }
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
            ]
        if "{memory_id}" in path:
            op["parameters"].append(
                {
                    "name": "package",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "the package holding the memory (a server of several packages)",
                }
            )
        if fields is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema(fields)}}}
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
    }
    if auth:
        doc["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
        doc["security"] = [{"bearer": []}]
    return doc

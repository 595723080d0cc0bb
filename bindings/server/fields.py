"""Request bodies: each endpoint's fields in one table, checked from it and described from it.

A `Field` names a body field, its JSON types, its bounds and what it means; `parse(body,
fields)` checks a decoded JSON body against a table (an unknown field, a wrong type, a value
out of bounds: each a 400 naming the field and what would be accepted), and `json_schema`
turns the same table into the OpenAPI schema, so the documentation and the checks cannot
disagree. OpenAI fields that m3db's decoder does not support are listed with the one value
that means "off" (`n=1`, `presence_penalty=0`, ...): that value is accepted, any other is a
400 saying the field is not supported. Imports: the server's errors only.
"""

import dataclasses
import math
from collections.abc import Callable

from .errors import bad_request

JSON_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


@dataclasses.dataclass(frozen=True)
class Field:
    """One body field: its name, JSON types (OpenAPI names), and the checks on its value.

    minimum/maximum bound numbers and array lengths; choices is an enum; items is the JSON
    type of an array's elements; off: for an OpenAI field m3db does not support, the values
    that mean it is not used (any other value is refused); check: a function returning an
    error message for a value the types allow but the field does not.
    """

    name: str
    types: tuple[str, ...]
    description: str
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    items: str | None = None
    off: tuple | None = None
    check: Callable[[object], str | None] | None = None


def is_type(value, json_type) -> bool:
    """Whether a decoded JSON value is of an OpenAPI type (a bool is not a number, NaN is not one;
    a number with a zero fraction, 2.0, is an integer, as JSON Schema says)."""
    if json_type in ("integer", "number") and isinstance(value, bool):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if json_type == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, JSON_TYPES[json_type])


def as_declared(f: Field, value):
    """The value as the field's code reads it: an integer sent as 2.0 (JSON Schema's integer
    too, and what some clients' JSON encoders write) becomes 2; arrays of integers likewise."""
    if isinstance(value, float) and "integer" in f.types and "number" not in f.types and value.is_integer():
        return int(value)
    if isinstance(value, list) and f.items == "integer":
        return [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
    return value


def parse(body, fields: list[Field], *, what: str = "the request body") -> dict:
    """The body's fields by name (absent ones missing), after every check in `fields`."""
    if not isinstance(body, dict):
        raise bad_request(f"{what} must be a JSON object, got {type(body).__name__}", "invalid_type")
    known = {f.name: f for f in fields}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise bad_request(
            f"unknown field {unknown[0]!r} in {what}; accepted fields: {', '.join(sorted(known))}",
            "unknown_field",
            unknown[0],
        )
    out = {}
    for f in fields:
        if f.name not in body:
            if f.required:
                raise bad_request(f"{what} needs the field {f.name!r}: {f.description}", "missing_field", f.name)
            continue
        value = as_declared(f, body[f.name])
        check_value(f, value)
        out[f.name] = value
    return out


def check_value(f: Field, value) -> None:
    """Raise a 400 naming the field unless `value` is what `f` accepts."""
    if f.off is not None and value not in f.off:
        allowed = " or ".join(repr(v) for v in f.off)
        raise bad_request(
            f"{f.name}={value!r} is not supported by m3db's decoder; leave it out (or send {allowed})",
            "unsupported_field",
            f.name,
        )
    if not any(is_type(value, t) for t in f.types):
        raise bad_request(
            f"{f.name} must be {' or '.join(f.types)}, got {type(value).__name__} {short(value)}",
            "invalid_type",
            f.name,
        )
    if isinstance(value, list):
        if f.items and not all(is_type(v, f.items) for v in value):
            raise bad_request(f"{f.name} must be an array of {f.items}s", "invalid_type", f.name)
        size = len(value)
        if f.minimum is not None and size < f.minimum:
            raise bad_request(f"{f.name} needs at least {int(f.minimum)} items, got {size}", "invalid_value", f.name)
        if f.maximum is not None and size > f.maximum:
            raise bad_request(f"{f.name} takes at most {int(f.maximum)} items, got {size}", "invalid_value", f.name)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if (f.minimum is not None and value < f.minimum) or (f.maximum is not None and value > f.maximum):
            raise bad_request(
                f"{f.name} must be in [{fmt(f.minimum)}, {fmt(f.maximum)}], got {value!r}", "invalid_value", f.name
            )
    if f.choices is not None and value not in f.choices:
        raise bad_request(
            f"{f.name} must be one of {', '.join(map(repr, f.choices))}, got {short(value)}", "invalid_value", f.name
        )
    if f.check is not None:
        message = f.check(value)
        if message:
            raise bad_request(f"{f.name}: {message}", "invalid_value", f.name)


def nesting_limit(levels: int) -> Callable[[object], str | None]:
    """A Field check: the values inside an array or object (a `params`) nest lists and objects
    at most `levels` deep."""

    def check(value) -> str | None:
        stack = [(value, 0)]
        while stack:
            v, depth = stack.pop()
            if isinstance(v, (list, dict)):
                if depth > levels:
                    return f"a value nests lists and objects deeper than {levels} levels; flatten it"
                stack.extend((item, depth + 1) for item in (v.values() if isinstance(v, dict) else v))
        return None

    return check


def fmt(bound) -> str:
    return "-inf" if bound is None else (str(int(bound)) if float(bound).is_integer() else str(bound))


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_schema(f: Field) -> dict:
    """The OpenAPI (JSON Schema) description of one field."""

    def one(t):
        s = {"type": t}
        if t == "array" and f.items:
            s["items"] = {"type": f.items}
        if t in ("integer", "number"):
            if f.minimum is not None:
                s["minimum"] = f.minimum
            if f.maximum is not None:
                s["maximum"] = f.maximum
        if t == "array":
            if f.minimum is not None:
                s["minItems"] = int(f.minimum)
            if f.maximum is not None:
                s["maxItems"] = int(f.maximum)
        return s

    schema = one(f.types[0]) if len(f.types) == 1 else {"anyOf": [one(t) for t in f.types]}
    if f.choices is not None:
        schema["enum"] = list(f.choices)
    if f.off is not None:
        schema["enum"] = list(f.off)
    schema["description"] = f.description + (" (not supported: only the value meaning off)" if f.off else "")
    return schema


def object_schema(fields: list[Field]) -> dict:
    """The OpenAPI schema of a body described by `fields` (no other fields allowed)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [f.name for f in fields if f.required],
        "properties": {f.name: json_schema(f) for f in fields},
    }

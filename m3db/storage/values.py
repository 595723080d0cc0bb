"""Metadata values and texts: what m3db stores, and so reads back equal (a value that would come
back as something else, or not at all, is refused when it is given). The DuckDB column type of
each value is here too; the catalog (catalog.py, which re-exports these names) makes the
columns. Imports: errors only.
"""

from ..errors import InvalidInputError

MAX_JSON_DEPTH = 64  # nesting of a metadata value: deeper is a mistake, and readers recurse


def metadata_sql_type(key, value) -> str | None:
    """The DuckDB column type a metadata value is stored as, or an InvalidInputError. A value is
    accepted only when reading it back gives an equal value (see check_json_value)."""
    check_json_value(f"metadata {key!r}", value)
    if value is None:
        return None
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "BIGINT"
    if isinstance(value, float):
        return "DOUBLE"
    if isinstance(value, str):
        return "VARCHAR"
    return "JSON"


def check_json_value(what, value) -> None:
    """Refuse what would not read back equal: types other than str, int, float, bool, None and
    lists and dicts of them (a tuple reads back as a list), dict keys that are not strings (JSON
    and msgpack readers turn them into strings or refuse them), integers past 64 bits, NaN and
    infinities, strings that are not UTF-8 (lone surrogates), nesting past MAX_JSON_DEPTH."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not -(2**63) <= v < 2**63:
                raise InvalidInputError(f"{what}: integer {v} does not fit in 64 bits")
        elif isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise InvalidInputError(f"{what}: {v} is not a finite number")
        elif isinstance(v, str):
            check_text(what, v)
        elif isinstance(v, (list, dict)):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidInputError(f"{what}: lists and dicts nest deeper than {MAX_JSON_DEPTH} levels; flatten it")
            if isinstance(v, dict):
                for k in v:
                    if not isinstance(k, str):
                        raise InvalidInputError(
                            f"{what}: dict key {k!r} is a {type(k).__name__}; keys must be strings (use str(key))"
                        )
                    check_text(what, k)
                stack.extend((item, depth + 1) for item in v.values())
            else:
                stack.extend((item, depth + 1) for item in v)
        else:
            raise InvalidInputError(
                f"{what} holds a {type(v).__name__}; metadata values may be str, int, float, bool, None, or "
                "lists/dicts of those: convert it first (e.g. str(value), list(value) or value.isoformat())"
            )


def check_text(what, text) -> None:
    """A string must be storable as UTF-8 (a lone surrogate, say from a bad decode, is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(
            f"{what}: the text holds {text[e.start : e.end]!r} at position {e.start}, which is not valid Unicode "
            "(a lone surrogate, often from decoding bytes with errors='surrogateescape'); fix the decoding"
        ) from None

"""Input checks for writes: every memory, document and setting is checked here before a byte is written.

A write either passes every check or fails with an InvalidInputError naming the item, the
bad value and what to pass instead; the writer (writer.py) then never meets a malformed item.
The checked forms (`CheckedMemory`) are the records the writer stages.

Imports: errors and the storage nouns it checks against (spec, codec, catalog's column rules).
"""

import dataclasses
import os

import numpy as np

from ..errors import InvalidInputError
from .catalog import check_json_value, check_metadata_key, check_text, metadata_sql_type
from .codec import EncodedArray, encoded_floats
from .segment import DEFAULT_SEGMENT_SIZE

# connect(config=...): key -> type; all are positive integers
CONFIG_KEYS = {
    "segment_size": int,
    "exact_limit": int,
    "index_save_every": int,
    "cache_bytes": int,
    "expansion_search": int,
}
MEMORY_FIELDS = (
    "keys",
    "values",
    "positions",
    "embedding",
    "text",
    "metadata",
    "document",
    "ordinal",
    "token_count",
    "id",
    "char_start",
    "char_end",
    "cold",
)
DOCUMENT_FIELDS = ("source", "title", "uri", "metadata")


@dataclasses.dataclass
class CheckedMemory:
    """One memory to add, checked: arrays as the spec wants them (None when cold), metadata
    with the SQL type of each key (`types`), and the document as given (source, dict or id)."""

    keys: np.ndarray | None
    values: np.ndarray | None
    positions: np.ndarray | None
    embedding: np.ndarray
    text: str
    metadata: dict
    types: dict
    document: object
    id: int | None
    ordinal: int | None
    token_count: int | None
    char_start: int | None
    char_end: int | None
    cold: bool


def check_memory(position: int, item: object, spec, codec) -> CheckedMemory:
    """Check one add_memory() argument dict against the database's spec and codec."""
    where = f"memory #{position}"
    if not isinstance(item, dict):
        raise InvalidInputError(f"{where}: expected a dict of add_memory() arguments, got {type(item).__name__}")
    unknown = sorted(set(item) - set(MEMORY_FIELDS))
    if unknown:
        raise InvalidInputError(f"{where}: unknown fields {unknown}; known fields: {sorted(MEMORY_FIELDS)}")
    cold = item.get("cold", False)
    if not isinstance(cold, bool):
        raise InvalidInputError(f"{where}: cold must be True or False, got {cold!r}")
    arrays = ("keys", "values", "positions")
    if cold and any(item.get(k) is not None for k in arrays):
        raise InvalidInputError(
            f"{where}: a cold memory is stored as text only; drop keys, values and positions or cold=True"
        )
    missing = [k for k in ("embedding", "text") + (() if cold else arrays) if item.get(k) is None]
    if missing:
        raise InvalidInputError(f"{where}: missing {missing}")
    try:
        keys = values = positions = None
        if not cold:
            # pre-encoded keys or values (a distributed build's) are checked as what they decode to,
            # and then stored as the bytes they are
            given = item["keys"], item["values"]
            floats = [encoded_floats(x, codec, part) for x, part in zip(given, ("keys", "values"))]
            keys, values, positions = spec.check_arrays(floats[0], floats[1], item["positions"])
            codec.check(keys), codec.check(values)  # range checks (f16) before writing
            keys, values = (g if isinstance(g, EncodedArray) else f for g, f in zip(given, (keys, values)))
        embedding = spec.check_embedding(item["embedding"])
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}: {str(e).split('] ', 1)[-1]}") from None
    text = item["text"]
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(f"{where}: text must be a non-empty string (the reference the memory was made from)")
    check_text(f"{where}: text", text)
    metadata = item.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"{where}: metadata must be a dict, got {type(metadata).__name__}")
    types = {}
    for key, value in metadata.items():
        check_metadata_key(key)
        types[key] = metadata_sql_type(key, value)
    mid = item.get("id")
    if mid is not None and (not isinstance(mid, (int, np.integer)) or isinstance(mid, bool) or mid < 0 or mid >= 2**63):
        raise InvalidInputError(f"{where}: id must be a non-negative integer, got {mid!r}")
    for name in ("ordinal", "token_count", "char_start", "char_end"):
        v = item.get(name)
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < 2**31):
            raise InvalidInputError(f"{where}: {name} must be a non-negative 32-bit integer, got {v!r}")
    span = (item.get("char_start"), item.get("char_end"))
    if (span[0] is None) != (span[1] is None) or (span[0] is not None and span[0] > span[1]):
        raise InvalidInputError(
            f"{where}: char_start and char_end go together, with char_start <= char_end; got {span}"
        )
    document = item.get("document")
    if isinstance(document, dict):
        check_document(where, document)
    elif document is not None and (not isinstance(document, (str, int, np.integer)) or isinstance(document, bool)):
        raise InvalidInputError(f"{where}: document must be a source string, a dict or a document id, got {document!r}")
    elif isinstance(document, str):
        check_text(f"{where}: document", document)
    return CheckedMemory(
        keys=keys,
        values=values,
        positions=positions,
        embedding=embedding,
        text=text,
        metadata=metadata,
        types=types,
        document=document,
        id=None if mid is None else int(mid),
        ordinal=item.get("ordinal"),
        token_count=item.get("token_count"),
        char_start=span[0],
        char_end=span[1],
        cold=cold,
    )


def check_document(where: str, doc: dict) -> None:
    """A document dict: a non-empty `source`, optional string `title`/`uri`, JSON `metadata`."""
    unknown = sorted(set(doc) - set(DOCUMENT_FIELDS))
    if unknown:
        raise InvalidInputError(f"{where}: unknown document fields {unknown}; known: {', '.join(DOCUMENT_FIELDS)}")
    if not isinstance(doc.get("source"), str) or not doc["source"]:
        raise InvalidInputError(f"{where}: a document needs a non-empty string 'source' (a unique name)")
    for key in ("title", "uri"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise InvalidInputError(f"{where}: document {key} must be a string")
    for key in ("source", "title", "uri"):
        if doc.get(key) is not None:
            check_text(f"{where}: document {key}", doc[key])
    check_json_value(f"{where}: document metadata", doc.get("metadata"))


def check_config(config: dict | None) -> dict:
    """connect(config=...): known keys, each a positive integer."""
    if config is not None and not isinstance(config, dict):
        raise InvalidInputError(f"config must be a dict, got {type(config).__name__}")
    config = dict(config or {})
    for key, value in config.items():
        if key not in CONFIG_KEYS:
            raise InvalidInputError(f"unknown config key {key!r}; known keys: {sorted(CONFIG_KEYS)}")
        if not isinstance(value, CONFIG_KEYS[key]) or isinstance(value, bool) or value < 1:
            raise InvalidInputError(f"config {key!r} must be a positive integer, got {value!r}")
    if config.get("segment_size", DEFAULT_SEGMENT_SIZE) < 4096:
        raise InvalidInputError("config 'segment_size' must be at least 4096 bytes")
    return config


def widens(new: str, existing: str) -> bool:
    """May a value of SQL type `new` go into a column of type `existing`?"""
    if new == existing:
        return True
    return new == "BIGINT" and existing == "DOUBLE"


def widest(types) -> str:
    """The one column type that holds every value of a batch (BIGINT and DOUBLE make DOUBLE)."""
    types = set(types)
    if len(types) == 1:
        return types.pop()
    if types == {"BIGINT", "DOUBLE"}:
        return "DOUBLE"
    raise InvalidInputError(f"one metadata key holds values of several types in one batch: {sorted(types)}")


def check_path(path) -> str:
    """connect()'s path as a string, refusing what cannot name a database: an empty path (it
    would create the database in the working directory) and a NUL byte."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        raise InvalidInputError(f"path must be text, got bytes {text!r}; decode it first")
    if not text.strip():
        raise InvalidInputError("path is empty; name a database directory, a .m3kb package, or ':memory:'")
    if "\x00" in text:
        raise InvalidInputError(f"path {text!r} holds a NUL byte, which no file name can; check where it came from")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # a file name that is not UTF-8 reaches Python as lone surrogates; DuckDB (the catalog)
        # opens UTF-8 paths only, and fails on others with a bare std::bad_cast
        raise InvalidInputError(
            f"path {text!r} is not UTF-8 text (at character {e.start}), and the catalog opens only UTF-8 "
            "paths; rename the file or folder"
        ) from None
    if text != text.strip():
        raise InvalidInputError(
            f"path {text!r} starts or ends with a space, which would name another file than the one meant; "
            "remove it (or rename the file)"
        )
    # "~/kb" means the home folder, as in a shell; without this it makes a folder named "~" here
    return os.path.expanduser(text) if text.startswith("~") else text


def check_timeout(timeout) -> None:
    """connect()'s timeout: seconds (a finite number, 0 or more) to wait for another's lock."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
        raise InvalidInputError(
            f"timeout is the seconds to wait for a database another process holds (0 or more), got {timeout!r}"
        )


def names_package(path) -> bool:
    """Does the path name a package file (`.m3kb`)? Such a path is opened, never created."""
    return path.endswith(".m3kb")


def existing_parent(directory) -> str:
    """The nearest existing ancestor of `directory` (itself when it exists)."""
    while not os.path.exists(directory):
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return directory

"""A LangChain Document's metadata as columns of m3db's `memories`, and back; a LangChain filter
dict as a recall filter.

m3db stores metadata keys as typed columns (filter with SQL: `where="page > 3"`). LangChain
metadata may hold keys no column can have: a built-in column's name (`id`, `text`: the standard
suite's metadata is {"id": 1}), or no identifier at all ("Header 1"). So a key that can be a
column is one (when its value is not None); every other key, and every None value, goes
into one JSON column, `langchain_metadata`. Reading back merges the two, so a Document's
metadata round-trips exactly. A filter dict {key: value} becomes a SQL condition over the same
places: `"key" = ?` for a column, a JSON comparison inside `langchain_metadata` otherwise.

Imports: json, m3db.errors and m3db.extend (the catalog's own rule for a metadata key).
"""

import json

from m3db.errors import InvalidInputError
from m3db.extend import check_metadata_key

# the one column holding the metadata that cannot be columns of its own
EXTRA = "langchain_metadata"


def is_column(key) -> bool:
    """Whether `key` can be a metadata column of `memories` (the catalog's rule), and is not ours."""
    if not isinstance(key, str) or key.lower() == EXTRA:
        return False
    try:
        check_metadata_key(key)
    except InvalidInputError:
        return False
    return True


def columns_of(metadata) -> dict:
    """A Document's metadata as the memories' metadata: column keys as they are, the rest under EXTRA."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"a Document's metadata must be a dict, got {type(metadata).__name__}")
    columns, extra = {}, {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise InvalidInputError(f"metadata keys are strings, got {key!r}")
        (columns if value is not None and is_column(key) else extra)[key] = value
    if extra:
        columns[EXTRA] = extra
    return columns


def metadata_of(columns) -> dict:
    """The inverse of columns_of: a memory's metadata (its record's, or its non-NULL catalog
    columns) as the Document's."""
    metadata = {k: v for k, v in columns.items() if k != EXTRA}
    extra = columns.get(EXTRA)
    if isinstance(extra, str):  # read from the catalog as JSON text
        extra = json.loads(extra)
    if isinstance(extra, dict):
        metadata.update(extra)
    return metadata


def metadata_of_row(row) -> dict:
    """A Document's metadata from a memory's catalog row {column: value} (built-in columns too,
    JSON columns parsed): the metadata columns that are set, and the JSON column of the rest."""
    return metadata_of({k: v for k, v in row.items() if v is not None and (k == EXTRA or is_column(k))})


def where_of(filter, columns) -> tuple[str, list]:
    """A filter dict {key: value} (each key equal to its value; None: absent or None) as a SQL
    condition and its parameters. `columns`: the names of `memories`' columns now; a key no
    memory has matches nothing (or, for None, everything)."""
    if not isinstance(filter, dict):
        raise InvalidInputError(f"a filter is a dict {{key: value}} or a SQL string, got {type(filter).__name__}")
    have = {c.lower() for c in columns}
    parts, params = [], []
    for key, value in filter.items():
        if not isinstance(key, str):
            raise InvalidInputError(f"filter keys are metadata keys (strings), got {key!r}")
        if is_column(key):
            if key.lower() not in have:
                parts.append("TRUE" if value is None else "FALSE")
            elif value is None:
                parts.append(f'"{key}" IS NULL')
            elif isinstance(value, (list, dict)):  # a JSON column: compared as JSON, not as text
                parts.append(f"json_extract(\"{key}\", '$') = json(?)")
                params.append(_json(value))
            else:
                parts.append(f'"{key}" = ?')
                params.append(value)
        elif EXTRA not in have:
            parts.append("TRUE" if value is None else "FALSE")
        else:
            found = f"json_extract({EXTRA}, ?)"
            path = '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
            if value is None:
                parts.append(f"coalesce({found} = json('null'), TRUE)")
                params.append(path)
            else:
                parts.append(f"coalesce({found} = json(?), FALSE)")
                params.extend([path, _json(value)])
    return " AND ".join(f"({p})" for p in parts) or "TRUE", params


def _json(value) -> str:
    # DuckDB's json_extract gives minified JSON; the value is compared in the same form
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

"""LlamaIndex metadata filters as m3db recall filters: `MetadataFilters` -> SQL `where` + params.

Owns the operator table: every `FilterOperator` of llama-index-core 0.14 maps, with the meaning
LlamaIndex's own in-memory store gives it (`llama_index.core.vector_stores.utils`), where a key a
memory lacks reads as None and matches only `!=`, `nin` and `is_empty`:

| operator | SQL over the key's column |
|---|---|
| `==`, `>`, `<`, `>=`, `<=` | `col = ?`, ... (a list value is refused: use `in`) |
| `!=` | `col IS NULL OR col <> ?` |
| `in`, `nin` | `col IN (?, ...)`, `col IS NULL OR col NOT IN (?, ...)` (the value is a list) |
| `contains`, `any`, `all` | the value, any or all of the values: in a list (JSON) column, `json_contains(col, ?)`; |
| | in a text column, as a substring (`contains(col, ?)`), as Python's `in` does |
| `text_match`, `text_match_insensitive` | text columns: `contains(col, ?)`, `contains(lower(col), lower(?))` |
| `is_empty` | `col IS NULL`, or `''` (text), or `[]` (a list) |

Conditions `and`, `or` and `not` (none of the filters match), nested to any depth. Each
condition is wrapped in `COALESCE(..., FALSE)`, so SQL's NULL never turns a `not` around.
A key is a metadata column of `memories` (or a built-in one, such as `text`); `ref_doc_id`,
`doc_id` and `document_id` name the LlamaIndex document, which is the memory's m3db document
source. Values are always bound as parameters, never written into the SQL. What cannot map
(an unknown operator, a list where one value is meant, `text_match` on a number column, a key
that is not a plain identifier) is an InvalidInputError naming the filter, never ignored.

Imports: m3db.errors, llama_index.core.
"""

import json
import re

from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters

from m3db.errors import InvalidInputError

# LlamaIndex's names for a node's document (node_to_metadata_dict writes all three)
DOCUMENT_KEYS = ("ref_doc_id", "doc_id", "document_id")
DOCUMENT_SOURCE = "(SELECT source FROM documents WHERE documents.id = memories.document_id)"
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")  # m3db's metadata keys
COMPARISONS = {
    FilterOperator.EQ: "=",
    FilterOperator.GT: ">",
    FilterOperator.LT: "<",
    FilterOperator.GTE: ">=",
    FilterOperator.LTE: "<=",
}
LIST_OPERATORS = (FilterOperator.IN, FilterOperator.NIN, FilterOperator.ANY, FilterOperator.ALL)
# the operators a key no memory has still satisfies (its value is None)
MATCH_MISSING = (FilterOperator.NE, FilterOperator.NIN, FilterOperator.IS_EMPTY)


def filter_sql(filters: MetadataFilters, columns: dict) -> tuple[str, list]:
    """(SQL condition, params) for `filters` over `memories`, whose columns are `columns`
    ({lower-case name: (name, DuckDB type)}, from information_schema)."""
    parts, params = [], []
    for f in filters.filters:
        sql, values = filter_sql(f, columns) if isinstance(f, MetadataFilters) else _one(f, columns)
        parts.append(sql)
        params.extend(values)
    condition = filters.condition or FilterCondition.AND
    if not parts:  # no filters: everything passes, as in LlamaIndex's own store
        return "TRUE", []
    if condition == FilterCondition.AND:
        return "(" + " AND ".join(parts) + ")", params
    if condition == FilterCondition.OR:
        return "(" + " OR ".join(parts) + ")", params
    if condition == FilterCondition.NOT:
        return "(NOT (" + " OR ".join(parts) + "))", params
    raise InvalidInputError(f"the filter condition {condition!r} is not one m3db maps (and, or, not)", option="filters")


def _one(f: MetadataFilter, columns) -> tuple[str, list]:
    """One filter as a condition that is TRUE or FALSE, never NULL."""
    op, value = FilterOperator(f.operator), f.value
    shown = f"the filter {f.key!r} {op.value} {value!r}"
    if op != FilterOperator.IS_EMPTY and value is None:
        raise InvalidInputError(f"{shown}: the value is None; use the is_empty operator", option="filters")
    if op in LIST_OPERATORS and not isinstance(value, list):
        raise InvalidInputError(f"{shown}: {op.value} takes a list of values", option="filters")
    if op not in LIST_OPERATORS and op != FilterOperator.IS_EMPTY and isinstance(value, list):
        raise InvalidInputError(f"{shown}: {op.value} takes one value; for a list use in or any", option="filters")
    column, sql_type = _column(f.key, columns)
    if column is None:  # no memory has this key: every value is None
        return ("TRUE" if op in MATCH_MISSING else "FALSE"), []
    sql, params = _condition(op, value, column, sql_type, shown)
    return f"COALESCE({sql}, FALSE)", params


def _column(key, columns) -> tuple[str | None, str | None]:
    """(SQL for the key's value, its DuckDB type), or (None, None) for a key no memory has."""
    if not isinstance(key, str) or not IDENTIFIER.match(key):
        raise InvalidInputError(
            f"the filter key {key!r} is not a metadata key of m3db (letters, digits and _, not starting with a digit)",
            option="filters",
        )
    if key.lower() in DOCUMENT_KEYS:
        return DOCUMENT_SOURCE, "VARCHAR"
    name, sql_type = columns.get(key.lower(), (None, None))
    return (None, None) if name is None else (f'"{name}"', sql_type)


def _condition(op, value, column, sql_type, shown) -> tuple[str, list]:
    if op in COMPARISONS:
        return f"{column} {COMPARISONS[op]} ?", [value]
    if op == FilterOperator.NE:
        return f"({column} IS NULL OR {column} <> ?)", [value]
    if op in (FilterOperator.IN, FilterOperator.NIN):
        if not value:
            return ("FALSE" if op == FilterOperator.IN else "TRUE"), []
        marks = ", ".join("?" * len(value))
        if op == FilterOperator.IN:
            return f"{column} IN ({marks})", list(value)
        return f"({column} IS NULL OR {column} NOT IN ({marks}))", list(value)
    if op == FilterOperator.IS_EMPTY:
        empty = {"VARCHAR": f" OR {column} = ''", "JSON": f" OR CAST({column} AS VARCHAR) = '[]'"}
        return f"({column} IS NULL{empty.get(sql_type, '')})", []
    if op in (FilterOperator.TEXT_MATCH, FilterOperator.TEXT_MATCH_INSENSITIVE):
        if sql_type != "VARCHAR" or not isinstance(value, str):
            raise InvalidInputError(
                f"{shown}: {op.value} matches text in a text column; this one is {sql_type}", option="filters"
            )
        if op == FilterOperator.TEXT_MATCH:
            return f"contains({column}, ?)", [value]
        return f"contains(lower({column}), lower(?))", [value]
    if op in (FilterOperator.CONTAINS, FilterOperator.ANY, FilterOperator.ALL):
        return _contains(op, value, column, sql_type, shown)
    raise InvalidInputError(f"{shown}: m3db does not map the operator {op.value!r}", option="filters")


def _contains(op, value, column, sql_type, shown) -> tuple[str, list]:
    """`contains` one value, `any` or `all` of a list: of a list column's items, or as
    substrings of a text column (Python's `in` over a string)."""
    values = [value] if op == FilterOperator.CONTAINS else list(value)
    if not values:  # Python's any([]) and all([])
        return ("TRUE" if op == FilterOperator.ALL else "FALSE"), []
    if sql_type == "JSON":
        test, params = f"json_contains({column}, ?)", [json.dumps(v) for v in values]
    elif sql_type == "VARCHAR" and all(isinstance(v, str) for v in values):
        test, params = f"contains({column}, ?)", values
    else:
        raise InvalidInputError(
            f"{shown}: {op.value} looks inside a list (or a text); this column is {sql_type}", option="filters"
        )
    joined = (" OR " if op == FilterOperator.ANY else " AND ").join([test] * len(values))
    return f"({joined})", params

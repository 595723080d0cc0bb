"""Helpers over sqlglot trees: questions the planner asks of a parsed statement (where a node
sits, which columns a SELECT reads, whether its LIMIT is a plain row count) and the relation
that stands in for a recall() call.

This module owns these tree helpers; it holds no plan and runs nothing. It imports sqlglot
alone, nothing of m3db (plan.py imports it), and never torch.
"""

import functools

import sqlglot
from sqlglot import exp


def number(text) -> int | float:
    """A numeric literal's text as an int when it is one, else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def placeholders(node) -> tuple[str, ...]:
    """The sorted names of the parameters in `node`: what it reads when it runs."""
    return tuple(sorted({h.name for h in node.find_all(exp.Placeholder)}))


def inside_query(node, top) -> bool:
    """Is `node` inside a subquery of `top`?"""
    parent = node.parent
    while parent is not None and parent is not top:
        if isinstance(parent, exp.Query):
            return True
        parent = parent.parent
    return False


def within(node, top) -> bool:
    """Is `node` `top` or under it?"""
    while node is not None:
        if node is top:
            return True
        node = node.parent
    return False


def output_names(query) -> set[str] | None:
    """Lower-case column names of a SELECT's rows, or None where they are not all named here
    (a star, an unnamed expression, a UNION)."""
    if not isinstance(query, exp.Select):
        return None
    names = [e.output_name for e in query.expressions]
    return {n.lower() for n in names} if all(n and n != "*" for n in names) else None


def conjuncts(condition) -> list[exp.Expression]:
    """The AND-ed parts of a condition, each of which can be pushed down on its own."""
    if isinstance(condition, exp.And):
        return conjuncts(condition.this) + conjuncts(condition.expression)
    if isinstance(condition, exp.Paren) and isinstance(condition.this, exp.And):
        return conjuncts(condition.this)
    return [condition]


def enclosing_select(table) -> tuple[exp.Select | None, tuple[exp.Expression, exp.Expression | None] | None]:
    """(the SELECT whose FROM or JOIN holds `table`, (LIMIT, OFFSET) nodes when `table` is that
    SELECT's only source and nothing groups its rows) or (None, None)."""
    parent = table.parent
    if isinstance(parent, exp.Join):
        parent = parent.parent
        sole = False
    elif isinstance(parent, exp.From):
        parent = parent.parent
        sole = True
    else:
        return None, None
    if not isinstance(parent, exp.Select):
        return None, None
    sole = sole and not parent.args.get("joins")
    grouped = (
        parent.args.get("group") or parent.args.get("distinct") or any(e.find(exp.AggFunc) for e in parent.expressions)
    )
    limit, offset = parent.args.get("limit"), parent.args.get("offset")
    if not sole or grouped or not simple_limit(limit, offset) or limit is None:
        return parent, None
    return parent, (limit.expression, offset.expression if offset is not None else None)


def simple_limit(limit, offset) -> bool:
    """Are LIMIT and OFFSET (either may be None) plain row counts: a constant or a parameter,
    no PERCENT, WITH TIES or FETCH? Only those say how many rows a recall must give."""
    simple = (exp.Literal, exp.Placeholder)
    if limit is not None and (
        not isinstance(limit, exp.Limit)
        or limit.args.get("limit_options") is not None
        or limit.args.get("offset") is not None
        or limit.args.get("expressions")
        or not isinstance(limit.expression, simple)
    ):
        return False
    return offset is None or (
        isinstance(offset, exp.Offset) and isinstance(offset.expression, simple) and not offset.args.get("expressions")
    )


def used_columns(select, table, alias) -> set[str] | None:
    """Lower-case names of the recall's columns that `select` may read, or None for all of
    them (a star, a whole-row reference, USING or NATURAL, or no enclosing SELECT)."""
    if select is None:
        return None
    for join in select.args.get("joins") or []:
        if join.args.get("using") or (join.kind or "").upper() == "NATURAL" or join.args.get("method"):
            return None
    if any(e.find(exp.Star, exp.Columns) for e in select.expressions):
        return None
    used = set()
    for column in select.find_all(exp.Column):
        if column.table.lower() == alias.lower() or not column.table:
            used.add(column.name.lower())
        if not column.table and column.name.lower() == alias.lower():
            return None  # the row as a struct
    return used


def unnested_relation(prefix, columns, alias) -> exp.Subquery:
    """The rows of one recall as DuckDB sees them: bound lists, unnested side by side.
    `columns`: (index, name, DuckDB type) of each bound column; its list is $<prefix><index>."""
    select = _unnest_lists(prefix, tuple(columns)).copy()
    return exp.Subquery(this=select, alias=exp.TableAlias(this=exp.to_identifier(alias)))


@functools.lru_cache(maxsize=256)
def _unnest_lists(prefix, columns):
    # cached: parsing costs more than copying, and statements of one shape share it; the tree is
    # shared, so unnested_relation copies it before it is changed
    items = ", ".join(
        f"UNNEST(${prefix}{i}::{sql_type}[]) AS {exp.to_identifier(name, quoted=True).sql(dialect='duckdb')}"
        for i, name, sql_type in columns
    )
    return sqlglot.parse_one(f"SELECT {items}", dialect="duckdb")

"""The direct path: the commonest memory query answered by m3db itself, without DuckDB.

`SELECT <recall's columns, maybe renamed, or *> FROM recall(...) [ORDER BY score DESC]
[LIMIT n [OFFSET m]]` leaves DuckDB nothing to do but hand back the rows it was given, best
first as recall() returns them. The planner (plan.py) asks `direct_path` whether a planned read
is such a query; when it is, the read carries its output columns (DirectColumn) and its LIMIT
and OFFSET, and run.py returns the recall's rows itself (about 0.5 ms saved, half a recall).

This module owns that decision; it runs nothing. It imports sqlglot, statement.py (the records)
and tree.py (the LIMIT check) only: never plan.py, check.py, run.py, the database, storage,
package, knowledge or cli, and never torch.
"""

from sqlglot import exp

from .statement import DirectColumn, LimitOffset
from .tree import simple_limit


def direct_path(tree, read, value) -> None:
    """Set read.direct and read.direct_limit when `tree`, planned into `read` (one recall, no
    generate), is the query of the module docstring, everything else pushed into the recall;
    else leave them None. DuckDB's column names are kept: the relation's name for a column, the
    alias when renamed. JSON columns go through DuckDB, which normalizes their text. `value` is
    the planner's: it turns a LIMIT or OFFSET node into a bound Value. tests/test_sql.py checks
    both paths give the same rows."""
    rc = read.recalls[0]
    if not isinstance(tree, exp.Select) or not isinstance((tree.args.get("from_") or exp.From()).this, exp.Subquery):
        return
    if tree.args["from_"].this.alias != rc.alias:
        return
    allowed = {"expressions", "from_", "order", "limit", "offset", "kind", "hint", "exclude", "operation_modifiers"}
    if any(v for k, v in tree.args.items() if k not in allowed) or tree.args.get("kind") or tree.args.get("exclude"):
        return
    bound = {}  # lower-case name -> (name, bound list, DuckDB type) of each bound column
    for i in rc.bound:
        c = rc.columns[i]
        bound[c.name.lower()] = (c.name, f"{rc.prefix}{i}", c.sql_type)
    out = []
    for e in tree.expressions:
        name = None
        if isinstance(e, exp.Alias) and isinstance(e.this, exp.Column):
            name, e = e.alias, e.this
        if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)):
            if (
                isinstance(e, exp.Column)
                and e.table.lower() != rc.alias.lower()
                or len(bound) != len(rc.columns)
                or e.args.get("except")
                or e.args.get("replace")
                or e.args.get("rename")
            ):
                return
            out += [DirectColumn(n, key) for n, key, _ in bound.values()]
            continue
        if (
            not isinstance(e, exp.Column)
            or e.table.lower() not in ("", rc.alias.lower())
            or e.args.get("db")
            or not isinstance(e.this, exp.Identifier)
            or e.name.lower() not in bound
        ):
            return
        column, key, _ = bound[e.name.lower()]
        out.append(DirectColumn(name or column, key))
    if any(t == "JSON" for _, key, t in bound.values() if key in {c.key for c in out}):
        return
    order = tree.args.get("order")
    if order is not None:
        # score is never NULL, so where NULLs sort does not matter
        key = order.expressions[0].this if len(order.expressions) == 1 else None
        if (
            not isinstance(key, exp.Column)
            or key.name.lower() != "score"
            or not order.expressions[0].args.get("desc")
            or key.table.lower() not in ("", rc.alias.lower())
        ):
            return
        score = bound["score"][1]  # (always bound)
        if not key.table and any(c.name.lower() == "score" and c.key != score for c in out):
            return  # ORDER BY score names the output column of that name, another one
    limit, offset = tree.args.get("limit"), tree.args.get("offset")
    if not simple_limit(limit, offset):
        return
    read.direct = out
    read.direct_limit = LimitOffset(
        None if limit is None else value(None, "LIMIT", limit.expression),
        None if offset is None else value(None, "OFFSET", offset.expression),
    )

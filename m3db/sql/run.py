"""SQL memory queries: DuckDB SQL over the catalog, plus the memory operations m3db plans.

`db.sql(text, params)` runs one statement (docs/sql.md has the language with examples):
- a read (SELECT, WITH, VALUES, FROM-first, DESCRIBE, SUMMARIZE, SHOW, PIVOT) over the catalog
  tables, in which `recall(query, k => 5)` and `generate(prompt, ...)` are table functions;
- `INSERT INTO documents (text, ...) VALUES ... | SELECT ...`: chunked, embedded, encoded;
- `DELETE FROM memories [USING ...] WHERE ...`: forgotten in one transaction;
- `EXPLAIN [ANALYZE]` of any of these: the vector plan next to DuckDB's own plan.

How a statement runs: it is parsed and checked (check.py: only the catalog, never files,
the network or side effects), then planned (plan.py: each recall()'s own WHERE conditions
pushed down into its filter, parameters renamed and always bound). Here its parameters are
bound and it runs: each recall's search is db.recall, one code path; its matches go to DuckDB
as bound lists, unnested in place of the call; DuckDB runs the rest. Plans are cached per
statement text and catalog schema, like prepared statements.

This module owns running statements: `run` (the entry point of Database.sql()), the plan
cache, binding, running the memory functions and DuckDB, INSERT and DELETE, and EXPLAIN; its
results are `Rows` (rows.py). It imports check.py, plan.py, rows.py, MAX_K from the search
layer and the errors; never the database, package, knowledge or cli: the Database arrives as
`db`, reached only through its public verbs and attributes (db.recall, db.generate,
db.add_documents, db.forget, db.transaction, db.read_only, db.catalog). It talks to DuckDB only
through the catalog's connection (`db.catalog.con`), and never imports torch.
"""

import decimal
import difflib
import json
import re
import threading
from collections import OrderedDict
from typing import NamedTuple

import duckdb
import numpy as np

from ..errors import InvalidInputError, QueryError, ReadOnlyError, TooManyRowsError
from ..search.plan import MAX_K
from ..storage.catalog import duckdb_unreadable
from .check import MEMORY_FUNCTIONS, check_document_columns, duckdb_words, excerpt, name_list
from .plan import Planner
from .rows import Rows
from .statement import Generate, Recall

DEFAULT_K = 5  # as db.recall
MAX_GENERATE_TOKENS = 4096  # a statement cannot ask the decoder for an unbounded KV cache
PLAN_CACHE_SIZE = 256


class _RecallNote(NamedTuple):
    """What running one recall() did, for EXPLAIN."""

    recall: Recall
    query: object  # the text or vector searched for
    k: int
    plan: dict  # the search plan (Matches.plan)
    returned: int  # how many matches came back


class _GenerateNote(NamedTuple):
    """What one generate() was asked, for EXPLAIN (which never runs the decoder)."""

    generate: Generate
    prompt: str
    options: dict  # db.generate's keyword arguments


_CACHE = OrderedDict()
_CACHE_LOCK = threading.Lock()


def run(db, text, params=None, *, max_rows=None) -> Rows:
    """Run one SQL statement on `db`; return Rows. The entry point of Database.sql().
    max_rows: refuse (TooManyRowsError) a result, or an INSERT ... SELECT, of more rows, after
    reading one more than it and no further; None: no cap."""
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0):
        raise InvalidInputError(f"max_rows must be None or an integer >= 0, got {max_rows!r}")
    if not isinstance(text, str):
        raise InvalidInputError(f"a SQL statement must be a string, got {type(text).__name__}")
    if params is not None and not isinstance(params, (list, tuple, dict)):
        raise InvalidInputError(
            f"params must be a list (for ? and $1) or a dict (for $name), got {type(params).__name__}"
        )
    plan = _plan(db, text)
    values = _bind(plan, params)
    if plan.kind != "read" and db.read_only and not plan.explain:
        what = "INSERT INTO documents" if plan.kind == "insert" else "DELETE FROM memories"
        raise ReadOnlyError(
            f"{what} writes, and this database is open read-only. Open it for writing "
            "(m3db.connect(path) without read_only=True; `m3db sql PATH --write`, `m3db shell PATH --write`)"
        )
    if plan.explain:
        return _explain(db, plan, values)
    if plan.kind == "insert":
        return _insert(db, plan, values, max_rows)
    if plan.kind == "delete":
        return _delete(db, plan, values)
    columns, rows, _ = _execute(db, plan.read, values, max_rows=max_rows)
    return Rows(columns, rows)


def _plan(db, text):
    columns = db.catalog.columns()
    key = (text, tuple(columns.items()))
    with _CACHE_LOCK:
        plan = _CACHE.get(key)
        if plan is not None:
            _CACHE.move_to_end(key)
            return plan
    plan = Planner(db, text, columns).plan()
    with _CACHE_LOCK:
        _CACHE[key] = plan
        while len(_CACHE) > PLAN_CACHE_SIZE:
            _CACHE.popitem(last=False)
    return plan


# -- binding and running --------------------------------------------------------------------------


def _bind(plan, params):
    """{internal name: value} of the user's parameters, checked against the statement."""
    wanted = plan.user_params
    given = params if params is not None else []
    if plan.style is None:
        if len(given):
            raise QueryError(f"the statement has no parameters, but {len(given)} were given")
        return {}
    if plan.style == "positional":
        if not isinstance(given, (list, tuple)):
            raise QueryError("the statement uses positional parameters (?, $1): pass params as a list")
        need = max(wanted.values()) + 1
        if len(given) != need:
            raise QueryError(
                f"the statement has {need} positional parameter{'s' if need != 1 else ''}, "
                f"got {len(given)} value{'s' if len(given) != 1 else ''}"
            )
        return {internal: given[user] for internal, user in wanted.items()}
    if not isinstance(given, dict):
        raise QueryError(
            f"the statement uses named parameters (${', $'.join(sorted(wanted.values()))}): pass params as a dict"
        )
    missing = sorted(set(wanted.values()) - set(given))
    extra = sorted(map(str, set(given) - set(wanted.values())))
    if missing or extra:
        raise QueryError(
            f"parameters: missing {missing}, unexpected {extra}; "
            f"the statement uses ${', $'.join(sorted(wanted.values()))}"
        )
    return {internal: given[user] for internal, user in wanted.items()}


def _execute(db, read, values, *, explain=None, max_rows=None):
    """Run the memory functions of `read`, then DuckDB; return (columns, rows, notes)."""
    notes = []
    for rc in read.recalls:
        notes.append(_run_recall(db, rc, values))
    for g in read.generates:
        notes.append(_run_generate(db, g, values, dry=explain is not None))
    if read.direct is not None and explain is None:
        rows = _direct_rows(db, read, values)
        if rows is not None:
            if max_rows is not None and len(rows) > max_rows:
                raise _too_many(max_rows)
            return [c.name for c in read.direct], rows, notes
    sql = read.sql if explain is None else f"{explain} {read.sql}"
    columns, rows = _duckdb(db, sql, {name: values[name] for name in read.sql_params}, read, max_rows)
    return columns, rows, notes


def _too_many(max_rows):
    return TooManyRowsError(
        f"the statement gives more than {max_rows:,} rows (max_rows={max_rows}): add a LIMIT (with OFFSET to page), "
        "select fewer rows, or aggregate"
    )


def _direct_rows(db, read, values):
    """The rows of a direct-path statement, or None when its LIMIT/OFFSET values are not plain
    non-negative integers (DuckDB then runs it, and says what is wrong with them)."""
    bounds = []
    for v in (read.direct_limit.limit, read.direct_limit.offset):
        n = None if v is None else _evaluate(db, v, values)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            return None
        bounds.append(n)
    limit, offset = bounds
    rows = list(zip(*[values[c.key] for c in read.direct])) if read.direct else []
    start = offset or 0
    return rows[start:] if limit is None else rows[start : start + limit]


def _duckdb(db, sql, values, read=None, max_rows=None):
    try:
        cursor = db.catalog.con.execute(sql, values)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        if max_rows is None:
            return columns, cursor.fetchall()
        rows = cursor.fetchmany(max_rows + 1)  # one past the cap is enough to refuse: the rest is never read
        if len(rows) > max_rows:
            raise _too_many(max_rows)
        return columns, rows
    except UnicodeDecodeError as e:  # DuckDB's own error, its message unreadable (duckdb_unreadable)
        raise QueryError(duckdb_unreadable(e)) from e
    except duckdb.Error as e:
        raise QueryError(_duckdb_message(e, read)) from e


def _duckdb_message(e, read):
    message = duckdb_words(str(e).strip())
    if read is not None and (read.recalls or read.generates):
        # DuckDB quotes the statement as rewritten (recall's rows unnested from lists), which
        # is not what the user wrote: keep its words, drop its excerpt
        message = message.split("\n\nLINE ")[0]
        for rc in read.recalls:
            if f'"{rc.alias}" does not have a column' in message or f'"{rc.alias}.' in message:
                message += (
                    f"\nrecall() {rc.alias} has the columns {name_list(c.name for c in rc.columns)}; "
                    f"JOIN memories m ON m.id = {rc.alias}.id for the others"
                )
        for g in read.generates:
            if f'"{g.alias}" does not have a column' in message:
                message += f"\ngenerate() {g.alias} has the columns text, finish_reason, mode, sources"
    unknown = re.search(r"Function with name \"?(\w+)\"? does not exist", message)
    if unknown and difflib.get_close_matches(unknown.group(1).lower(), MEMORY_FUNCTIONS + ("similarity",), cutoff=0.6):
        message += (
            "\n(the memory functions are table functions used in FROM: recall(query, k => 5), generate(prompt, ...))"
        )
    return message


def _evaluate(db, value, values):
    if value.kind == "const":
        return value.value
    if value.kind == "param":
        return values[value.value]
    return _duckdb(db, f"SELECT {value.value}", {p: values[p] for p in value.params})[1][0][0]


def _run_recall(db, rc, values):
    query = _evaluate(db, rc.query, values)
    if isinstance(query, (list, tuple)):
        if not query or not all(
            isinstance(x, (int, float, decimal.Decimal)) and not isinstance(x, bool) for x in query
        ):
            raise InvalidInputError("recall()'s query must be a text or a vector (a list of numbers)")
        query = np.asarray(query, dtype=np.float32)
    elif not isinstance(query, (str, np.ndarray)):
        raise InvalidInputError(
            f"recall()'s query must be a text or a vector (a list of numbers), got {type(query).__name__} {query!r}"
        )
    if rc.k is not None:
        k = _evaluate(db, rc.k, values)
    elif rc.limit is not None:
        limit = _evaluate(db, rc.limit.limit, values)
        offset = 0 if rc.limit.offset is None else _evaluate(db, rc.limit.offset, values)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (limit, offset)):
            raise InvalidInputError(
                f"LIMIT {limit!r} OFFSET {offset!r}: recall() takes its k from them, "
                "so they must be non-negative integers"
            )
        k = limit + offset
        if k > MAX_K:
            raise InvalidInputError(
                f"recall() takes k from LIMIT + OFFSET = {k}, over the {MAX_K} maximum: pass k => explicitly"
            )
    else:
        k = DEFAULT_K
    if rc.k is None and k == 0:  # LIMIT 0: nothing to search for
        matches, plan = [], {"strategy": "none", "reason": "LIMIT 0"}
    else:
        params = {p: values[p] for p in rc.filter_params} if rc.filter_params else None
        matches = db.recall(query, k=k, where=rc.filter, params=params)
        plan = matches.plan
    for i in rc.bound:
        spec = rc.columns[i]
        if spec.from_match:
            column = [getattr(m, spec.name) for m in matches]
        else:
            column = [m.metadata.get(spec.name) for m in matches]
            if spec.sql_type == "JSON":
                column = [None if v is None else json.dumps(v) for v in column]
            elif spec.sql_type == "DOUBLE":
                column = [None if v is None else float(v) for v in column]
        values[f"{rc.prefix}{i}"] = column
    return _RecallNote(rc, query, k, plan, len(matches))


def _run_generate(db, g, values, *, dry):
    prompt = _evaluate(db, g.prompt, values)
    if not isinstance(prompt, str):
        raise InvalidInputError(f"generate()'s prompt must be a text, got {type(prompt).__name__}")
    options = {name: _evaluate(db, v, values) for name, v in g.options.items()}
    kwargs = _generate_options(options)
    # the options checked as db.generate checks them (EXPLAIN too, which never runs the decoder);
    # the mode as the answer names it, for EXPLAIN
    kwargs["memory"] = db.check_generate_options(**kwargs)["memory"]
    if dry:
        text, finish, mode, sources = "", "", kwargs["memory"], []
    else:
        answer = db.generate(prompt, where=g.where, **kwargs)
        text, finish, mode = answer.text, answer.finish_reason, answer.mode
        sources = [{"id": s.id, "text": s.text, "document": s.document, "title": s.title} for s in answer.sources]
    values.update(
        {f"{g.prefix}text": text, f"{g.prefix}finish": finish, f"{g.prefix}mode": mode, f"{g.prefix}sources": sources}
    )
    return _GenerateNote(g, prompt, kwargs)


def _generate_options(options):
    """generate()'s named arguments as db.generate's keyword arguments: DECIMAL literals made
    floats, and a statement's own bounds on max_tokens and k. The memory mode and the types and
    ranges of the sampling options are checked by db.check_generate_options (the knowledge
    layer's, which this layer may not import), so SQL and Python refuse the same values with
    the same words."""
    out = {"max_tokens": 128, "memory": options.get("memory", True)}
    # a statement cannot ask the decoder for an unbounded KV cache, nor recall past MAX_K
    for name, low, high in (("max_tokens", 1, MAX_GENERATE_TOKENS), ("k", 1, MAX_K)):
        if name in options:
            v = options[name]
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                raise InvalidInputError(f"generate()'s {name} must be an integer in [{low}, {high}], got {v!r}")
            out[name] = v
    for name in ("temperature", "top_p", "seed", "margin"):
        if name in options:
            v = options[name]
            out[name] = float(v) if isinstance(v, decimal.Decimal) else v  # DuckDB reads 0.5 as DECIMAL
    return out


def _insert(db, plan, values, max_rows=None):
    columns, rows, _ = _execute(db, plan.read, values, max_rows=max_rows)
    names = plan.columns or columns
    if plan.columns and len(columns) != len(plan.columns):
        raise QueryError(
            f"INSERT INTO documents names {len(plan.columns)} columns ({name_list(plan.columns)}) "
            f"but the SELECT gives {len(columns)}"
        )
    if not plan.columns:
        check_document_columns(names)
    documents = [_document(names, row, i) for i, row in enumerate(rows)]
    if not documents:
        return Rows(["documents_added", "documents_skipped", "documents_empty", "memories_added"], [(0, 0, 0, 0)])
    # one transaction: a statement adds all its documents or none
    with db.transaction():
        report = db.add_documents(documents, batch_size=len(documents), progress=False)
    return Rows(
        ["documents_added", "documents_skipped", "documents_empty", "memories_added"],
        [(report.documents_added, report.documents_skipped, report.documents_empty, report.memories_added)],
    )


_DOCUMENT_FIELDS = ("text", "source", "title", "uri", "metadata")


def _document(names, row, position):
    doc = {"metadata": {}}
    for name, value in zip(names, row):
        if isinstance(value, decimal.Decimal):  # DuckDB reads 1.5 as DECIMAL; metadata keeps floats
            value = float(value)
        low = name.lower()
        if low == "metadata":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise InvalidInputError(f"row {position + 1}: metadata must be a JSON object, got {value!r}") from e
            if value is not None and not isinstance(value, dict):
                raise InvalidInputError(
                    f"row {position + 1}: metadata must be a JSON object or a STRUCT, got {value!r}"
                )
            doc["metadata"].update(value or {})
        elif low in _DOCUMENT_FIELDS:
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(
                    f"row {position + 1}: {low} must be text, got {type(value).__name__} {value!r} (CAST it AS VARCHAR)"
                )
            doc[low] = value
        else:
            doc["metadata"][name] = value
    if doc.get("text") is None:
        raise InvalidInputError(f"row {position + 1}: text is NULL; every document needs its text")
    return doc


def _delete(db, plan, values):
    _, rows, _ = _execute(db, plan.read, values)
    ids = sorted({r[0] for r in rows})
    if ids:
        db.forget(ids)  # one transaction
    return Rows(["memories_forgotten"], [(len(ids),)])


# -- EXPLAIN --------------------------------------------------------------------------------------

_STRATEGIES = {
    "ann": "approximate: HNSW graph search",
    "exact": "exact: cosine against every allowed memory",
    "ann+filter": "approximate: HNSW over-fetch, then keep the allowed ids",
    "empty": "none: the filter allows no memory",
    "none": "none",
}


def _explain(db, plan, values):
    read = plan.read
    columns, rows, notes = _execute(db, read, values, explain=plan.explain)
    steps = []
    if plan.kind == "insert":
        steps.append(
            (
                "insert",
                f"documents from {plan.source}; each is chunked, embedded, encoded, and all are "
                "committed in one transaction (add_documents). Nothing is written by EXPLAIN",
            )
        )
    elif plan.kind == "delete":
        # counted from the recalls already run: EXPLAIN never runs the decoder nor searches twice
        if read.generates:
            which = (
                "the memories the WHERE matches "
                "(not counted: it reads generate(), and EXPLAIN does not run the decoder)"
            )
        else:
            ids = _duckdb(db, read.sql, {name: values[name] for name in read.sql_params}, read)[1]
            which = f"the {len({r[0] for r in ids}):,} memories the WHERE matches"
        steps.append(("delete", f"forget {which}, in one transaction (db.forget). Nothing is forgotten by EXPLAIN"))
    for note in notes:
        steps.append(_describe(db, note))
    steps.append(("sql", read.sql))
    for r in rows:
        steps.append(("duckdb", r[-1]))
    return Rows(["step", "plan"], steps, explain=True)


def _describe(db, note):
    """(step, plan text) of one memory function's note, for EXPLAIN."""
    if isinstance(note, _RecallNote):
        rc, query, p = note.recall, note.query, note.plan
        shown = repr(excerpt(query, 60)) if isinstance(query, str) else f"a vector of {len(query)} numbers"
        lines = [f"query: {shown}, k = {note.k}"]
        if rc.filter:
            lines.append(f"filter (pushed down from WHERE): {rc.filter}")
            if "allowed" in p:
                lines.append(
                    f"  allows {p['allowed']:,} of {p['total']:,} memories (selectivity {p['selectivity']:.2%})"
                )
        else:
            lines.append(f"filter: none (all {p.get('total', 0):,} memories)")
        for condition, why in rc.kept:
            lines.append(f"after the recall (not pushed down): {condition} - {why}")
        lines.append(
            f"search: {_STRATEGIES.get(p.get('strategy'), p.get('strategy'))}"
            + (f" ({p['reason']})" if p.get("reason") else "")
        )
        lines.append(f"candidates fetched: {p.get('candidates', 0):,}; returned: {note.returned}")
        return (f"recall {rc.alias}", "\n".join(lines))
    g, kwargs = note.generate, note.options
    lines = [
        f"prompt: {excerpt(note.prompt, 60)!r}",
        f"mode: {kwargs['memory']}, max_tokens: {kwargs['max_tokens']}, "
        f"k per 64-token chunk: {kwargs.get('k', 'the model default')}",
    ]
    if g.where:
        total = len(db)
        allowed = _duckdb(db, f"SELECT count(*) FROM memories WHERE ({g.where})", {})[1][0][0]
        lines.append(
            f"filter: {g.where}\n  allows {allowed:,} of {total:,} memories"
            + (f" (selectivity {allowed / total:.2%})" if total else "")
        )
    lines.append(
        "recall: once per 64-token chunk of the prompt and of the answer, planned as above; "
        "EXPLAIN does not run the decoder"
    )
    return (f"generate {g.alias}", "\n".join(lines))

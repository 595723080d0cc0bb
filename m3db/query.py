"""SQL memory queries: DuckDB SQL over the catalog, plus the memory operations m3db plans.

`db.sql(text, params)` runs one statement (docs/sql.md has the language with examples):
- a read (SELECT, WITH, VALUES, FROM-first, DESCRIBE, SUMMARIZE, SHOW, PIVOT) over the catalog
  tables, in which `recall(query, k => 5)` and `generate(prompt, ...)` are table functions;
- `INSERT INTO documents (text, ...) VALUES ... | SELECT ...`: chunked, embedded, encoded;
- `DELETE FROM memories [USING ...] WHERE ...`: forgotten in one transaction;
- `EXPLAIN [ANALYZE]` of any of these: the vector plan next to DuckDB's own plan.

How a statement runs: sqlglot parses it (DuckDB dialect) and the tree is checked: only catalog
tables, information_schema views, CTEs where they are visible and a few table functions that
read no files (on top of the catalog's locked-down connection, not instead of it); parameters
are renamed to named DuckDB parameters and always bound. Each recall() is planned here: the
WHERE conditions of its SELECT whose columns are all its own (id, text, document_id, metadata;
never score) become its filter (so k results come back after filtering, as
db.recall(where=...) does); the search itself is db.recall, one code path; its matches go to
DuckDB as bound lists, unnested in place of the call; DuckDB runs the rest.
Plans are cached per statement text and catalog schema, like prepared statements.

This module owns the SQL language. It talks to DuckDB only through the catalog's connection
(`db.catalog.con`), reaches the engine through the Database's public verbs, and never
imports torch.
"""

import dataclasses
import decimal
import difflib
import functools
import json
import logging
import math
import re
import threading
from collections import OrderedDict

import duckdb
import numpy as np
import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import SqlglotError, TokenError
from sqlglot.tokens import TokenType

from .catalog import BUILTIN_COLUMNS
from .database import MAX_K
from .errors import DependencyError, InvalidInputError, QueryError, ReadOnlyError

DEFAULT_K = 5  # as db.recall
MAX_GENERATE_TOKENS = 4096  # a statement cannot ask the decoder for an unbounded KV cache
CATALOG_TABLES = ("documents", "memories", "meta", "forgotten", "codecs")
# table functions that compute rows from their arguments alone (no files, network or settings);
# sqlglot reads range() as generate_series
SAFE_TABLE_FUNCTIONS = ("generate_series", "range", "unnest", "json_each", "json_tree")
MEMORY_FUNCTIONS = ("recall", "generate")
# scalar functions that act outside the query (a log, another statement, the connection's
# random seed) or show its settings (paths among them). Defence in depth: the catalog's
# connection is locked down (catalog.LOCKED_DOWN: no files, network, extensions or setting
# changes), so these are refused here with a clear error on top of that, not instead of it
DENIED_FUNCTIONS = ("write_log", "json_execute_serialized_sql", "setseed", "current_setting")
# the views of DuckDB's information_schema (duckdb_views() WHERE schema_name =
# 'information_schema'); any other name there would be read as a file name
INFORMATION_SCHEMA_VIEWS = (
    "character_sets", "check_constraints", "columns", "constraint_column_usage", "constraint_table_usage",
    "key_column_usage", "referential_constraints", "schemata", "table_constraints", "tables", "views",
)
# the columns of the catalog tables other than memories, fixed by the catalog format
# (catalog.Catalog.create); memories' columns come from the catalog, metadata included
FIXED_TABLE_COLUMNS = {
    "documents": ("id", "source", "title", "uri", "metadata", "created_at"),
    "meta": ("key", "value"),
    "forgotten": ("id", "commit_seq"),
    "codecs": ("name", "version", "params"),
}
# a condition using one of these cannot be a recall filter: filters are cached per commit
VOLATILE_FUNCTIONS = frozenset((
    "random", "rand", "uuid", "gen_random_uuid", "uuidv4", "uuidv7", "now", "current_timestamp",
    "current_date", "current_time", "get_current_time", "get_current_timestamp", "today",
    "localtimestamp", "localtime", "transaction_timestamp", "nextval", "currval",
))
GENERATE_COLUMNS = ("text", "finish_reason", "mode", "sources")
MODE_NAMES = {True: "memory", "rag": "rag", False: "none"}  # generate()'s memory option -> its mode
RECALL_ARGS = ("query", "k")
GENERATE_ARGS = ("prompt", "max_tokens", "memory", "k", "filter", "temperature", "top_p", "seed")
SOURCE_TYPE = "STRUCT(id BIGINT, text VARCHAR, document VARCHAR, title VARCHAR)[]"
ALLOWED = ("SELECT (WITH, VALUES, FROM-first), DESCRIBE, SUMMARIZE, SHOW, PIVOT, EXPLAIN, "
           "INSERT INTO documents, DELETE FROM memories")
PLAN_CACHE_SIZE = 256

_DUCKDB = DuckDB()


class _QuietFallback(logging.Filter):
    """sqlglot logs a warning for each statement it reads as an opaque command (CALL, VACUUM,
    ...); m3db refuses those with its own error, so the warning would only repeat it."""

    def filter(self, record):
        return "Falling back to parsing as a 'Command'" not in record.getMessage()


logging.getLogger("sqlglot").addFilter(_QuietFallback())


def _positional(parser):
    """A `?` placeholder stamped with its place in the text: DuckDB numbers `?`s left to right,
    and the tree alone does not keep that order."""
    node = parser.expression(exp.Placeholder())
    node.meta["position"] = parser._prev.start
    return node


class _Parser(type(_DUCKDB.parser())):
    PLACEHOLDER_PARSERS = {**type(_DUCKDB.parser()).PLACEHOLDER_PARSERS, TokenType.PLACEHOLDER: _positional}


class Rows(list):
    """Rows of a SQL statement (tuples), with the column names in `columns`; `explain` is True
    for the rows of an EXPLAIN (step, plan text). dicts(), arrow(), df() and numpy() convert them."""

    def __init__(self, columns, rows, *, explain=False):
        super().__init__(rows)
        self.columns = columns
        self.explain = explain

    def dicts(self):
        return [dict(zip(self.columns, r)) for r in self]

    def arrow(self):
        """A pyarrow.Table (needs pyarrow)."""
        pa = _optional("pyarrow", "Rows.arrow()")
        return pa.Table.from_arrays([pa.array([r[i] for r in self]) for i in range(len(self.columns))], names=list(self.columns))

    def df(self):
        """A pandas.DataFrame (needs pandas)."""
        pd = _optional("pandas", "Rows.df()")
        return pd.DataFrame.from_records(list(self), columns=list(self.columns))

    def numpy(self):
        """{column: 1-D numpy array}; columns of numbers or booleans without NULLs get their
        numeric dtype, any other column an object array."""
        dupes = sorted({c for c in self.columns if list(self.columns).count(c) > 1})
        if dupes:
            raise InvalidInputError(f"numpy() needs distinct column names; {dupes} repeat: rename them with AS")
        out = {}
        for i, name in enumerate(self.columns):
            values = [r[i] for r in self]
            kinds = {type(v) for v in values}
            if values and kinds <= {int, float, bool} and (bool not in kinds or kinds == {bool}):
                out[name] = np.array(values)
            else:
                col = np.empty(len(values), dtype=object)
                col[:] = values
                out[name] = col
        return out


def _optional(package, what):
    try:
        return __import__(package)
    except ImportError as e:
        raise DependencyError(f"{what} needs the {package} package, which is not installed: pip install {package}") from e


# -- the plan -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Value:
    """An argument m3db evaluates itself: a constant, a parameter (its internal name), or a
    constant SQL expression evaluated by DuckDB (its text and the parameters it reads)."""

    kind: str
    value: object
    params: tuple = ()


@dataclasses.dataclass
class _Recall:
    alias: str
    prefix: str  # names of the bound lists that stand in for the call
    query: _Value
    k: _Value | None  # None: k from LIMIT (limit, offset) or DEFAULT_K
    limit: tuple | None
    filter: str | None  # SQL over `memories`, with internal parameter names
    filter_params: tuple
    kept: list  # (condition, why it stays in WHERE), for EXPLAIN
    columns: list  # (name, DuckDB type) of the relation
    bound: list  # indexes into columns of those the statement reads (bound as $<prefix><index>)


@dataclasses.dataclass
class _Generate:
    alias: str
    prefix: str
    prompt: _Value
    options: dict  # name -> _Value
    where: str | None


@dataclasses.dataclass
class _Read:
    sql: str  # what DuckDB runs, with named parameters
    sql_params: tuple  # the internal parameter names it reads
    recalls: list
    generates: list
    # the direct path: [(output column, bound list)] and (LIMIT, OFFSET) values, when the
    # statement only picks recall's columns in score order (see _direct)
    direct: list | None = None
    direct_limit: tuple | None = None


@dataclasses.dataclass
class _Plan:
    kind: str  # "read", "insert" or "delete"
    read: _Read  # the query (read), the source rows (insert) or the ids to forget (delete)
    explain: str | None  # None, "EXPLAIN" or "EXPLAIN ANALYZE"
    style: str | None  # "positional", "named" or None: how the user's parameters are bound
    user_params: dict  # internal name -> the user's key (list index or dict name)
    columns: list = dataclasses.field(default_factory=list)  # insert: the target columns
    source: str = ""  # insert: "VALUES" or "SELECT"


_CACHE = OrderedDict()
_CACHE_LOCK = threading.Lock()


def run(db, text, params=None):
    """Run one SQL statement on `db`; return Rows. The entry point of Database.sql()."""
    if not isinstance(text, str):
        raise InvalidInputError(f"a SQL statement must be a string, got {type(text).__name__}")
    if params is not None and not isinstance(params, (list, tuple, dict)):
        raise InvalidInputError(f"params must be a list (for ? and $1) or a dict (for $name), got {type(params).__name__}")
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
        return _insert(db, plan, values)
    if plan.kind == "delete":
        return _delete(db, plan, values)
    columns, rows, _ = _execute(db, plan.read, values)
    return Rows(columns, rows)


def _plan(db, text):
    columns = db.catalog.columns()
    key = (text, tuple(columns.items()))
    with _CACHE_LOCK:
        plan = _CACHE.get(key)
        if plan is not None:
            _CACHE.move_to_end(key)
            return plan
    plan = _Planner(db, text, columns).plan()
    with _CACHE_LOCK:
        _CACHE[key] = plan
        while len(_CACHE) > PLAN_CACHE_SIZE:
            _CACHE.popitem(last=False)
    return plan


# -- parsing and checking ---------------------------------------------------------------------------


def _split_explain(text):
    """(text with a leading EXPLAIN [ANALYZE] blanked out, "EXPLAIN"/"EXPLAIN ANALYZE"/None,
    the tokens of that text). Blanking (not cutting) keeps every line and column of the rest
    where the user wrote it. sqlglot reads EXPLAIN as an opaque command, so it is taken off here."""
    try:
        tokens = _DUCKDB.tokenize(text)
        if not tokens or tokens[0].text.upper() != "EXPLAIN":
            return text, None, tokens
        end = tokens[0].end + 1
        explain = "EXPLAIN"
        rest = _DUCKDB.tokenize(text[end:])  # (the tokenizer reads all after EXPLAIN as one string)
        if rest and rest[0].text.upper() in ("ANALYZE", "ANALYSE"):
            end += rest[0].end + 1
            explain = "EXPLAIN ANALYZE"
        body = "".join(c if c == "\n" else " " for c in text[:end]) + text[end:]
        return body, explain, _DUCKDB.tokenize(body)
    except TokenError as e:
        raise _syntax_error(e, text) from e


def _syntax_error(e, text):
    """A QueryError that says where the statement breaks and what was expected."""
    if isinstance(e, TokenError):
        return QueryError(
            "syntax error: the statement ends inside a string, a quoted identifier or a comment "
            f"(a ' \" or /* is not closed): {_excerpt(text)}"
        )
    info = (getattr(e, "errors", None) or [{}])[0]
    what = _readable(info.get("description") or str(e))
    line, col, highlight = info.get("line"), info.get("col"), info.get("highlight") or ""
    if not line:
        return QueryError(f"syntax error: {what}")
    col = max(1, col - len(highlight) + 1)
    return QueryError(f"syntax error at line {line}, column {col}: {what}\n{_pointer(text, line, col, len(highlight))}")


def _readable(description):
    """sqlglot's message with its token reprs turned into the text they stand for."""
    description = re.sub(r"<Token token_type: TokenType\.SENTINEL[^>]*>", "the end of the statement", description)
    description = re.sub(r"<Token token_type: TokenType\.\w+, text: (.*?), line: \d+[^>]*>", r"'\1'", description)
    description = re.sub(r"Required keyword: '(\w+)' missing for <class 'sqlglot\.expressions\.(?:\w+\.)*(\w+)'>",
                         r"incomplete \2 (its \1 is missing)", description)
    return description


def _pointer(text, line, col, width):
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return ""
    source = lines[line - 1].replace("\t", " ")
    return f"  {source}\n  {' ' * (col - 1)}{'^' * max(1, width)}"


def _excerpt(text, limit=80):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse(db, text):
    body, explain, tokens = _split_explain(text)
    try:
        trees = _Parser(dialect=_DUCKDB).parse(tokens, body)
    except SqlglotError as e:
        raise _syntax_error(e, body) from e
    except (ValueError, TypeError, AttributeError, IndexError, RecursionError) as e:
        # sqlglot itself failed on odd text: DuckDB's parser says where the text is wrong; if
        # DuckDB reads it, it is SQL sqlglot cannot read, and m3db cannot check or plan it
        _duckdb_parse(db, body)
        raise QueryError(f"m3db cannot read this statement (its SQL parser, sqlglot, failed: {e}); "
                         "write it another way, e.g. without unusual syntax") from e
    trees = [t for t in trees if t is not None]
    if not trees:
        raise QueryError("the statement is empty: write one SQL statement, e.g. SELECT count(*) FROM memories")
    if len(trees) > 1:
        raise QueryError(f"db.sql() runs one statement at a time, got {len(trees)}: run them one by one (the shell runs each)")
    # sqlglot accepts some text that DuckDB does not: DuckDB's own parser (it only parses here)
    # has the last word on syntax, with its position in the user's text
    _duckdb_parse(db, body)
    return trees[0], explain


def _duckdb_parse(db, text):
    try:
        db.catalog.con.extract_statements(text)
    except duckdb.Error as e:
        raise QueryError(str(e).strip()) from e


def _names(nodes):
    return ", ".join(nodes)


def _suggest(name, candidates):
    close = difflib.get_close_matches(name.lower(), candidates, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _function_name(fn):
    return (fn.name if isinstance(fn, exp.Anonymous) else fn.sql_name()).lower()


def _check(tree):
    """Refuse what must not run: files, the network, other databases, side effects."""
    for node in tree.walk():
        if isinstance(node, (exp.Describe, exp.Summarize)) and not isinstance(node.this, (exp.Table, exp.Query, exp.Subquery)):
            what = "SUMMARIZE" if isinstance(node, exp.Summarize) else "DESCRIBE"
            raise QueryError(f"{what} {node.this.sql(dialect='duckdb')}: {what} takes a catalog table or a query "
                             f"({what} memories, {what} SELECT ...), never a file or a URL")
        if isinstance(node, exp.Table) and not isinstance(node.this, exp.Func):
            _check_table(node)
        elif isinstance(node, exp.Func):
            name = _function_name(node)
            if isinstance(node.parent, (exp.Table, exp.Lateral)) and node.arg_key == "this":
                if isinstance(node.parent, exp.Lateral) and name in MEMORY_FUNCTIONS:
                    raise QueryError(f"{name}() cannot be LATERAL: its arguments are constants or parameters; "
                                     f"join its rows instead, e.g. FROM {name}('...') r JOIN documents d ON ...")
                if name not in MEMORY_FUNCTIONS + SAFE_TABLE_FUNCTIONS:
                    raise QueryError(
                        f"the table function {name}() is not available in m3db SQL{_suggest(name, MEMORY_FUNCTIONS + SAFE_TABLE_FUNCTIONS)}: "
                        "it reads only the catalog, never files, the network or settings. Table functions: "
                        f"{_names(MEMORY_FUNCTIONS + SAFE_TABLE_FUNCTIONS)}"
                    )
            elif name in MEMORY_FUNCTIONS:
                raise QueryError(f"{name}() is a table function: use it in FROM, e.g. SELECT * FROM {name}('...')"
                                 + (" r WHERE r.lang = 'en' ORDER BY r.score DESC" if name == "recall" else ""))
            elif name in DENIED_FUNCTIONS:
                raise QueryError(f"{name}() acts outside the query or reads the connection's settings, "
                                 "and is not available in m3db SQL")


def _check_table(node):
    name = node.name
    schema = node.text("db").lower()
    if node.args.get("catalog"):
        raise QueryError(f"{node.sql(dialect='duckdb')}: name catalog tables alone (memories, documents, ...)")
    if schema == "information_schema":
        if name.lower() in INFORMATION_SCHEMA_VIEWS:
            return
        raise QueryError(f"information_schema.{name} is not a view of information_schema{_suggest(name, INFORMATION_SCHEMA_VIEWS)}; "
                         f"its views: {_names(INFORMATION_SCHEMA_VIEWS)}")
    if not schema and _cte_visible(node):
        return
    if schema in ("", "main") and name.lower() in CATALOG_TABLES:
        return
    if any(c in name for c in "./\\:") or schema not in ("", "main"):
        raise QueryError(f"{name!r} is not a catalog table: m3db SQL reads only the catalog ({_names(CATALOG_TABLES)}), "
                         "never files, URLs or other databases")
    raise QueryError(
        f"unknown table {name!r}{_suggest(name, CATALOG_TABLES + MEMORY_FUNCTIONS)}. Tables: {_names(CATALOG_TABLES)}"
        f" (and information_schema); memory functions: recall(query, k => 5), generate(prompt, ...)"
    )


def _visible_cte(table):
    """The CTE that `table` (an unqualified name) names where it sits, or None. A WITH's CTEs
    are visible in its query (subqueries included) and each to the CTEs after it in the same
    WITH, and to itself under WITH RECURSIVE: DuckDB's rules. Any other name is not a CTE,
    whatever CTEs elsewhere in the statement are called, and DuckDB would look it up as a
    table or a file."""
    name = table.name.lower()
    child, node = table, table.parent
    while node is not None:
        if isinstance(node, exp.With):  # `child` is one of its CTEs
            for cte in node.expressions:
                if cte is child:
                    if node.args.get("recursive") and cte.alias_or_name.lower() == name:
                        return cte
                    break
                if cte.alias_or_name.lower() == name:
                    return cte
        else:
            with_ = node.args.get("with_")
            if with_ is not None and with_ is not child:
                for cte in with_.expressions:
                    if cte.alias_or_name.lower() == name:
                        return cte
        child, node = node, node.parent
    return None


def _cte_visible(table):
    return _visible_cte(table) is not None


# -- planning ------------------------------------------------------------------------------------


class _Planner:
    """Turns one statement into a _Plan: checks it, binds its parameters to internal names,
    plans its memory functions and writes the SQL DuckDB will run."""

    def __init__(self, db, text, columns):
        self.db, self.text = db, text
        self.columns = {name.lower(): (name, sql_type) for name, sql_type in columns.items()}
        self.user_params = {}
        self.style = None
        self.calls = 0
        self.explain = None

    def plan(self):
        tree, explain = _parse(self.db, self.text)
        self.explain = explain
        read = isinstance(tree, (exp.Query, exp.Values, exp.Describe, exp.Summarize, exp.Pivot)) or (
            isinstance(tree, exp.Show) and tree.name.upper() in ("TABLES", "ALL TABLES"))
        if read or isinstance(tree, (exp.Insert, exp.Delete)):
            _check(tree)
            self._rename_parameters(tree)
            if isinstance(tree, exp.Insert):
                return self._insert(tree, explain)
            if isinstance(tree, exp.Delete):
                return self._delete(tree, explain)
            return _Plan("read", self._read(tree), explain, self.style, self.user_params)
        kind = tree.key.upper() if not isinstance(tree, exp.Command) else tree.name.upper()
        if isinstance(tree, (exp.Update, exp.Create, exp.Drop, exp.Alter, exp.Merge, exp.TruncateTable)):
            raise QueryError(f"{kind} is not available in m3db SQL: it would change the catalog behind the engine's "
                             f"back. It runs {ALLOWED}; other changes go through the API (add, forget, compact)")
        raise QueryError(f"{kind} statements are not available in m3db SQL; it runs {ALLOWED}")

    # -- parameters: every placeholder becomes a named DuckDB parameter ($p1, $n_name)

    def _rename_parameters(self, tree):
        holders = list(tree.find_all(exp.Placeholder))
        positional = sorted((h for h in holders if h.this is None), key=lambda h: h.meta.get("position", 0))
        for i, h in enumerate(positional):
            h.set("this", f"{i + 1}")
        for h in holders:
            key = h.name
            if key.isdigit():
                style, internal, user = "positional", f"p{int(key)}", int(key) - 1
                if int(key) < 1:
                    raise QueryError(f"${key}: numbered parameters start at $1")
            else:
                style, internal, user = "named", f"n_{key}", key
            if self.style not in (None, style):
                raise QueryError("the statement mixes positional (?, $1) and named ($name) parameters: use one kind")
            self.style = style
            self.user_params[internal] = user
            h.set("this", internal)

    # -- reads

    def _read(self, tree):
        recalls, generates = [], []
        for table in list(tree.find_all(exp.Table)):
            fn = table.this
            if isinstance(fn, exp.Func) and _function_name(fn) == "recall":
                recalls.append(self._recall(table))
            elif isinstance(fn, exp.Func) and _function_name(fn) == "generate":
                generates.append(self._generate(table))
        sql = tree.sql(dialect="duckdb", copy=False)  # its last use: no copy
        read = _Read(sql, _placeholders(tree), recalls, generates)
        if len(recalls) == 1 and not generates:
            _direct(tree, read, self._value)
        return read

    def _arguments(self, fn, names):
        """{name: node} of a memory function call: positional arguments in `names` order,
        then `name => value` / `name := value`."""
        out = {}
        positional = True
        for i, arg in enumerate(fn.expressions):
            if isinstance(arg, (exp.Kwarg, exp.PropertyEQ)):
                positional = False
                name = arg.this.name.lower()
                if name not in names:
                    raise QueryError(f"{fn.name}() has no argument {name!r}{_suggest(name, names)}; its arguments: {_names(names)}")
                if name in out:
                    raise QueryError(f"{fn.name}(): {name} is given twice")
                out[name] = arg.expression
            else:
                if not positional:
                    raise QueryError(f"{fn.name}(): a positional argument follows a named one; name it ({names[min(i, len(names) - 1)]} => ...)")
                if i >= len(names):
                    raise QueryError(f"{fn.name}() takes at most {len(names)} arguments ({_names(names)}), got {len(fn.expressions)}")
                out[names[i]] = arg
        if names[0] not in out:
            raise QueryError(f"{fn.name}() needs its {names[0]}, e.g. {fn.name}('capital of France')")
        return out

    def _value(self, fn, name, node):
        if isinstance(node, exp.Literal):
            return _Value("const", node.this if node.is_string else _number(node.this))
        if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
            return _Value("const", -_number(node.this.this))
        if isinstance(node, exp.Boolean):
            return _Value("const", bool(node.this))
        if isinstance(node, exp.Null):
            return _Value("const", None)
        if isinstance(node, exp.Placeholder):
            return _Value("param", node.name)
        bad = node.find(exp.Column, exp.Query, exp.AggFunc, exp.Window, exp.Star)
        if bad is not None:
            raise QueryError(f"{fn.name}()'s {name} must be a constant or a parameter, not {bad.sql(dialect='duckdb')!r}: "
                             f"{fn.name}() runs once per statement, before the rows around it exist")
        return _Value("sql", node.sql(dialect="duckdb"), _placeholders(node))

    def _alias(self, table, name):
        alias = table.args.get("alias")
        if alias is not None and alias.columns:
            raise QueryError(f"{name}()'s columns cannot be renamed in its alias; rename them in the SELECT list (r.text AS t)")
        if alias is None:
            table.set("alias", exp.TableAlias(this=exp.to_identifier(name)))
        return table.alias

    def _recall(self, table):
        fn = table.this
        args = self._arguments(fn, RECALL_ARGS)
        alias = self._alias(table, "recall")
        query = self._value(fn, "query", args["query"])
        k = self._value(fn, "k", args["k"]) if "k" in args else None
        prefix = f"r{self.calls}_"
        self.calls += 1
        columns = self._recall_columns()
        select, limit = _enclosing_select(table)
        pushed, kept, filter_sql, filter_params = [], [], None, ()
        if select is not None and select.args.get("where") is not None:
            pushed, kept = self._pushdown(select, table, alias)
            if pushed:
                filter_sql = " AND ".join(f"({c.sql(dialect='duckdb', copy=False)})" for c in pushed)
                filter_params = tuple(sorted({p for c in pushed for p in _placeholders(c)}))
        if k is None and limit is not None:
            limit = (self._value(fn, "LIMIT", limit[0]), None if limit[1] is None else self._value(fn, "OFFSET", limit[1]))
        else:
            limit = None
        # bind only the columns the statement reads: every bound list costs DuckDB time
        used = _used_columns(select, table, alias)
        bound = [i for i, (name, _) in enumerate(columns) if used is None or i < 2 or name.lower() in used]
        table.replace(_relation(prefix, [(i, *columns[i]) for i in bound], alias))
        return _Recall(alias, prefix, query, k, limit, filter_sql, filter_params, kept, columns, bound)

    def _pushdown(self, select, table, alias):
        """Move the WHERE conditions that read only this recall's own columns into its filter.
        Returns (pushed conditions, [(kept condition, why)])."""
        joins = select.args.get("joins") or []
        outer = [j for j in joins if j.side or (j.kind or "").upper() not in ("", "INNER", "CROSS")]
        sources = self._source_columns(select)
        conditions = _conjuncts(select.args["where"].this)
        pushed, kept = [], []
        for c in conditions:
            why = self._why_not_pushable(c, alias, sources, outer)
            if why is None:
                pushed.append(c)
            elif why and self.explain:  # (written out only for EXPLAIN: sqlglot's writer is not free)
                kept.append((c.sql(dialect="duckdb"), why))
        if pushed:
            rest = [c for c in conditions if not any(c is p for p in pushed)]
            if rest:
                select.set("where", exp.Where(this=exp.and_(*rest, copy=False)))
            else:
                select.set("where", None)
            pushed = [self._as_filter(c, alias) for c in pushed]
        return pushed, kept

    def _why_not_pushable(self, condition, alias, sources, outer):
        """None if `condition` can be the recall's filter, "" if it is not about the recall,
        else why it stays a WHERE condition applied after the recall. A column is the recall's
        when qualified by its alias, or unqualified, one of its columns, and a column of no
        other source of the SELECT (SQL binds a name to the nearest source that has it)."""
        own = sources[alias.lower()]
        others = [columns for name, columns in sources.items() if name != alias.lower()]

        def mine(column):
            if column.table:
                return column.table.lower() == alias.lower()
            name = column.name.lower()
            return name in own and all(columns is not None and name not in columns for columns in others)

        columns = [c for c in condition.find_all(exp.Column) if not _inside_query(c, condition)]
        recall_columns = [c for c in columns if mine(c)]
        if not recall_columns:
            return ""
        if len(recall_columns) != len(columns) or any(c.args.get("db") for c in recall_columns):
            return "it also reads names that are not the recall's columns (another table's, a SELECT alias, an outer query's)"
        if outer:
            return "the recall is joined by an outer join, so WHERE applies after it"
        for c in recall_columns:
            if c.name.lower() == "score":
                return "score exists only after the search"
            if c.name.lower() not in own:
                return f"{c.name} is not a column of the recall"
        if any(isinstance(t.this, exp.Func) and _function_name(t.this) in MEMORY_FUNCTIONS for t in condition.find_all(exp.Table)):
            return "it holds a memory function"
        for q in condition.find_all(exp.Query):
            if any(c.table.lower() == alias.lower() for c in q.find_all(exp.Column)):
                return "a subquery in it refers to the recall"
        for q in condition.find_all(exp.Query):
            why = self._outside_reads(q) if q is condition or not _inside_query(q, condition) else None
            if why:
                return why
        if condition.find(exp.AggFunc, exp.Window):
            return "it aggregates"
        for fn in condition.find_all(exp.Func):
            if _function_name(fn) in VOLATILE_FUNCTIONS:
                return f"{_function_name(fn)}() changes between calls, and recall filters are cached per commit"
        return None

    def _outside_reads(self, query):
        """Why `query` (a subquery of a condition) may read something of the statement around
        it, which a recall filter (run alone over memories) does not have; None if it surely
        does not. Unqualified names are checked against the sources' columns; where a source's
        columns are not known here (a table function, SELECT *), the answer is 'it may'."""
        for table in query.find_all(exp.Table):
            cte = None if table.text("db") or isinstance(table.this, exp.Func) else _visible_cte(table)
            if cte is not None and not _within(cte, query):
                return f"a subquery in it reads the statement's CTE {cte.alias_or_name}"
        for column in query.find_all(exp.Column):
            if column.args.get("db") or not self._resolves_within(column, query):
                return f"a subquery in it may read {column.sql(dialect='duckdb')} from the query around it"
        return None

    def _resolves_within(self, column, top):
        node = column
        while node is not top and node.parent is not None:
            node = node.parent
            if not isinstance(node, exp.Select):
                continue
            sources = self._source_columns(node)
            if column.table:
                if column.table.lower() in sources:
                    return True
                continue
            name = column.name.lower()
            if any(columns is not None and name in columns for columns in sources.values()):
                return True
            if any(columns is None for columns in sources.values()):
                return False  # it may be a column of that source, or of one outside
        return False

    def _source_columns(self, select):
        """{qualifier: lower-case column names, or None where they are not known here} of the
        sources in the FROM and JOINs of `select`."""
        out = {}
        for holder in [select.args.get("from_"), *(select.args.get("joins") or [])]:
            if holder is None:
                continue
            source = holder.this
            alias = source.args.get("alias")
            columns = None
            if isinstance(alias, exp.TableAlias) and alias.columns:
                columns = {c.name.lower() for c in alias.columns}
            elif isinstance(source, exp.Table) and isinstance(source.this, exp.Func):
                name = _function_name(source.this)
                if name == "recall":
                    columns = {n.lower() for n, _ in self._recall_columns()}
                elif name == "generate":
                    columns = set(GENERATE_COLUMNS)
            elif isinstance(source, exp.Table):
                columns = self._table_columns(source)
            elif isinstance(source, exp.Subquery):
                columns = _output_names(source.this)
            out[source.alias_or_name.lower()] = columns
        return out

    def _table_columns(self, table):
        if table.args.get("catalog") or table.text("db").lower() not in ("", "main"):
            return None
        cte = None if table.text("db") else _visible_cte(table)
        if cte is not None:
            alias = cte.args.get("alias")
            if isinstance(alias, exp.TableAlias) and alias.columns:
                return {c.name.lower() for c in alias.columns}
            return _output_names(cte.this)
        name = table.name.lower()
        if name == "memories":
            return set(self.columns)
        return set(FIXED_TABLE_COLUMNS[name]) if name in FIXED_TABLE_COLUMNS else None

    def _recall_columns(self):
        """(name, DuckDB type) of a recall's relation: id, score, text, document_id and the
        metadata columns (a metadata column named score is hidden: score is the similarity)."""
        columns = [("id", "BIGINT"), ("score", "DOUBLE"), ("text", "VARCHAR"), ("document_id", "BIGINT")]
        return columns + [(name, sql_type) for low, (name, sql_type) in self.columns.items()
                          if low not in BUILTIN_COLUMNS and low != "score"]

    def _as_filter(self, condition, alias):
        """The condition as SQL over `memories`: the recall's qualifier dropped."""
        condition = condition.copy()
        for c in condition.find_all(exp.Column):
            if c.table.lower() == alias.lower() and not _inside_query(c, condition):
                c.set("table", None)
        return condition

    def _generate(self, table):
        fn = table.this
        args = self._arguments(fn, GENERATE_ARGS)
        alias = self._alias(table, "generate")
        prompt = self._value(fn, "prompt", args.pop("prompt"))
        where = None
        if "filter" in args:  # (DuckDB reserves `where`, even as an argument name)
            node = args.pop("filter")
            if not (isinstance(node, exp.Literal) and node.is_string):
                raise QueryError("generate()'s filter => must be SQL text written in the statement, e.g. "
                                 "filter => 'lang = ''en''' (a parameter is a value, never SQL)")
            where, _ = checked_filter(node.this, what="generate()'s filter =>", parameters=False)
        options = {name: self._value(fn, name, node) for name, node in args.items()}
        prefix = f"g{self.calls}_"
        self.calls += 1
        relation = sqlglot.parse_one(
            f"SELECT ${prefix}text::VARCHAR AS text, ${prefix}finish::VARCHAR AS finish_reason, "
            f"${prefix}mode::VARCHAR AS mode, ${prefix}sources::{SOURCE_TYPE} AS sources", dialect="duckdb")
        table.replace(exp.Subquery(this=relation, alias=exp.TableAlias(this=exp.to_identifier(alias))))
        return _Generate(alias, prefix, prompt, options, where)

    # -- writes

    def _insert(self, tree, explain):
        target = tree.this
        table = target.this if isinstance(target, exp.Schema) else target
        if not isinstance(table, exp.Table) or table.name.lower() != "documents" or table.text("db").lower() not in ("", "main"):
            name = table.sql(dialect="duckdb") if isinstance(table, exp.Expression) else str(table)
            hint = (" Memories are made from documents: INSERT INTO documents (text, source, title) VALUES (...); "
                    "precomputed memories go through db.add_memory()") if table.name.lower() == "memories" else ""
            raise QueryError(f"INSERT INTO {name} is not available: m3db SQL inserts only into documents.{hint}")
        for arg in ("conflict", "returning", "alternative", "overwrite", "ignore", "where", "partition"):
            if tree.args.get(arg):
                raise QueryError(f"INSERT INTO documents does not take {arg.upper().replace('_', ' ')}: "
                                 "write INSERT INTO documents (text, source, ...) VALUES (...) or SELECT ...")
        source = tree.expression
        if not isinstance(source, (exp.Query, exp.Values)):
            raise QueryError("INSERT INTO documents takes VALUES (...) or a SELECT")
        if tree.args.get("with_"):  # WITH ... INSERT: the CTEs belong to the source query
            source.set("with_", tree.args["with_"])
        if isinstance(target, exp.Schema):
            columns = [c.name for c in target.expressions]
        elif tree.args.get("by_name"):
            columns = None  # the source's column names
        else:
            raise QueryError("name the columns: INSERT INTO documents (text, source, title, uri, <metadata keys>) "
                             "VALUES (...), or INSERT INTO documents BY NAME SELECT ...")
        if columns is not None:
            _check_document_columns(columns)
            if isinstance(source, exp.Values):
                for row in source.expressions:
                    width = len(row.expressions) if isinstance(row, exp.Tuple) else 1
                    if width != len(columns):
                        raise QueryError(f"INSERT INTO documents names {len(columns)} columns ({_names(columns)}) "
                                         f"but a VALUES row has {width} values")
        kind = "VALUES" if isinstance(source, exp.Values) else "SELECT"
        if isinstance(source, exp.Values):
            source = exp.select("*").from_(exp.Subquery(this=source, alias=exp.TableAlias(this=exp.to_identifier("v"))))
        return _Plan("insert", self._read(source), explain, self.style, self.user_params, columns or [], kind)

    def _delete(self, tree, explain):
        table = tree.this
        if not isinstance(table, exp.Table) or table.name.lower() != "memories" or table.text("db").lower() not in ("", "main"):
            name = table.name if isinstance(table, exp.Table) else table.sql(dialect="duckdb")
            hint = (" To remove a document's memories: DELETE FROM memories WHERE document_id IN "
                    "(SELECT id FROM documents WHERE source = '...')") if name.lower() == "documents" else ""
            raise QueryError(f"DELETE FROM {name} is not available: m3db SQL deletes only from memories "
                             f"(they are forgotten, as db.forget does).{hint}")
        for arg in ("returning", "limit", "order", "cluster"):
            if tree.args.get(arg):
                raise QueryError(f"DELETE FROM memories does not take {arg.upper()}; write DELETE FROM memories [USING ...] WHERE ...")
        qualifier = table.alias_or_name
        select = exp.select(exp.column("id", table=qualifier)).from_(table.copy())
        for other in tree.args.get("using") or []:
            select = select.join(other.copy(), join_type="CROSS")
        if tree.args.get("where"):
            select.set("where", tree.args["where"].copy())
        if tree.args.get("with_"):
            select.set("with_", tree.args["with_"].copy())
        return _Plan("delete", self._read(select), explain, self.style, self.user_params)


_DOCUMENT_FIELDS = ("text", "source", "title", "uri", "metadata")


def _check_document_columns(columns):
    low = [c.lower() for c in columns]
    if len(set(low)) != len(low):
        raise QueryError(f"INSERT INTO documents names a column twice: {_names(columns)}")
    if "text" not in low:
        raise QueryError("INSERT INTO documents needs a text column: the document's text, which becomes memories")
    for name in ("id", "created_at"):
        if name in low:
            raise QueryError(f"INSERT INTO documents: {name} is assigned by m3db; leave it out")


def _number(text):
    try:
        return int(text)
    except ValueError:
        return float(text)


def _placeholders(node):
    return tuple(sorted({h.name for h in node.find_all(exp.Placeholder)}))


def _inside_query(node, top):
    """Is `node` inside a subquery of `top`?"""
    parent = node.parent
    while parent is not None and parent is not top:
        if isinstance(parent, exp.Query):
            return True
        parent = parent.parent
    return False


def _within(node, top):
    while node is not None:
        if node is top:
            return True
        node = node.parent
    return False


def _output_names(query):
    """Lower-case column names of a SELECT's rows, or None where they are not all named here
    (a star, an unnamed expression, a UNION)."""
    if not isinstance(query, exp.Select):
        return None
    names = [e.output_name for e in query.expressions]
    return {n.lower() for n in names} if all(n and n != "*" for n in names) else None


def _conjuncts(condition):
    if isinstance(condition, exp.And):
        return _conjuncts(condition.this) + _conjuncts(condition.expression)
    if isinstance(condition, exp.Paren) and isinstance(condition.this, exp.And):
        return _conjuncts(condition.this)
    return [condition]


def _enclosing_select(table):
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
    grouped = parent.args.get("group") or parent.args.get("distinct") or any(
        e.find(exp.AggFunc) for e in parent.expressions)
    limit, offset = parent.args.get("limit"), parent.args.get("offset")
    if not sole or grouped or not _simple_limit(limit, offset) or limit is None:
        return parent, None
    return parent, (limit.expression, offset.expression if offset is not None else None)


def _simple_limit(limit, offset):
    """Are LIMIT and OFFSET (either may be None) plain row counts: a constant or a parameter,
    no PERCENT, WITH TIES or FETCH? Only those say how many rows a recall must give."""
    simple = (exp.Literal, exp.Placeholder)
    if limit is not None and (not isinstance(limit, exp.Limit) or limit.args.get("limit_options") is not None
                              or limit.args.get("offset") is not None or limit.args.get("expressions")
                              or not isinstance(limit.expression, simple)):
        return False
    return offset is None or (isinstance(offset, exp.Offset) and isinstance(offset.expression, simple)
                              and not offset.args.get("expressions"))


def _used_columns(select, table, alias):
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


def _direct(tree, read, value):
    """Plan the direct path for the commonest memory query, which leaves DuckDB nothing to do
    but hand back rows it was given: SELECT <recall's columns, maybe renamed, or *> FROM
    recall(...) [ORDER BY score DESC] [LIMIT n [OFFSET m]], everything else pushed into the
    recall. recall() already returns them best first, so m3db returns them itself and saves a
    DuckDB round trip (about 0.5 ms, half a recall). DuckDB's column names are kept: the
    relation's name for a column, the alias when renamed. JSON columns go through DuckDB, which
    normalizes their text. tests/test_sql.py checks both paths give the same rows."""
    rc = read.recalls[0]
    if not isinstance(tree, exp.Select) or not isinstance((tree.args.get("from_") or exp.From()).this, exp.Subquery):
        return
    if tree.args["from_"].this.alias != rc.alias:
        return
    allowed = {"expressions", "from_", "order", "limit", "offset", "kind", "hint", "exclude", "operation_modifiers"}
    if any(v for k, v in tree.args.items() if k not in allowed) or tree.args.get("kind") or tree.args.get("exclude"):
        return
    bound = {rc.columns[i][0].lower(): (rc.columns[i][0], f"{rc.prefix}{i}", rc.columns[i][1]) for i in rc.bound}
    out = []
    for e in tree.expressions:
        name = None
        if isinstance(e, exp.Alias) and isinstance(e.this, exp.Column):
            name, e = e.alias, e.this
        if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)):
            if isinstance(e, exp.Column) and e.table.lower() != rc.alias.lower() or len(bound) != len(rc.columns) \
                    or e.args.get("except") or e.args.get("replace") or e.args.get("rename"):
                return
            out += [(n, key) for n, key, t in bound.values()]
            continue
        if not isinstance(e, exp.Column) or e.table.lower() not in ("", rc.alias.lower()) or e.args.get("db") \
                or not isinstance(e.this, exp.Identifier) or e.name.lower() not in bound:
            return
        column, key, _ = bound[e.name.lower()]
        out.append((name or column, key))
    if any(t == "JSON" for _, key, t in bound.values() if key in {k for _, k in out}):
        return
    order = tree.args.get("order")
    if order is not None:
        # score is never NULL, so where NULLs sort does not matter
        key = order.expressions[0].this if len(order.expressions) == 1 else None
        if not isinstance(key, exp.Column) or key.name.lower() != "score" or not order.expressions[0].args.get("desc") \
                or key.table.lower() not in ("", rc.alias.lower()):
            return
        if not key.table and any(n.lower() == "score" and k != f"{rc.prefix}1" for n, k in out):
            return  # ORDER BY score names the output column of that name, another one
    limit, offset = tree.args.get("limit"), tree.args.get("offset")
    if not _simple_limit(limit, offset):
        return
    read.direct = out
    read.direct_limit = (None if limit is None else value(None, "LIMIT", limit.expression),
                         None if offset is None else value(None, "OFFSET", offset.expression))


def _relation(prefix, columns, alias):
    """The rows of one recall as DuckDB sees them: bound lists, unnested side by side."""
    select = _unnest_lists(prefix, tuple(columns)).copy()
    return exp.Subquery(this=select, alias=exp.TableAlias(this=exp.to_identifier(alias)))


@functools.lru_cache(maxsize=256)
def _unnest_lists(prefix, columns):
    items = ", ".join(f"UNNEST(${prefix}{i}::{sql_type}[]) AS {exp.to_identifier(name, quoted=True).sql(dialect='duckdb')}"
                      for i, name, sql_type in columns)
    return sqlglot.parse_one(f"SELECT {items}", dialect="duckdb")


def checked_filter(text, *, what="the filter", parameters=True):
    """A recall filter (`db.recall(where=...)`, generate()'s `filter =>`), parsed and checked
    like a statement (catalog tables only: no files, network or side effects; no memory
    functions, since a filter runs inside a search) and written back by sqlglot: what runs is
    what was checked. Parameters (?, $name) are kept for binding, or refused when `parameters`
    is false. Returns (SQL text, volatile: whether it calls now(), random() and the like, whose
    result must not be cached). Raises QueryError."""
    try:
        condition = sqlglot.parse_one(text, dialect="duckdb", into=exp.Condition)
    except SqlglotError as e:
        raise QueryError(f"{what} {text!r} is not a SQL condition: {_readable(str(e).splitlines()[0])}") from e
    _check(exp.select("id").from_("memories").where(condition))
    for table in condition.find_all(exp.Table):
        if isinstance(table.this, exp.Func) and _function_name(table.this) in MEMORY_FUNCTIONS:
            name = _function_name(table.this)
            raise QueryError(f"{what} {text!r} calls {name}(): a filter is SQL over the columns of memories, run "
                             f"inside a search, and cannot call a memory function; use db.sql() for that, e.g. "
                             f"SELECT ... FROM recall(...) r WHERE r.id IN (SELECT id FROM {name}(...))")
    if not parameters and condition.find(exp.Placeholder):
        raise QueryError(f"{what} cannot hold parameters; write the values in it")
    volatile = any(_function_name(f) in VOLATILE_FUNCTIONS for f in condition.find_all(exp.Func))
    return condition.sql(dialect="duckdb"), volatile


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
            raise QueryError(f"the statement has {need} positional parameter{'s' if need != 1 else ''}, got {len(given)} value{'s' if len(given) != 1 else ''}")
        return {internal: given[user] for internal, user in wanted.items()}
    if not isinstance(given, dict):
        raise QueryError(f"the statement uses named parameters (${', $'.join(sorted(wanted.values()))}): pass params as a dict")
    missing = sorted(set(wanted.values()) - set(given))
    extra = sorted(map(str, set(given) - set(wanted.values())))
    if missing or extra:
        raise QueryError(f"parameters: missing {missing}, unexpected {extra}; the statement uses ${', $'.join(sorted(wanted.values()))}")
    return {internal: given[user] for internal, user in wanted.items()}


def _execute(db, read, values, *, explain=None):
    """Run the memory functions of `read`, then DuckDB; return (columns, rows, notes)."""
    notes = []
    for rc in read.recalls:
        notes.append(_run_recall(db, rc, values))
    for g in read.generates:
        notes.append(_run_generate(db, g, values, dry=explain is not None))
    if read.direct is not None and explain is None:
        rows = _direct_rows(db, read, values)
        if rows is not None:
            return [name for name, _ in read.direct], rows, notes
    sql = read.sql if explain is None else f"{explain} {read.sql}"
    columns, rows = _duckdb(db, sql, {name: values[name] for name in read.sql_params}, read)
    return columns, rows, notes


def _direct_rows(db, read, values):
    """The rows of a direct-path statement, or None when its LIMIT/OFFSET values are not plain
    non-negative integers (DuckDB then runs it, and says what is wrong with them)."""
    bounds = []
    for v in read.direct_limit:
        n = None if v is None else _evaluate(db, v, values)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            return None
        bounds.append(n)
    limit, offset = bounds
    rows = list(zip(*[values[key] for _, key in read.direct])) if read.direct else []
    start = offset or 0
    return rows[start:] if limit is None else rows[start:start + limit]


def _duckdb(db, sql, values, read=None):
    try:
        cursor = db.catalog.con.execute(sql, values)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
    except duckdb.Error as e:
        raise QueryError(_duckdb_message(e, read)) from e


def _duckdb_message(e, read):
    message = str(e).strip()
    if read is not None and (read.recalls or read.generates):
        # DuckDB quotes the statement as rewritten (recall's rows unnested from lists), which
        # is not what the user wrote: keep its words, drop its excerpt
        message = message.split("\n\nLINE ")[0]
        for rc in read.recalls:
            if f'"{rc.alias}" does not have a column' in message or f'"{rc.alias}.' in message:
                message += (f"\nrecall() {rc.alias} has the columns {_names(n for n, _ in rc.columns)}; "
                            f"JOIN memories m ON m.id = {rc.alias}.id for the others")
        for g in read.generates:
            if f'"{g.alias}" does not have a column' in message:
                message += f"\ngenerate() {g.alias} has the columns text, finish_reason, mode, sources"
    unknown = re.search(r"Function with name \"?(\w+)\"? does not exist", message)
    if unknown and difflib.get_close_matches(unknown.group(1).lower(), MEMORY_FUNCTIONS + ("similarity",), cutoff=0.6):
        message += "\n(the memory functions are table functions used in FROM: recall(query, k => 5), generate(prompt, ...))"
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
        if not query or not all(isinstance(x, (int, float, decimal.Decimal)) and not isinstance(x, bool) for x in query):
            raise InvalidInputError("recall()'s query must be a text or a vector (a list of numbers)")
        query = np.asarray(query, dtype=np.float32)
    elif not isinstance(query, (str, np.ndarray)):
        raise InvalidInputError(f"recall()'s query must be a text or a vector (a list of numbers), got {type(query).__name__} {query!r}")
    if rc.k is not None:
        k = _evaluate(db, rc.k, values)
    elif rc.limit is not None:
        limit = _evaluate(db, rc.limit[0], values)
        offset = 0 if rc.limit[1] is None else _evaluate(db, rc.limit[1], values)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (limit, offset)):
            raise InvalidInputError(f"LIMIT {limit!r} OFFSET {offset!r}: recall() takes its k from them, so they must be non-negative integers")
        k = limit + offset
        if k > MAX_K:
            raise InvalidInputError(f"recall() takes k from LIMIT + OFFSET = {k}, over the {MAX_K} maximum: pass k => explicitly")
    else:
        k = DEFAULT_K
    if rc.k is None and k == 0:  # LIMIT 0: nothing to search for
        matches, plan = [], {"strategy": "none", "reason": "LIMIT 0"}
    else:
        params = {p: values[p] for p in rc.filter_params} if rc.filter_params else None
        matches = db.recall(query, k=k, where=rc.filter, params=params)
        plan = matches.plan
    for i in rc.bound:
        name, sql_type = rc.columns[i]
        if i < 4:
            column = [getattr(m, name) for m in matches]
        else:
            column = [m.metadata.get(name) for m in matches]
            if sql_type == "JSON":
                column = [None if v is None else json.dumps(v) for v in column]
            elif sql_type == "DOUBLE":
                column = [None if v is None else float(v) for v in column]
        values[f"{rc.prefix}{i}"] = column
    return ("recall", rc, query, k, plan, len(matches))


def _run_generate(db, g, values, *, dry):
    prompt = _evaluate(db, g.prompt, values)
    if not isinstance(prompt, str):
        raise InvalidInputError(f"generate()'s prompt must be a text, got {type(prompt).__name__}")
    options = {name: _evaluate(db, v, values) for name, v in g.options.items()}
    kwargs = _generate_options(options)
    if dry:  # EXPLAIN: the decoder does not run
        text, finish, mode, sources = "", "", MODE_NAMES[kwargs["memory"]], []
    else:
        answer = db.generate(prompt, where=g.where, **kwargs)
        text, finish, mode = answer.text, answer.finish_reason, answer.mode
        sources = [{"id": s.id, "text": s.text, "document": s.document, "title": s.title} for s in answer.sources]
    values.update({f"{g.prefix}text": text, f"{g.prefix}finish": finish, f"{g.prefix}mode": mode, f"{g.prefix}sources": sources})
    return ("generate", g, prompt, kwargs)


def _generate_options(options):
    out = {"max_tokens": 128, "memory": True}
    memory = options.get("memory", True)
    modes = {"memory": True, "rag": "rag", "none": False, True: True, False: False}
    if isinstance(memory, (str, bool)) and (memory.lower() if isinstance(memory, str) else memory) in modes:
        out["memory"] = modes[memory.lower() if isinstance(memory, str) else memory]
    else:
        raise InvalidInputError(f"generate()'s memory must be 'memory', 'rag', 'none', true or false, got {memory!r}")
    for name, low, high in (("max_tokens", 1, MAX_GENERATE_TOKENS), ("k", 1, MAX_K), ("seed", 0, 2**63 - 1)):
        if name in options:
            v = options[name]
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                raise InvalidInputError(f"generate()'s {name} must be an integer in [{low}, {high}], got {v!r}")
            out[name] = v
    for name, low, high in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0)):
        if name in options:
            v = options[name]
            if isinstance(v, decimal.Decimal):
                v = float(v)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not low <= v <= high \
                    or (name == "top_p" and v == 0):
                raise InvalidInputError(f"generate()'s {name} must be a number in {'(0, 1]' if name == 'top_p' else '[0, 100]'}, got {v!r}")
            out[name] = float(v)
    return out


def _insert(db, plan, values):
    columns, rows, _ = _execute(db, plan.read, values)
    names = plan.columns or columns
    if plan.columns and len(columns) != len(plan.columns):
        raise QueryError(f"INSERT INTO documents names {len(plan.columns)} columns ({_names(plan.columns)}) "
                         f"but the SELECT gives {len(columns)}")
    if not plan.columns:
        _check_document_columns(names)
    documents = [_document(names, row, i) for i, row in enumerate(rows)]
    if not documents:
        return Rows(["documents_added", "documents_skipped", "documents_empty", "memories_added"], [(0, 0, 0, 0)])
    # one transaction: a statement adds all its documents or none
    with db.transaction():
        report = db.add_documents(documents, batch_size=len(documents), progress=False)
    return Rows(["documents_added", "documents_skipped", "documents_empty", "memories_added"],
                [(report.documents_added, report.documents_skipped, report.documents_empty, report.memories_added)])


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
                raise InvalidInputError(f"row {position + 1}: metadata must be a JSON object or a STRUCT, got {value!r}")
            doc["metadata"].update(value or {})
        elif low in _DOCUMENT_FIELDS:
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(f"row {position + 1}: {low} must be text, got {type(value).__name__} {value!r} (CAST it AS VARCHAR)")
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
        steps.append(("insert", f"documents from {plan.source}; each is chunked, embedded, encoded, and all are "
                                "committed in one transaction (add_documents). Nothing is written by EXPLAIN"))
    elif plan.kind == "delete":
        # counted from the recalls already run: EXPLAIN never runs the decoder nor searches twice
        if read.generates:
            which = "the memories the WHERE matches (not counted: it reads generate(), and EXPLAIN does not run the decoder)"
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
    if note[0] == "recall":
        _, rc, query, k, p, returned = note
        shown = repr(_excerpt(query, 60)) if isinstance(query, str) else f"a vector of {len(query)} numbers"
        lines = [f"query: {shown}, k = {k}"]
        if rc.filter:
            lines.append(f"filter (pushed down from WHERE): {rc.filter}")
            if "allowed" in p:
                lines.append(f"  allows {p['allowed']:,} of {p['total']:,} memories (selectivity {p['selectivity']:.2%})")
        else:
            lines.append(f"filter: none (all {p.get('total', 0):,} memories)")
        for condition, why in rc.kept:
            lines.append(f"after the recall (not pushed down): {condition} - {why}")
        lines.append(f"search: {_STRATEGIES.get(p.get('strategy'), p.get('strategy'))}"
                     + (f" ({p['reason']})" if p.get("reason") else ""))
        lines.append(f"candidates fetched: {p.get('candidates', 0):,}; returned: {returned}")
        return (f"recall {rc.alias}", "\n".join(lines))
    _, g, prompt, kwargs = note
    lines = [f"prompt: {_excerpt(prompt, 60)!r}", f"mode: {MODE_NAMES[kwargs['memory']]}, max_tokens: {kwargs['max_tokens']}, "
             f"k per 64-token chunk: {kwargs.get('k', 'the model default')}"]
    if g.where:
        total = len(db)
        allowed = _duckdb(db, f"SELECT count(*) FROM memories WHERE ({g.where})", {})[1][0][0]
        lines.append(f"filter: {g.where}\n  allows {allowed:,} of {total:,} memories"
                     + (f" (selectivity {allowed / total:.2%})" if total else ""))
    lines.append("recall: once per 64-token chunk of the prompt and of the answer, planned as above; "
                 "EXPLAIN does not run the decoder")
    return (f"generate {g.alias}", "\n".join(lines))

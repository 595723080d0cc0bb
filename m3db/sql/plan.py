"""The plan of a SQL statement: what m3db runs itself, and the SQL it hands DuckDB.

The planner turns one statement, parsed and checked by check.py, into a Plan.
Parameters are renamed to named DuckDB parameters ($p1, $n_name), always bound. Each recall()
is planned here: the WHERE conditions of its SELECT whose columns are all its own (id, text,
document_id, metadata; never score) become its filter (so k results come back after
filtering, as db.recall(where=...) does), and the call is replaced by bound lists, unnested
in its place; generate() by one row of bound values. INSERT INTO documents is planned as the
read of its source rows, DELETE FROM memories as the read of the ids to forget. The
commonest memory query (recall's columns in score order) also gets a direct path that leaves
DuckDB out (direct.py decides it).

This module owns the planner (its records are statement.py's); it runs nothing (run.py binds
and runs plans, and caches them). It imports check.py, statement.py, tree.py (its helpers over
sqlglot trees), direct.py (the direct path), storage's catalog names and the errors; never
run.py, the database, package, knowledge or cli, and never torch.
"""

import re

import sqlglot
from sqlglot import exp

from ..errors import QueryError
from ..storage.catalog import BUILTIN_COLUMNS
from .check import (
    ALLOWED,
    MEMORY_FUNCTIONS,
    VOLATILE_FUNCTIONS,
    check_document_columns,
    check_tree,
    checked_filter,
    did_you_mean,
    function_name,
    name_list,
    parse_statement,
    visible_cte,
)
from .direct import direct_path as _direct  # (the name tests/test_sql.py patches to turn the path off)
from .statement import (
    ALWAYS_BOUND,
    MATCH_COLUMNS,
    Generate,
    LimitOffset,
    Plan,
    Read,
    Recall,
    RecallColumn,
    Value,
)
from .tree import (
    conjuncts,
    enclosing_select,
    inside_query,
    number,
    output_names,
    placeholders,
    unnested_relation,
    used_columns,
    within,
)

# the columns of the catalog tables other than memories, fixed by the catalog format
# (catalog.Catalog.create); memories' columns come from the catalog, metadata included
FIXED_TABLE_COLUMNS = {
    "documents": ("id", "source", "title", "uri", "metadata", "created_at"),
    "meta": ("key", "value"),
    "forgotten": ("id", "commit_seq"),
    "codecs": ("name", "version", "params"),
}
GENERATE_COLUMNS = ("text", "finish_reason", "mode", "sources")
RECALL_ARGS = ("query", "k")
GENERATE_ARGS = ("prompt", "max_tokens", "memory", "k", "filter", "temperature", "top_p", "seed", "margin")
SOURCE_TYPE = "STRUCT(id BIGINT, text VARCHAR, document VARCHAR, title VARCHAR)[]"


# -- planning ------------------------------------------------------------------------------------


class Planner:
    """Turns one statement into a Plan: checks it, binds its parameters to internal names,
    plans its memory functions and writes the SQL DuckDB will run."""

    def __init__(self, db, text, columns):
        self.db, self.text = db, text
        self.columns = {name.lower(): (name, sql_type) for name, sql_type in columns.items()}
        self.user_params = {}
        self.style = None
        self.calls = 0
        self.explain = None

    def plan(self) -> Plan:
        tree, explain = parse_statement(self.db, self.text)
        self.explain = explain
        read = isinstance(tree, (exp.Query, exp.Values, exp.Describe, exp.Summarize, exp.Pivot)) or (
            isinstance(tree, exp.Show) and tree.name.upper() in ("TABLES", "ALL TABLES")
        )
        if read or isinstance(tree, (exp.Insert, exp.Delete)):
            check_tree(tree)
            self._rename_parameters(tree)
            if isinstance(tree, exp.Insert):
                return self._insert(tree, explain)
            if isinstance(tree, exp.Delete):
                return self._delete(tree, explain)
            return Plan("read", self._read(tree), explain, self.style, self.user_params)
        kind = _verb(self.text)  # as written: sqlglot names some statements oddly (CHECKPOINT as COLUMN)
        if isinstance(tree, (exp.Update, exp.Create, exp.Drop, exp.Alter, exp.Merge, exp.TruncateTable)):
            raise QueryError(
                f"{kind} is not available in m3db SQL: it would change the catalog behind the engine's "
                f"back. It runs {ALLOWED}; other changes go through the API (add, forget, compact)"
            )
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
            if isinstance(fn, exp.Func) and function_name(fn) == "recall":
                recalls.append(self._recall(table))
            elif isinstance(fn, exp.Func) and function_name(fn) == "generate":
                generates.append(self._generate(table))
        sql = tree.sql(dialect="duckdb", copy=False)  # its last use: no copy
        read = Read(sql, placeholders(tree), recalls, generates)
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
                    raise QueryError(
                        f"{fn.name}() has no argument {name!r}{did_you_mean(name, names)}; "
                        f"its arguments: {name_list(names)}"
                    )
                if name in out:
                    raise QueryError(f"{fn.name}(): {name} is given twice")
                out[name] = arg.expression
            else:
                if not positional:
                    raise QueryError(
                        f"{fn.name}(): a positional argument follows a named one; "
                        f"name it ({names[min(i, len(names) - 1)]} => ...)"
                    )
                if i >= len(names):
                    raise QueryError(
                        f"{fn.name}() takes at most {len(names)} arguments ({name_list(names)}), "
                        f"got {len(fn.expressions)}"
                    )
                out[names[i]] = arg
        if names[0] not in out:
            raise QueryError(f"{fn.name}() needs its {names[0]}, e.g. {fn.name}('capital of France')")
        return out

    def _value(self, fn, name, node):
        if isinstance(node, exp.Literal):
            return Value("const", node.this if node.is_string else number(node.this))
        if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
            return Value("const", -number(node.this.this))
        if isinstance(node, exp.Boolean):
            return Value("const", bool(node.this))
        if isinstance(node, exp.Null):
            return Value("const", None)
        if isinstance(node, exp.Placeholder):
            return Value("param", node.name)
        bad = node.find(exp.Column, exp.Query, exp.AggFunc, exp.Window, exp.Star)
        if bad is not None:
            raise QueryError(
                f"{fn.name}()'s {name} must be a constant or a parameter, "
                f"not {bad.sql(dialect='duckdb')!r}: "
                f"{fn.name}() runs once per statement, before the rows around it exist"
            )
        return Value("sql", node.sql(dialect="duckdb"), placeholders(node))

    def _alias(self, table, name):
        alias = table.args.get("alias")
        if alias is not None and alias.columns:
            raise QueryError(
                f"{name}()'s columns cannot be renamed in its alias; rename them in the SELECT list (r.text AS t)"
            )
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
        select, bounds = enclosing_select(table)
        pushed, kept, filter_sql, filter_params = [], [], None, ()
        if select is not None and select.args.get("where") is not None:
            pushed, kept = self._pushdown(select, table, alias)
            if pushed:
                filter_sql = " AND ".join(f"({c.sql(dialect='duckdb', copy=False)})" for c in pushed)
                filter_params = tuple(sorted({p for c in pushed for p in placeholders(c)}))
        limit = None
        if k is None and bounds is not None:
            limit_node, offset_node = bounds
            limit = LimitOffset(
                self._value(fn, "LIMIT", limit_node),
                None if offset_node is None else self._value(fn, "OFFSET", offset_node),
            )
        # bind only the columns the statement reads: every bound list costs DuckDB time
        used = used_columns(select, table, alias)
        bound = [i for i, c in enumerate(columns) if used is None or c.name in ALWAYS_BOUND or c.name.lower() in used]
        table.replace(unnested_relation(prefix, [(i, columns[i].name, columns[i].sql_type) for i in bound], alias))
        return Recall(alias, prefix, query, k, limit, filter_sql, filter_params, kept, columns, bound)

    def _pushdown(self, select, table, alias):
        """Move the WHERE conditions that read only this recall's own columns into its filter.
        Returns (pushed conditions, [(kept condition, why)])."""
        joins = select.args.get("joins") or []
        outer = [j for j in joins if j.side or (j.kind or "").upper() not in ("", "INNER", "CROSS")]
        sources = self._source_columns(select)
        conditions = conjuncts(select.args["where"].this)
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

        def mine(column) -> bool:
            if column.table:
                return column.table.lower() == alias.lower()
            name = column.name.lower()
            return name in own and all(columns is not None and name not in columns for columns in others)

        columns = [c for c in condition.find_all(exp.Column) if not inside_query(c, condition)]
        recall_columns = [c for c in columns if mine(c)]
        if not recall_columns:
            return ""
        if len(recall_columns) != len(columns) or any(c.args.get("db") for c in recall_columns):
            return (
                "it also reads names that are not the recall's columns "
                "(another table's, a SELECT alias, an outer query's)"
            )
        if outer:
            return "the recall is joined by an outer join, so WHERE applies after it"
        for c in recall_columns:
            if c.name.lower() == "score":
                return "score exists only after the search"
            if c.name.lower() not in own:
                return f"{c.name} is not a column of the recall"
        if any(
            isinstance(t.this, exp.Func) and function_name(t.this) in MEMORY_FUNCTIONS
            for t in condition.find_all(exp.Table)
        ):
            return "it holds a memory function"
        for q in condition.find_all(exp.Query):
            if any(c.table.lower() == alias.lower() for c in q.find_all(exp.Column)):
                return "a subquery in it refers to the recall"
        for q in condition.find_all(exp.Query):
            why = self._outside_reads(q) if q is condition or not inside_query(q, condition) else None
            if why:
                return why
        if condition.find(exp.AggFunc, exp.Window):
            return "it aggregates"
        for fn in condition.find_all(exp.Func):
            if function_name(fn) in VOLATILE_FUNCTIONS:
                return f"{function_name(fn)}() changes between calls, and recall filters are cached per commit"
        return None

    def _outside_reads(self, query):
        """Why `query` (a subquery of a condition) may read something of the statement around
        it, which a recall filter (run alone over memories) does not have; None if it surely
        does not. Unqualified names are checked against the sources' columns; where a source's
        columns are not known here (a table function, SELECT *), the answer is 'it may'."""
        for table in query.find_all(exp.Table):
            cte = None if table.text("db") or isinstance(table.this, exp.Func) else visible_cte(table)
            if cte is not None and not within(cte, query):
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
                name = function_name(source.this)
                if name == "recall":
                    columns = {c.name.lower() for c in self._recall_columns()}
                elif name == "generate":
                    columns = set(GENERATE_COLUMNS)
            elif isinstance(source, exp.Table):
                columns = self._table_columns(source)
            elif isinstance(source, exp.Subquery):
                columns = output_names(source.this)
            out[source.alias_or_name.lower()] = columns
        return out

    def _table_columns(self, table):
        if table.args.get("catalog") or table.text("db").lower() not in ("", "main"):
            return None
        cte = None if table.text("db") else visible_cte(table)
        if cte is not None:
            alias = cte.args.get("alias")
            if isinstance(alias, exp.TableAlias) and alias.columns:
                return {c.name.lower() for c in alias.columns}
            return output_names(cte.this)
        name = table.name.lower()
        if name == "memories":
            return set(self.columns)
        return set(FIXED_TABLE_COLUMNS[name]) if name in FIXED_TABLE_COLUMNS else None

    def _recall_columns(self):
        """The RecallColumns of a recall's relation: MATCH_COLUMNS, then the metadata columns
        (a metadata column named score is hidden: score is the similarity)."""
        return list(MATCH_COLUMNS) + [
            RecallColumn(name, sql_type)
            for low, (name, sql_type) in self.columns.items()
            if low not in BUILTIN_COLUMNS and low != "score"
        ]

    def _as_filter(self, condition, alias):
        """The condition as SQL over `memories`: the recall's qualifier dropped."""
        condition = condition.copy()
        for c in condition.find_all(exp.Column):
            if c.table.lower() == alias.lower() and not inside_query(c, condition):
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
                raise QueryError(
                    "generate()'s filter => must be SQL text written in the statement, e.g. "
                    "filter => 'lang = ''en''' (a parameter is a value, never SQL)"
                )
            where, _ = checked_filter(node.this, what="generate()'s filter =>", parameters=False)
        options = {name: self._value(fn, name, node) for name, node in args.items()}
        prefix = f"g{self.calls}_"
        self.calls += 1
        relation = sqlglot.parse_one(
            f"SELECT ${prefix}text::VARCHAR AS text, ${prefix}finish::VARCHAR AS finish_reason, "
            f"${prefix}mode::VARCHAR AS mode, ${prefix}sources::{SOURCE_TYPE} AS sources",
            dialect="duckdb",
        )
        table.replace(exp.Subquery(this=relation, alias=exp.TableAlias(this=exp.to_identifier(alias))))
        return Generate(alias, prefix, prompt, options, where)

    # -- writes

    def _insert(self, tree, explain):
        target = tree.this
        table = target.this if isinstance(target, exp.Schema) else target
        if (
            not isinstance(table, exp.Table)
            or table.name.lower() != "documents"
            or table.text("db").lower() not in ("", "main")
        ):
            name = table.sql(dialect="duckdb") if isinstance(table, exp.Expression) else str(table)
            hint = (
                (
                    " Memories are made from documents: INSERT INTO documents (text, source, title) VALUES (...); "
                    "precomputed memories go through db.add_memory()"
                )
                if table.name.lower() == "memories"
                else ""
            )
            raise QueryError(f"INSERT INTO {name} is not available: m3db SQL inserts only into documents.{hint}")
        for arg in ("conflict", "returning", "alternative", "overwrite", "ignore", "where", "partition"):
            if tree.args.get(arg):
                raise QueryError(
                    f"INSERT INTO documents does not take {arg.upper().replace('_', ' ')}: "
                    "write INSERT INTO documents (text, source, ...) VALUES (...) or SELECT ..."
                )
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
            raise QueryError(
                "name the columns: INSERT INTO documents (text, source, title, uri, <metadata keys>) "
                "VALUES (...), or INSERT INTO documents BY NAME SELECT ..."
            )
        if columns is not None:
            check_document_columns(columns)
            if isinstance(source, exp.Values):
                for row in source.expressions:
                    width = len(row.expressions) if isinstance(row, exp.Tuple) else 1
                    if width != len(columns):
                        raise QueryError(
                            f"INSERT INTO documents names {len(columns)} columns ({name_list(columns)}) "
                            f"but a VALUES row has {width} values"
                        )
        kind = "VALUES" if isinstance(source, exp.Values) else "SELECT"
        if isinstance(source, exp.Values):
            source = exp.select("*").from_(exp.Subquery(this=source, alias=exp.TableAlias(this=exp.to_identifier("v"))))
        return Plan("insert", self._read(source), explain, self.style, self.user_params, columns or [], kind)

    def _delete(self, tree, explain):
        table = tree.this
        if (
            not isinstance(table, exp.Table)
            or table.name.lower() != "memories"
            or table.text("db").lower() not in ("", "main")
        ):
            name = table.name if isinstance(table, exp.Table) else table.sql(dialect="duckdb")
            hint = (
                (
                    " To remove a document's memories: DELETE FROM memories WHERE document_id IN "
                    "(SELECT id FROM documents WHERE source = '...')"
                )
                if name.lower() == "documents"
                else ""
            )
            raise QueryError(
                f"DELETE FROM {name} is not available: m3db SQL deletes only from memories "
                f"(they are forgotten, as db.forget does).{hint}"
            )
        for arg in ("returning", "limit", "order", "cluster"):
            if tree.args.get(arg):
                raise QueryError(
                    f"DELETE FROM memories does not take {arg.upper()}; "
                    "write DELETE FROM memories [USING ...] WHERE ..."
                )
        _check_generate_subqueries(tree)
        qualifier = table.alias_or_name
        select = exp.select(exp.column("id", table=qualifier)).from_(table.copy())
        for other in tree.args.get("using") or []:
            select = select.join(other.copy(), join_type="CROSS")
        if tree.args.get("where"):
            select.set("where", tree.args["where"].copy())
        if tree.args.get("with_"):
            select.set("with_", tree.args["with_"].copy())
        return Plan("delete", self._read(select), explain, self.style, self.user_params)


def _verb(text) -> str:
    """The statement's verb as the user wrote it ("TRUNCATE", "CHECKPOINT"), past comments and
    EXPLAIN [ANALYZE]."""
    words = re.findall(r"[A-Za-z_]+", re.sub(r"--[^\n]*|/\*.*?\*/", " ", text, flags=re.S))
    while words and words[0].upper() in ("EXPLAIN", "ANALYZE"):
        words = words[1:]
    return words[0].upper() if words else "this"


def _check_generate_subqueries(tree) -> None:
    """In a DELETE, a subquery reading only generate() may name only generate()'s columns: any
    other (`WHERE id IN (SELECT id FROM generate(...))`) is the outer memories' column, as SQL
    correlates it, and matched every memory."""
    for select in tree.find_all(exp.Select):
        froms = [select.args.get("from_"), *(select.args.get("joins") or [])]
        sources = [f.this for f in froms if f is not None]  # a table function is a Table around its call
        calls = [s.this for s in sources if isinstance(s, exp.Table) and isinstance(s.this, exp.Func)]
        if not sources or len(calls) < len(sources) or any(function_name(c) != "generate" for c in calls):
            continue
        aliases = {s.alias.lower() for s in sources} | {"generate", ""}
        for column in select.find_all(exp.Column):
            if column.table.lower() in aliases and column.name.lower() not in GENERATE_COLUMNS:
                raise QueryError(
                    f"generate() has the columns {', '.join(GENERATE_COLUMNS)}, not {column.name}: in this DELETE, "
                    f"`{column.name}` would be memories.{column.name} (SQL reads it from the outer table) and match "
                    "every memory. Choose memories by their own columns or with recall()"
                )

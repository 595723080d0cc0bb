"""What may run in m3db SQL: a statement parsed, and refused where it must not run.

sqlglot parses a statement (DuckDB dialect; each `?` stamped with its place in the text; a
leading EXPLAIN [ANALYZE] blanked out) and DuckDB's own parser has the last word on syntax; a
syntax error says where the statement breaks and what was expected. The tree is then checked:
only catalog tables, information_schema views, CTEs where they are visible and a few table
functions that read no files (on top of the catalog's locked-down connection, not instead of
it); recall() and generate() only in FROM; no function that acts outside the query. Recall
filters (`db.recall(where=...)`, generate()'s `filter =>`) are checked the same way
(`checked_filter`). Text that cannot be UTF-8 (lone surrogates: bytes that were not UTF-8) is refused
first, with where it is (`require_utf8`).

This module owns the allowed and denied lists, parsing and the checks. It imports nothing of
m3db but its errors (the planner, plan.py, and the runner, run.py, import it), talks to DuckDB
only through the catalog's connection (`db.catalog.con`), and never imports torch.
"""

import difflib
import logging
import re
import threading

import duckdb
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import SqlglotError, TokenError
from sqlglot.tokens import Token, TokenType

from ..errors import QueryError
from ..storage.catalog import duckdb_unreadable

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
    "character_sets",
    "check_constraints",
    "columns",
    "constraint_column_usage",
    "constraint_table_usage",
    "key_column_usage",
    "referential_constraints",
    "schemata",
    "table_constraints",
    "tables",
    "views",
)
# a condition using one of these cannot be a recall filter: filters are cached per commit
VOLATILE_FUNCTIONS = frozenset(
    (
        "random",
        "rand",
        "uuid",
        "gen_random_uuid",
        "uuidv4",
        "uuidv7",
        "now",
        "current_timestamp",
        "current_date",
        "current_time",
        "get_current_time",
        "get_current_timestamp",
        "today",
        "localtimestamp",
        "localtime",
        "transaction_timestamp",
        "nextval",
        "currval",
    )
)
ALLOWED = (
    "SELECT (WITH, VALUES, FROM-first), DESCRIBE, SUMMARIZE, SHOW, PIVOT, EXPLAIN, "
    "INSERT INTO documents, DELETE FROM memories"
)

_DUCKDB = DuckDB()


class _QuietFallback(logging.Filter):
    """sqlglot logs a warning for each statement it reads as an opaque command (CALL, VACUUM,
    ...); m3db refuses those with its own error, so the warning would only repeat it."""

    def filter(self, record) -> bool:
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


# -- parsing and checking ---------------------------------------------------------------------------


def _tokenize(text) -> list:
    """DuckDB-dialect tokens of `text`. sqlglot reads `?::` as one token (another dialect's
    operator), so `SELECT ?::BIGINT` failed as a syntax error: in DuckDB it is a parameter and a
    cast, and is split back into the two tokens here."""
    tokens = []
    for t in _DUCKDB.tokenize(text):
        if t.token_type == TokenType.QDCOLON:
            # (col is the 1-based column of the token's last character, as sqlglot counts it)
            tokens.append(Token(TokenType.PLACEHOLDER, "?", t.line, t.col - 2, t.start, t.start, t.comments))
            tokens.append(Token(TokenType.DCOLON, "::", t.line, t.col, t.start + 1, t.end))
        else:
            tokens.append(t)
    return tokens


def _split_explain(text):
    """(text with a leading EXPLAIN [ANALYZE] blanked out, "EXPLAIN"/"EXPLAIN ANALYZE"/None,
    the tokens of that text). Blanking (not cutting) keeps every line and column of the rest
    where the user wrote it. sqlglot reads EXPLAIN as an opaque command, so it is taken off here."""
    try:
        tokens = _tokenize(text)
        if not tokens or tokens[0].text.upper() != "EXPLAIN":
            return text, None, tokens
        end = tokens[0].end + 1
        explain = "EXPLAIN"
        rest = _DUCKDB.tokenize(text[end:])  # (the tokenizer reads all after EXPLAIN as one string)
        if rest and rest[0].text.upper() in ("ANALYZE", "ANALYSE"):
            end += rest[0].end + 1
            explain = "EXPLAIN ANALYZE"
        body = "".join(c if c == "\n" else " " for c in text[:end]) + text[end:]
        return body, explain, _tokenize(body)
    except TokenError as e:
        raise _syntax_error(e, text) from e


def _syntax_error(e, text):
    """A QueryError that says where the statement breaks and what was expected."""
    if isinstance(e, TokenError):
        return QueryError(
            "syntax error: the statement ends inside a string, a quoted identifier or a comment "
            f"(a ' \" or /* is not closed): {excerpt(text)}"
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
    description = re.sub(
        r"Required keyword: '(\w+)' missing for <class 'sqlglot\.expressions\.(?:\w+\.)*(\w+)'>",
        r"incomplete \2 (its \1 is missing)",
        description,
    )
    return description


def _pointer(text, line, col, width):
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return ""
    source = lines[line - 1].replace("\t", " ")
    return f"  {source}\n  {' ' * (col - 1)}{'^' * max(1, width)}"


def excerpt(text, limit=80) -> str:
    """`text` on one line, cut to `limit` characters: a statement quoted in a message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def utf8_problem(text) -> str | None:
    """Why `text` cannot be written as UTF-8, or None when it can. Python carries bytes that were
    not UTF-8 (a command-line argument, surrogateescape input) as lone surrogates, which sqlglot
    and DuckDB refuse with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        line = text.count("\n", 0, e.start) + 1
        column = e.start - (text.rfind("\n", 0, e.start) + 1) + 1
        code = ord(text[e.start])
        what_is_there = (
            f"the byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        )
        try:  # the bytes as given, with those not UTF-8 shown as \xNN
            shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
        where = f"line {line}, column {column}" if "\n" in text else f"character {column}"
        return f"at {where}, {what_is_there} is not UTF-8 ({excerpt(shown)}); write it as UTF-8 text"
    return None


def require_utf8(text, what) -> None:
    """Refuse a statement or filter that is not UTF-8 text with a QueryError (utf8_problem)."""
    problem = utf8_problem(text) if isinstance(text, str) else None
    if problem:
        raise QueryError(f"{what} is not valid UTF-8 text: {problem}")


# parenthesis depth past which DuckDB's parser reads the text before sqlglot's: on text that is
# not SQL, sqlglot's parser backtracks at each level of parentheses, twice the time per level
# (fuzzing found it: 250 bytes of "(FROM r," ran for hours; valid text of any depth stays fast).
# DuckDB's parser is linear: what it refuses is refused at once with its message, and shallower
# text keeps sqlglot's messages, which point at the place.
DEEP = 8


def _depth(tokens) -> int:
    depth = deepest = 0
    for t in tokens:
        if t.token_type == TokenType.L_PAREN:
            depth += 1
            deepest = max(deepest, depth)
        elif t.token_type == TokenType.R_PAREN:
            depth -= 1
    return deepest


def parse_statement(db, text) -> tuple[exp.Expression, str | None]:
    """(the one statement in `text` as a sqlglot tree, "EXPLAIN"/"EXPLAIN ANALYZE"/None), or a
    QueryError that says where the text is wrong. Nothing is checked yet (check_tree)."""
    require_utf8(text, "the query")
    body, explain, tokens = _split_explain(text)
    parsed_by_duckdb = _depth(tokens) > DEEP
    if parsed_by_duckdb:
        _duckdb_parse(db, body)
    try:
        trees = _Parser(dialect=_DUCKDB).parse(tokens, body)
    except SqlglotError as e:
        raise _syntax_error(e, body) from e
    except (ValueError, TypeError, AttributeError, IndexError, RecursionError) as e:
        # sqlglot itself failed on odd text: DuckDB's parser says where the text is wrong; if
        # DuckDB reads it, it is SQL sqlglot cannot read, and m3db cannot check or plan it
        _duckdb_parse(db, body)
        raise QueryError(
            f"m3db cannot read this statement (its SQL parser, sqlglot, failed: {e}); "
            "write it another way, e.g. without unusual syntax"
        ) from e
    trees = [t for t in trees if t is not None]
    if not trees:
        raise QueryError("the statement is empty: write one SQL statement, e.g. SELECT count(*) FROM memories")
    if len(trees) > 1:
        raise QueryError(
            f"db.sql() runs one statement at a time, got {len(trees)}: run them one by one (the shell runs each)"
        )
    # sqlglot accepts some text that DuckDB does not: DuckDB's own parser (it only parses here)
    # has the last word on syntax, with its position in the user's text
    if not parsed_by_duckdb:
        _duckdb_parse(db, body)
    return trees[0], explain


def _duckdb_parse(db, text):
    try:
        db.catalog.con.extract_statements(text)
    except duckdb.Error as e:
        raise QueryError(duckdb_words(str(e).strip())) from e
    except UnicodeDecodeError as e:  # DuckDB's own error, its message unreadable
        raise QueryError(duckdb_unreadable(e)) from e


# an empty in-memory DuckDB, opened on first use, to parse filters with (a filter is checked
# without a database: the parse reads no table); one parse at a time, each microseconds
_PARSER_LOCK = threading.Lock()
_PARSER = []


def _duckdb_parse_condition(text, what):
    """DuckDB's parser on a filter (as the WHERE of a statement): a QueryError if it refuses it."""
    try:
        with _PARSER_LOCK:
            if not _PARSER:
                _PARSER.append(duckdb.connect())
            _PARSER[0].extract_statements(f"SELECT 1 WHERE {text}\n")  # the newline ends a trailing -- comment
    except duckdb.Error as e:
        if "expression depth" in str(e):  # as deep nesting reads from sqlglot (checked_filter)
            raise QueryError(f"{what} {excerpt(text)!r} nests too deeply to check; simplify its parentheses") from e
        raise QueryError(f"{what} {excerpt(text)!r} is not a SQL condition: {duckdb_words(str(e).strip())}") from e
    except UnicodeDecodeError as e:
        raise QueryError(duckdb_unreadable(e)) from e


def duckdb_words(message) -> str:
    """DuckDB's message, less its advice to SET a limit higher (m3db SQL runs no SET)."""
    return re.sub(r'\s*Use "SET \w+ TO x" to increase[^.]*\.', " Simplify the statement.", message)


def name_list(nodes) -> str:
    """Names as a message lists them: comma-separated."""
    return ", ".join(nodes)


def did_you_mean(name, candidates) -> str:
    """The hint ' (did you mean X?)' for a misspelt name, or '' when nothing is close."""
    close = difflib.get_close_matches(name.lower(), candidates, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def function_name(fn) -> str:
    """The lower-case name of a function call, as m3db's lists spell it."""
    return (fn.name if isinstance(fn, exp.Anonymous) else fn.sql_name()).lower()


def check_tree(tree) -> None:
    """Refuse what must not run: files, the network, other databases, side effects."""
    for node in tree.walk():
        if isinstance(node, (exp.Insert, exp.Update, exp.Delete, exp.Merge)) and node is not tree:
            # a write inside a WITH or a subquery would change catalog rows behind the engine's
            # back (no segments, no index, no forgotten log): only a statement's own write is planned
            raise QueryError(
                f"{node.key.upper()} inside a WITH clause or a subquery is not allowed: write with a statement of "
                "its own (INSERT INTO documents ..., DELETE FROM memories WHERE ...), which the engine plans"
            )
        if isinstance(node, (exp.Describe, exp.Summarize)) and not isinstance(
            node.this, (exp.Table, exp.Query, exp.Subquery)
        ):
            what = "SUMMARIZE" if isinstance(node, exp.Summarize) else "DESCRIBE"
            raise QueryError(
                f"{what} {node.this.sql(dialect='duckdb')}: {what} takes a catalog table or a query "
                f"({what} memories, {what} SELECT ...), never a file or a URL"
            )
        if isinstance(node, exp.Table) and not isinstance(node.this, exp.Func):
            _check_table(node)
        elif isinstance(node, exp.Func):
            name = function_name(node)
            if isinstance(node.parent, (exp.Table, exp.Lateral)) and node.arg_key == "this":
                if isinstance(node.parent, exp.Lateral) and name in MEMORY_FUNCTIONS:
                    raise QueryError(
                        f"{name}() cannot be LATERAL: its arguments are constants or parameters; "
                        f"join its rows instead, e.g. FROM {name}('...') r JOIN documents d ON ..."
                    )
                functions = MEMORY_FUNCTIONS + SAFE_TABLE_FUNCTIONS
                if name not in functions:
                    raise QueryError(
                        f"the table function {name}() is not available in m3db SQL{did_you_mean(name, functions)}: "
                        "it reads only the catalog, never files, the network or settings. Table functions: "
                        f"{name_list(functions)}"
                    )
            elif name in MEMORY_FUNCTIONS:
                raise QueryError(
                    f"{name}() is a table function: use it in FROM, e.g. SELECT * FROM {name}('...')"
                    + (" r WHERE r.lang = 'en' ORDER BY r.score DESC" if name == "recall" else "")
                )
            elif name in DENIED_FUNCTIONS:
                raise QueryError(
                    f"{name}() acts outside the query or reads the connection's settings, "
                    "and is not available in m3db SQL"
                )


def _check_table(node):
    name = node.name
    schema = node.text("db").lower()
    if node.args.get("catalog"):
        raise QueryError(f"{node.sql(dialect='duckdb')}: name catalog tables alone (memories, documents, ...)")
    if schema == "information_schema":
        if name.lower() in INFORMATION_SCHEMA_VIEWS:
            return
        raise QueryError(
            f"information_schema.{name} is not a view of information_schema"
            f"{did_you_mean(name, INFORMATION_SCHEMA_VIEWS)}; "
            f"its views: {name_list(INFORMATION_SCHEMA_VIEWS)}"
        )
    if not schema and _cte_visible(node):
        return
    if schema in ("", "main") and name.lower() in CATALOG_TABLES:
        return
    if any(c in name for c in "./\\:") or schema not in ("", "main"):
        raise QueryError(
            f"{name!r} is not a catalog table: m3db SQL reads only the catalog "
            f"({name_list(CATALOG_TABLES)}), never files, URLs or other databases"
        )
    raise QueryError(
        f"unknown table {name!r}{did_you_mean(name, CATALOG_TABLES + MEMORY_FUNCTIONS)}. "
        f"Tables: {name_list(CATALOG_TABLES)} (and information_schema); "
        "memory functions: recall(query, k => 5), generate(prompt, ...)"
    )


def visible_cte(table) -> exp.CTE | None:
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
    return visible_cte(table) is not None


def check_document_columns(columns) -> None:
    """Refuse INSERT INTO documents columns that repeat, lack text or name what m3db assigns."""
    low = [c.lower() for c in columns]
    if len(set(low)) != len(low):
        raise QueryError(f"INSERT INTO documents names a column twice: {name_list(columns)}")
    if "text" not in low:
        raise QueryError("INSERT INTO documents needs a text column: the document's text, which becomes memories")
    for name in ("id", "created_at"):
        if name in low:
            raise QueryError(f"INSERT INTO documents: {name} is assigned by m3db; leave it out")


def checked_filter(text, *, what="the filter", parameters=True) -> tuple[str, bool]:
    """See _checked_filter; deep nesting is a QueryError, not a RecursionError."""
    require_utf8(text, what)
    try:
        return _checked_filter(text, what=what, parameters=parameters)
    except RecursionError:
        # the parser, the checks and the writer recurse over the expression: deep nesting
        # exhausts the stack
        raise QueryError(f"{what} {excerpt(text)!r} nests too deeply to check; simplify its parentheses") from None


def _checked_filter(text, *, what, parameters) -> tuple[str, bool]:
    """A recall filter (`db.recall(where=...)`, generate()'s `filter =>`), parsed and checked
    like a statement (catalog tables only: no files, network or side effects; no memory
    functions, since a filter runs inside a search) and written back by sqlglot: what runs is
    what was checked. Parameters (?, $name) are kept for binding, or refused when `parameters`
    is false. Returns (SQL text, volatile: whether it calls now(), random() and the like, whose
    result must not be cached). Raises QueryError."""
    try:
        tokens = _tokenize(text)
    except TokenError as e:
        raise QueryError(f"{what} {text!r} is not a SQL condition: {_readable(str(e).splitlines()[0])}") from e
    if _depth(tokens) > DEEP:
        _duckdb_parse_condition(text, what)
    try:
        condition = _Parser(dialect=_DUCKDB).parse_into(exp.Condition, tokens, text)[0]
        if condition is None:  # only blanks or comments
            raise QueryError(f"{what} {text!r} is not a SQL condition: it holds no expression")
        check_tree(exp.select("id").from_("memories").where(condition))
    except SqlglotError as e:
        raise QueryError(f"{what} {text!r} is not a SQL condition: {_readable(str(e).splitlines()[0])}") from e
    except QueryError:
        raise  # check_tree's own (a QueryError is a ValueError too)
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        # sqlglot itself failed on odd text (a lambda with no parameter, `() => x`, is an
        # IndexError inside its parser), as parse_statement handles for a statement
        raise QueryError(
            f"{what} {excerpt(text)!r} cannot be read (m3db's SQL parser, sqlglot, failed: {e!r}); "
            "write it as a plain SQL condition, e.g. lang = 'en' AND year > 2000"
        ) from e
    for table in condition.find_all(exp.Table):
        if isinstance(table.this, exp.Func) and function_name(table.this) in MEMORY_FUNCTIONS:
            name = function_name(table.this)
            raise QueryError(
                f"{what} {text!r} calls {name}(): a filter is SQL over the columns of memories, run "
                f"inside a search, and cannot call a memory function; use db.sql() for that, e.g. "
                f"SELECT ... FROM recall(...) r WHERE r.id IN (SELECT id FROM {name}(...))"
            )
    if not parameters and condition.find(exp.Placeholder):
        raise QueryError(f"{what} cannot hold parameters; write the values in it")
    volatile = any(function_name(f) in VOLATILE_FUNCTIONS for f in condition.find_all(exp.Func))
    return condition.sql(dialect="duckdb"), volatile

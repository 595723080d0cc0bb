"""The interactive SQL shell: `m3db shell PATH`.

This module owns the read-eval-print loop: statements that span lines and end with `;`,
several statements on one line, dot-commands (.help, .tables, .schema, .quit), a table for
each result, and line editing with history in ~/.m3db_history (stdlib readline, when the
input is a terminal). Statements run through Database.sql(); nothing here parses SQL beyond
finding where a statement ends, with sqlglot's tokenizer, so a `;` inside a string or a
comment does not end one.
"""

import os
import sys

from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import TokenError
from sqlglot.tokens import TokenType

from ..errors import M3DBError
from .table import format_table

HISTORY_FILE = os.path.join("~", ".m3db_history")
HISTORY_LENGTH = 2000
PROMPT, CONTINUE = "m3db> ", "  ...> "
HELP = """\
Statements end with ';' and may span lines. Examples:
  SELECT lang, count(*) FROM memories GROUP BY lang;
  SELECT r.id, r.score, r.text FROM recall('capital of France', k => 3) r ORDER BY r.score DESC;
  EXPLAIN SELECT * FROM recall('capital of France') WHERE lang = 'en';
  SELECT text FROM generate('Where is Paris?', max_tokens => 32);
  INSERT INTO documents (text, source) VALUES ('Paris is in France.', 'notes/paris');   (needs --write)
  DELETE FROM memories WHERE lang = 'de';                                              (needs --write)
Commands:
  .tables            the catalog tables and their row counts
  .schema [TABLE]    the columns of a table (all tables without TABLE)
  .help              this text
  .quit  .exit       leave (so does Ctrl-D)
The language: docs/sql.md."""

_DUCKDB = DuckDB()


def split_statements(text) -> tuple[list[str], str]:
    """(complete statements, the rest): the statements that end with `;` in `text`, and what
    follows the last one. A `;` inside a string, quoted name or comment does not count; text
    that ends inside one is all 'rest' (the statement goes on on the next line)."""
    try:
        tokens = _DUCKDB.tokenize(text)
    except TokenError:
        return [], text
    statements, start = [], 0
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            piece = text[start : token.start].strip()
            if piece:
                statements.append(piece)
            start = token.end + 1
    return statements, text[start:]


def _has_tokens(text):
    try:
        return bool(_DUCKDB.tokenize(text))
    except TokenError:
        return True  # an unclosed string: db.sql() says so


class Shell:
    def __init__(self, db, *, stdin=None, stdout=None, stderr=None, interactive=None):
        self.db = db
        self.stdin, self.stdout, self.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.failed = False
        self.readline = None

    def run(self) -> int:
        """Read and run statements until .quit or the end of input. Returns the exit status:
        0, or 1 when input came from a pipe or file and a statement failed."""
        self._start_history()
        if self.stdin is sys.stdin and hasattr(self.stdin, "reconfigure"):
            # a byte that is not UTF-8 reaches db.sql() as a lone surrogate, which it refuses with a
            # clear error for that statement alone (strict decoding would end the shell)
            self.stdin.reconfigure(errors="surrogateescape")
        if self.interactive:
            mode = "read-only" if self.db.read_only else "read-write"
            self._print(
                f"m3db shell on {self.db.path} ({mode}, {len(self.db):,} memories). .help for help, .quit to leave."
            )
        buffer = ""
        try:
            while True:
                line = self._read(CONTINUE if buffer.strip() else PROMPT)
                if line is None:
                    break
                if not buffer.strip() and line.strip().startswith("."):
                    if not self._guarded(self._command, line.strip(), default=True):
                        break
                    continue
                buffer += line + "\n"
                statements, buffer = self._guarded(split_statements, buffer, default=([], ""))
                if statements:
                    self._guarded(self._remember, statements)
                for statement in statements:
                    self._execute(statement)
        finally:
            self._save_history()
        if self._guarded(_has_tokens, buffer, default=False):
            self._execute(buffer.strip())  # the input ended without a final ';' (or inside a string)
        return 1 if self.failed and not self.interactive else 0

    # -- input and history

    def _read(self, prompt):
        try:
            if self.interactive:
                return input(prompt)
            line = self.stdin.readline()
            return None if not line else line.rstrip("\n")
        except EOFError:
            if self.interactive:
                self._print("")
            return None
        except KeyboardInterrupt:  # Ctrl-C drops the statement being typed, not the shell
            self._print("^C")
            return ""

    def _start_history(self):
        if not self.interactive:
            return
        try:
            import readline
        except ImportError:  # some platforms have no readline: the shell works without history
            return
        self.readline = readline
        self.history = os.path.expanduser(os.environ.get("M3DB_HISTORY") or HISTORY_FILE)
        readline.set_history_length(HISTORY_LENGTH)
        try:
            readline.read_history_file(self.history)
        except OSError:
            pass  # no history yet

    def _remember(self, statements):
        """Keep a statement typed over several lines as one history entry."""
        if self.readline is None:
            return
        lines = sum(s.count("\n") + 1 for s in statements)
        if lines > 1:
            end = self.readline.get_current_history_length()
            for position in range(end - 1, max(end - lines, 0) - 1, -1):
                self.readline.remove_history_item(position)
            for s in statements:
                self.readline.add_history(" ".join(s.split()) + ";")

    def _save_history(self):
        if self.readline is None:
            return
        try:
            self.readline.write_history_file(self.history)
        except OSError as e:
            self._error(f"could not save the history to {self.history}: {e}")

    # -- running

    def _execute(self, statement):
        rows = self._guarded(self.db.sql, statement)
        if rows is not None:
            self._guarded(self._show, rows)

    def _guarded(self, fn, *args, default=None):
        """fn(*args), or `default` after printing the error: a failing line never ends the shell
        (only a closed output or Ctrl-C outside a prompt does)."""
        try:
            return fn(*args)
        except BrokenPipeError:
            raise
        except M3DBError as e:
            self._error(str(e))
        except Exception as e:  # m3db's own bug: said, and the next statement still runs
            self._error(f"{type(e).__name__}: {e} (an internal error; please report it)")
        return default

    def _show(self, rows):

        if getattr(rows, "explain", False):
            for step, text in rows:
                self._print(f"-- {step}\n{text.rstrip()}")
        else:
            self._print(format_table(rows.columns, rows))

    def _command(self, line):
        """Run a dot-command; False to leave the shell."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in (".quit", ".exit", ".q"):
            return False
        if name == ".help":
            self._print(HELP)
        elif name == ".tables":
            from ..sql.check import CATALOG_TABLES

            counts = [(t, self.db.sql(f'SELECT count(*) FROM "{t}"')[0][0]) for t in CATALOG_TABLES]
            self._show(_Listing(["table", "rows"], counts))
        elif name == ".schema":
            from ..sql.check import CATALOG_TABLES

            tables = [argument] if argument else list(CATALOG_TABLES)
            for table in tables:
                if table.lower() not in CATALOG_TABLES:
                    self._error(f"no table {table!r}; tables: {', '.join(CATALOG_TABLES)}")
                    continue
                rows = self.db.sql(f'DESCRIBE "{table.lower()}"')
                self._print(f"{table.lower()}: " + ", ".join(f"{r[0]} {r[1]}" for r in rows))
        else:
            self._error(f"unknown command {name!r}; commands: .tables, .schema [TABLE], .help, .quit")
        return True

    def _print(self, text):
        print(text, file=self.stdout, flush=True)

    def _error(self, text):
        self.failed = True
        print(f"error: {text}", file=self.stderr, flush=True)


class _Listing(list):
    def __init__(self, columns, rows):
        super().__init__(rows)
        self.columns = columns

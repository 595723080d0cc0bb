"""/v1/sql's statements, bounded: a time limit, a cap on the result, no generation.

One statement runs on the catalog's one DuckDB connection under the database's mutex, so an
unbounded one (`SELECT count(*) FROM range(10000000000000)`) would hold every other endpoint
that reads the database. Here each statement

- runs under a time limit (`Limits.sql_timeout`): a watcher thread interrupts DuckDB
  (`Catalog.interrupt`, DuckDB's `con.interrupt()`) when the limit passes, when the client
  disconnects, or when the server shuts down; the statement answers 400 `query_timeout`, 499
  or 503 `shutting_down`. The interrupt is only sent while this statement holds the database's
  mutex (so it can only stop this statement), and never inside a catalog transaction the engine
  opened (a write's commit is never cut in half: a write is stopped before or after it, and a
  stopped write rolls back whole);
- returns at most `Limits.sql_max_rows` rows (the runner fetches one more and the statement is
  refused when it comes, before the rest is read) and `Limits.sql_max_bytes` bytes of JSON:
  400 `result_too_large`, saying to add a LIMIT. An INSERT ... SELECT is capped the same way
  (the documents it adds: each is encoded); a DELETE is not (it forgets at most every memory);
- may not call generate(): generation belongs to /v1/chat/completions and /v1/completions,
  where max_tokens, k, the queue, the server's counters and cancellation apply. recall() stays.

The row cap is db.sql's own `max_rows` (it reads one row past the cap, then refuses). The
engine's catalog transactions are seen through a thin wrapper of the catalog's connection,
installed for the statement's duration under the mutex. Imports: the SQL checker (to parse a
statement as the engine does), m3db's errors, the server's errors.
"""

import base64
import contextlib
import datetime
import decimal
import json
import math
import threading
import uuid

import numpy as np
from sqlglot import exp

from m3db.errors import TooManyRowsError
from m3db.extend import function_name, parse_statement

from .errors import ApiError, bad_request

POLL = 0.05  # seconds between interrupts while a stopped statement has not ended yet


def jsonable(value):
    """A SQL value or metadata as JSON: arrays as lists, times as ISO text, bytes as base64,
    NaN and infinities as null (JSON has no such numbers)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, (decimal.Decimal, uuid.UUID, datetime.timedelta)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Statement:
    """One statement on its way: what may stop it (a reason) and whether it may be interrupted now."""

    def __init__(self):
        self.reason = None  # "timeout", "client_closed" or "shutting_down" once stopped
        self.catalogs = []  # the catalogs it runs on, while it runs
        self.interruptible = False  # True while it holds the mutex outside an engine transaction
        self.lock = threading.Lock()
        self.wake = threading.Event()  # set by stop(): the watcher interrupts at once
        self.done = threading.Event()

    def stop(self, reason: str) -> None:
        with self.lock:
            if self.reason is None:
                self.reason = reason
        self.wake.set()

    def finish(self) -> None:
        """The statement ended: the watcher stops."""
        self.done.set()
        self.wake.set()

    def allow(self, on: bool) -> None:
        with self.lock:
            self.interruptible = on

    def watch(self, timeout: float) -> None:
        """The watcher thread: stop the statement when its time is up, then interrupt DuckDB until
        it ends (an interrupt sent while Python code runs between two queries does nothing, so
        it is sent again)."""
        if not self.wake.wait(timeout):
            self.stop("timeout")
        # woken: stopped (a timeout, the client gone, shutdown), or ended (finish)
        while not self.done.is_set():
            with self.lock:
                if self.interruptible:
                    for catalog in self.catalogs:
                        catalog.interrupt()
            self.done.wait(POLL)


class WatchedConnection:
    """The catalog's connection while a statement runs: the engine's catalog transactions are
    marked so the watcher never interrupts them, and once a writing statement has committed,
    nothing interrupts it any more (it has written: it ends as it would). Everything else is
    the connection's own."""

    def __init__(self, con, statement: Statement, writes: bool = False):
        self._con, self._statement, self._writes = con, statement, writes

    def execute(self, query, *args, **kwargs):
        verb = query.strip().upper() if isinstance(query, str) else ""
        if verb == "BEGIN":  # an engine transaction (a write's commit): not to be interrupted
            self._statement.allow(False)
        try:
            return self._con.execute(query, *args, **kwargs)
        finally:
            if verb == "ROLLBACK" or (verb == "COMMIT" and not self._writes):
                self._statement.allow(True)

    def __getattr__(self, name):
        return getattr(self._con, name)


def too_many_rows(max_rows: int) -> ApiError:
    return bad_request(
        f"the statement gives more than {max_rows:,} rows, the most this server takes in one statement "
        f"(m3db serve --sql-max-rows): add a LIMIT (e.g. LIMIT {max_rows}, with OFFSET to page), or aggregate",
        "result_too_large",
        "query",
    )


def refuse_generate(tree) -> None:
    for node in tree.walk():
        if isinstance(node, exp.Func) and function_name(node) == "generate":
            raise bad_request(
                "generate() is not available in /v1/sql: generate with POST /v1/chat/completions (or "
                "/v1/completions), where max_tokens, k, the queue and cancellation apply, with the same "
                "memory modes (memory, rag, none) and where/params filters. recall() is available here",
                "unsupported_function",
                "query",
            )


class SqlRunner:
    """Runs /v1/sql's statements, and recall filters (`where`), with the limits above; `stop()`
    interrupts the running ones (shutdown). Its counters are reported by /v1/server."""

    def __init__(self, kb, limits):
        self.kb, self.limits = kb, limits
        self.lock = threading.Lock()
        self.running: set[Statement] = set()
        self.waiting = 0  # statements in run(): waiting for the database or running
        self.stopping = False
        self.counts = {
            "statements": 0,
            "filters": 0,
            "timed_out": 0,
            "cancelled": 0,
            "too_large": 0,
            "refused": 0,
            "queue_full": 0,
        }

    def stats(self) -> dict:
        with self.lock:
            return {**self.counts, "running": len(self.running), "waiting": self.waiting}

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def stop(self) -> None:
        """Refuse new statements and interrupt the running ones (answered 503 shutting_down)."""
        with self.lock:
            self.stopping = True
            running = list(self.running)
        for statement in running:
            statement.stop("shutting_down")

    def run(self, statement: Statement, query: str, params, package, *, may_write: bool = True) -> bytes:
        """The statement's answer as JSON bytes ({"columns", "rows"}), or an ApiError/M3DBError;
        a writing statement is a 403 unless `may_write` (the request's key may write this
        knowledge base). Runs in a worker thread."""
        kb = self.kb
        db = kb.database(package)
        writer = kb.write_lock if kb.writable else contextlib.nullcontext()
        with self.queued(), writer, db.mutex:
            if statement.reason is None and not self.stopping:
                tree, explain = parse_statement(db, query)  # as db.sql parses it; its errors are the engine's
                try:
                    refuse_generate(tree)
                except ApiError:
                    self.count("refused")
                    raise
                writes = explain is None and isinstance(tree, (exp.Insert, exp.Delete))
                if writes and not may_write:
                    raise ApiError(403, f"this API key may not write {kb.name!r}; it may read it", "permission_denied")
            else:
                writes = False  # refused by guarded() below
            with self.guarded(statement, [db], "statement", writes):
                try:
                    rows = db.sql(query, params, max_rows=self.limits.sql_max_rows)
                except TooManyRowsError:
                    self.count("too_large")
                    raise too_many_rows(self.limits.sql_max_rows) from None
        return self.encode(rows)

    @contextlib.contextmanager
    def queued(self):
        """A place among the statements waiting for the database or running: each may hold it up
        to the time limit, so a crowd of them would hold every endpoint that reads it for
        crowd x limit; past sql_max_queue a statement is refused at once (429, as generation is)."""
        with self.lock:
            if self.waiting >= self.limits.sql_max_queue:
                self.counts["queue_full"] += 1
                raise ApiError(
                    429,
                    f"the server is busy: {self.waiting} /v1/sql statements are waiting or running, at most "
                    f"{self.limits.sql_max_queue} (m3db serve --sql-max-queue); retry after a moment",
                    "queue_full",
                )
            self.waiting += 1
        try:
            yield
        finally:
            with self.lock:
                self.waiting -= 1

    def filtered(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), a read that runs a recall filter (`where`: SQL from the client),
        under the statement time limit. Runs in a worker thread."""
        kb = self.kb
        dbs = [kb.db.packages[name] for name in sorted(kb.packages)] if kb.packages else [kb.db]
        with contextlib.ExitStack() as held:
            for db in dbs:  # in one order: no other thread takes two of them
                held.enter_context(db.mutex)
            with self.guarded(Statement(), dbs, "filter"):
                return fn(*args, **kwargs)

    @contextlib.contextmanager
    def guarded(self, statement: Statement, dbs: list, what: str, writes: bool = False):
        """The body runs as `statement` on the catalogs of `dbs`, whose mutexes the caller holds:
        interrupted past the time limit, when stopped, or at shutdown."""
        if self.stopping:
            raise ApiError(503, "the server is shutting down", "shutting_down")
        if statement.reason is not None:  # the client left while the statement waited for the database
            raise self.stopped(statement, what)
        catalogs = [(db.catalog, db.catalog.con) for db in dbs]
        statement.catalogs = [catalog for catalog, _ in catalogs]
        with self.lock:
            self.running.add(statement)
            self.counts["statements" if what == "statement" else "filters"] += 1
        for catalog, con in catalogs:
            catalog.con = WatchedConnection(con, statement, writes)
        watcher = threading.Thread(
            target=statement.watch, args=(self.limits.sql_timeout,), name="m3db-sql-watch", daemon=True
        )
        statement.allow(True)
        watcher.start()
        try:
            yield
        except BaseException as e:
            if statement.reason is not None:
                raise self.stopped(statement, what) from e
            raise
        finally:
            statement.allow(False)  # before the mutexes are let go: no interrupt can reach another call
            statement.finish()
            for catalog, con in catalogs:
                catalog.con = con
            with self.lock:
                self.running.discard(statement)
            watcher.join()  # finish() woke it: on every path, not only a statement that succeeded

    def encode(self, rows) -> bytes:
        try:
            body = {"columns": list(rows.columns), "rows": [jsonable(list(r)) for r in rows]}
        except RecursionError:
            raise bad_request("the result nests lists deeper than the server can send; flatten it", "query") from None
        data = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        if len(data) > self.limits.sql_max_bytes:
            self.count("too_large")
            raise bad_request(
                f"the statement's result is {len(data):,} bytes of JSON, over the {self.limits.sql_max_bytes:,} this "
                "server sends (m3db serve --sql-max-bytes): select fewer columns or rows (a LIMIT), or aggregate",
                "result_too_large",
                "query",
            )
        return data

    def stopped(self, statement: Statement, what: str = "statement") -> ApiError:
        reason = statement.reason
        if reason == "timeout":
            self.count("timed_out")
            if what == "filter":
                return bad_request(
                    f"the where filter ran past the {self.limits.sql_timeout:g} s limit and was stopped: make it "
                    "cheaper (plain conditions on the columns of memories), or ask the server's operator for a "
                    "longer m3db serve --sql-timeout",
                    "query_timeout",
                    "where",
                )
            return bad_request(
                f"the statement ran past the {self.limits.sql_timeout:g} s limit and was stopped (a statement that "
                "writes is rolled back whole): narrow it (a WHERE, a LIMIT), or ask the server's operator for a "
                "longer m3db serve --sql-timeout",
                "query_timeout",
                "query",
            )
        self.count("cancelled")
        if reason == "shutting_down":
            return ApiError(503, f"the server is shutting down; the {what} was stopped", "shutting_down")
        return ApiError(499, f"the client closed the connection; the {what} was stopped", "client_closed")

"""The catalog: the DuckDB database that says which memories exist and where their bytes are.

Only this module talks to DuckDB. Tables (users may read them with plain SQL):
- `meta(key, value)`: format version, the memory spec (JSON), the commit sequence number,
  the next free memory id;
- `documents(id, source, title, uri, metadata, created_at)`;
- `memories(id, document_id, ordinal, char_start, char_end, text, token_count, embedding,
  segment, offset, length, checksum, codec, commit_seq, created_at, <user metadata columns>)`:
  the text and embedding are kept so the index can be rebuilt and memories re-encoded;
  char_start/char_end are the reference's span in its document's text; codec 'cold' marks a
  memory stored as text only, encoded the first time it is read (m3db.knowledge.warm); user metadata
  keys become typed columns, so filters like `lang = 'en' AND year > 2000` run at columnar
  speed;
- `forgotten(id, commit_seq)`: tombstones, so the index can catch up with deletions;
- `codecs(name, version, params)`: parameters of trained codecs (msgpack).

Memory ids are unique by the engine's rule (checked on add and by `check()`), not by a
DuckDB key: an ART key slows bulk inserts and m3db already holds an id map in memory.

DuckDB reports an operating system's failure (a full disk, a file-size limit, a permission, a
read-only mount) as text in IOException (connect, a statement's own writes),
TransactionException (COMMIT: "Failed to commit: Could not write file ...") and FatalException
(CHECKPOINT, which also invalidates the database until it is reopened). This module is where
they enter m3db: each method that writes turns them into StorageError (`storage_failure`),
and `damaged` does for a read; any other DuckDB error is left to the caller (a damaged file,
a query).
"""

import contextlib
import functools
import json
import re
from collections.abc import Iterator

import duckdb
import numpy as np

from ..errors import FormatError, InvalidInputError, LockedError, M3DBError, QueryError, ReadOnlyError, storage_error
from .durable import os_error

# what a metadata value may be (values.py); importers take these names from the catalog too
from .values import MAX_JSON_DEPTH as MAX_JSON_DEPTH
from .values import check_json_value as check_json_value
from .values import check_text as check_text
from .values import metadata_sql_type as metadata_sql_type

CATALOG_VERSION = 2  # 2: char_start, char_end

BUILTIN_COLUMNS = (
    "id",
    "document_id",
    "ordinal",
    "char_start",
    "char_end",
    "text",
    "token_count",
    "embedding",
    "segment",
    "offset",
    "length",
    "checksum",
    "codec",
    "commit_seq",
    "created_at",
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# metadata value type -> DuckDB column type
_SQL_TYPES = {bool: "BOOLEAN", int: "BIGINT", float: "DOUBLE", str: "VARCHAR", "json": "JSON"}
_READ_STATEMENTS = {"SELECT", "EXPLAIN"}
# The catalog connection runs users' SQL (db.sql, recall filters): DuckDB itself refuses files,
# URLs, other databases and extension downloads, and no statement may change that. The SQL
# checks in m3db.sql.check come on top of this, not instead of it.
LOCKED_DOWN = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    # no progress bar: a long statement would draw one on the process's terminal or log
    # (a server's log). DuckDB takes it per connection, not in the connect config: it is SET
    # right after connecting, before the configuration is locked
    "enable_progress_bar": False,
    "lock_configuration": True,
}
# the LOCKED_DOWN settings DuckDB refuses in duckdb.connect(config=...) ("not a global option")
_SESSION_SETTINGS = ("enable_progress_bar",)


# what DuckDB raises; the layers above catch it by this name (only this module imports duckdb)
CATALOG_ERRORS = (duckdb.Error,)
REPAIR_HINT = (
    ". If the file is damaged, rebuild it from the segments with `m3db check --repair` (the damaged file is "
    "kept aside), or restore catalog.duckdb from a backup"
)


def damaged(path, e) -> M3DBError:
    """A DuckDB failure on m3db's own queries: the catalog file is damaged (its blocks carry
    checksums, so a flipped byte fails a read rather than giving a wrong row), a FormatError;
    unless DuckDB reports an operating system's failure (a StorageError: the file may be whole)."""
    failure = storage_failure(e, "using the catalog")
    if failure is not None:
        return failure
    return FormatError(
        f"the catalog {path!r} cannot be read ({_first_line(e)}): the file is damaged. Nothing was changed; "
        "rebuild it from the segments with `m3db check --repair` (the damaged file is kept aside), or restore "
        "catalog.duckdb from a backup"
    )


_FILE_IN_MESSAGE = re.compile(r'file "([^"]+)"')
_INVALIDATED = "database has been invalidated"


def storage_failure(e, what) -> M3DBError | None:
    """The StorageError for a DuckDB error that reports an operating system's failure (its text
    ends with the strerror: 'Could not write file "...": No space left on device'), or None.
    After a FatalException DuckDB refuses every statement until the database is reopened: the
    error says so."""
    text = str(e).strip()
    found = os_error(text, None)
    if found is None:
        return None
    name = _FILE_IN_MESSAGE.findall(text)
    found.filename = name[-1] if name else None
    if _INVALIDATED in text:
        what = f"{what} (DuckDB stopped this catalog after an earlier write failed: reopen the database)"
    elif isinstance(e, duckdb.FatalException):
        what = f"{what} (DuckDB stopped this catalog: reopen the database)"
    return storage_error(found, what)


@contextlib.contextmanager
def _registered(con, name, data):
    """`data` registered as the view `name` for the block. A statement that fails inside a
    transaction aborts it, and DuckDB then refuses the unregister too: that error must not
    replace the statement's (a full disk's IOException became 'Current transaction is
    aborted')."""
    con.register(name, data)
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.unregister(name)
        raise
    con.unregister(name)


def _writes(what):
    """Method decorator: DuckDB's reports of an operating system's failure raise StorageError."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except duckdb.Error as e:
                failure = storage_failure(e, what)
                if failure is None:
                    raise
                raise failure from e

        return wrapper

    return decorate


def check_metadata_key(key) -> None:
    if not isinstance(key, str) or not _IDENT.fullmatch(key):  # match's $ also matches before a final newline
        raise InvalidInputError(
            f"metadata key {key!r} is not a plain identifier (letters, digits, _; not starting with a digit)"
        )
    if key.lower() in BUILTIN_COLUMNS:
        raise InvalidInputError(
            f"metadata key {key!r} collides with a built-in column of `memories` ({', '.join(BUILTIN_COLUMNS)}); "
            "rename it"
        )


class Catalog:
    def __init__(self, path, *, read_only=False):
        self.read_only = read_only
        try:
            self.con = _locked_down(duckdb.connect(path, read_only=read_only, config=_connect_config()))
        except duckdb.IOException as e:
            msg = str(e)
            if "lock" in msg.lower():
                raise LockedError(
                    f"the catalog {path!r} is open in another process ({msg.splitlines()[0]}). DuckDB allows one "
                    "writing process, or many read_only=True processes, never both"
                ) from e
            failure = storage_failure(e, "opening the catalog")  # a permission, a read-only mount, a full disk
            if failure is not None:
                raise failure from e
            raise FormatError(f"cannot open the catalog {path!r}: {msg}{REPAIR_HINT}") from e
        except duckdb.Error as e:
            failure = storage_failure(e, "opening the catalog")
            if failure is not None:
                raise failure from e
            raise FormatError(f"cannot open the catalog {path!r}: {e}{REPAIR_HINT}") from e
        self.path = path
        self._columns = None

    # -- schema ----------------------------------------------------------------------------

    def is_new(self) -> bool:
        return not self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
        ).fetchone()[0]

    @_writes("creating the catalog")
    def create(self, spec_json, embedding_dim) -> None:
        c = self.con
        c.execute("BEGIN")
        c.execute("CREATE TABLE meta(key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
        c.execute(
            "CREATE TABLE documents(id BIGINT PRIMARY KEY, source VARCHAR NOT NULL UNIQUE, title VARCHAR, "
            "uri VARCHAR, metadata JSON, created_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
        )
        c.execute(
            f"""CREATE TABLE memories(
                id BIGINT NOT NULL, document_id BIGINT, ordinal INTEGER, char_start INTEGER, char_end INTEGER,
                text VARCHAR NOT NULL,
                token_count INTEGER, embedding FLOAT[{int(embedding_dim)}] NOT NULL,
                segment INTEGER NOT NULL, "offset" BIGINT NOT NULL, length INTEGER NOT NULL,
                checksum UBIGINT NOT NULL, codec VARCHAR NOT NULL, commit_seq BIGINT NOT NULL,
                created_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"""
        )
        c.execute("CREATE TABLE forgotten(id BIGINT NOT NULL, commit_seq BIGINT NOT NULL)")
        c.execute("CREATE TABLE codecs(name VARCHAR, version INTEGER, params BLOB, PRIMARY KEY (name, version))")
        for key, value in (("format_version", CATALOG_VERSION), ("spec", spec_json), ("commit_seq", 0), ("next_id", 0)):
            c.execute("INSERT INTO meta VALUES (?, ?)", [key, str(value)])
        c.execute("COMMIT")

    def meta(self) -> dict[str, str]:
        try:
            rows = dict(self.con.execute("SELECT key, value FROM meta").fetchall())
        except duckdb.Error as e:
            raise FormatError(f"the catalog has no readable `meta` table; it is not an m3db database ({e})") from e
        version = int(rows.get("format_version", -1))
        if version != CATALOG_VERSION:
            raise FormatError(
                f"catalog format version {version}; this m3db reads version {CATALOG_VERSION}"
                + (": rebuild the knowledge base with this version (m3db build)" if version < CATALOG_VERSION else "")
            )
        return rows

    @_writes("writing the catalog")
    def set_meta(self, key, value) -> None:
        self.con.execute("UPDATE meta SET value = ? WHERE key = ?", [str(value), key])

    def columns(self) -> dict[str, str]:
        """{column name: DuckDB type} of `memories` (built-in and metadata columns)."""
        if self._columns is None:
            rows = self.con.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'memories' ORDER "
                "BY ordinal_position"
            ).fetchall()
            self._columns = dict(rows)
        return self._columns

    def metadata_columns(self) -> dict[str, str]:
        return {k: v for k, v in self.columns().items() if k not in BUILTIN_COLUMNS}

    @_writes("adding a metadata column to the catalog")
    def add_metadata_column(self, key, sql_type) -> None:
        self.con.execute(f'ALTER TABLE memories ADD COLUMN "{key}" {sql_type}')
        self._columns = None

    # -- transactions ----------------------------------------------------------------------

    @_writes("starting a catalog transaction")
    def begin(self) -> None:
        self.require_writable()
        self.con.execute("BEGIN")

    @_writes("committing to the catalog")
    def commit(self) -> None:
        self.con.execute("COMMIT")

    def rollback(self) -> None:
        """Roll back the open transaction; never raises (it runs while another error is on its
        way out): after a failed COMMIT DuckDB has no transaction open, and after a
        FatalException it refuses every statement (nothing uncommitted survives either)."""
        try:
            self.con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # nothing was open, or DuckDB invalidated the database
        self._columns = None  # an ALTER may have been rolled back

    def require_writable(self) -> None:
        """Raise ReadOnlyError unless this catalog may be written."""
        if self.read_only:
            raise ReadOnlyError("the database was opened with read_only=True; open it without read_only to write")

    # -- writing (inside begin/commit) -----------------------------------------------------

    @_writes("writing memories to the catalog")
    def insert_memories(self, batch) -> None:
        """batch: {column: numpy array or object array}; built-in columns plus metadata columns."""
        names = list(batch)
        cols = ", ".join(f'"{n}"' for n in names)
        select = ", ".join(
            f'"{n}"::FLOAT[]' if n == "embedding" else (f'"{n}"::JSON' if self.columns().get(n) == "JSON" else f'"{n}"')
            for n in names
        )
        with _registered(self.con, "_m3db_batch", batch):
            self.con.execute(f"INSERT INTO memories ({cols}) SELECT {select} FROM _m3db_batch")

    @_writes("writing the catalog")
    def delete_memories(self, ids, commit_seq) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        batch = {"id": ids, "commit_seq": np.full(len(ids), commit_seq, dtype=np.int64)}
        with _registered(self.con, "_m3db_forget", batch):
            self.con.execute("DELETE FROM memories WHERE id IN (SELECT id FROM _m3db_forget)")
            self.con.execute("INSERT INTO forgotten SELECT id, commit_seq FROM _m3db_forget")

    @_writes("writing the catalog")
    def move_memories(self, ids, segments, offsets) -> None:
        batch = {
            "id": np.asarray(ids, np.int64),
            "segment": np.asarray(segments, np.int32),
            "offset": np.asarray(offsets, np.int64),
        }
        with _registered(self.con, "_m3db_move", batch):
            self.con.execute(
                'UPDATE memories SET segment = b.segment, "offset" = b."offset" FROM _m3db_move b WHERE '
                "memories.id = b.id"
            )

    @_writes("writing the catalog")
    def relocate_memories(self, ids, segments, offsets, lengths, checksums, codec) -> None:
        """Point memories at new records (a cold memory's first encoding)."""
        batch = {
            "id": np.asarray(ids, np.int64),
            "segment": np.asarray(segments, np.int32),
            "offset": np.asarray(offsets, np.int64),
            "length": np.asarray(lengths, np.int32),
            "checksum": np.asarray(checksums, np.uint64),
        }
        with _registered(self.con, "_m3db_relocate", batch):
            self.con.execute(
                'UPDATE memories SET segment = b.segment, "offset" = b."offset", length = b.length, '
                "checksum = b.checksum, codec = ? FROM _m3db_relocate b WHERE memories.id = b.id",
                [codec],
            )

    @_writes("writing the catalog")
    def rewrite_memories(self, batch) -> None:
        """Point memories at records of another model (a re-encode): batch {id, segment, offset,
        length, checksum, codec, token_count} arrays, plus `embedding` rows when re-embedded."""
        sets = ["segment", '"offset"', "length", "checksum", "codec", "token_count"]
        if "embedding" in batch:
            sets.append("embedding")
        columns = ", ".join(f"{c} = b.{c}" if c != "embedding" else "embedding = b.embedding::FLOAT[]" for c in sets)
        with _registered(self.con, "_m3db_rewrite", batch):
            self.con.execute(f"UPDATE memories SET {columns} FROM _m3db_rewrite b WHERE memories.id = b.id")

    def cold_ids(self) -> np.ndarray:
        """Ids of the memories not encoded yet (codec 'cold'), ascending."""
        r = self.con.execute("SELECT id FROM memories WHERE codec = 'cold' ORDER BY id").fetchnumpy()
        return np.asarray(r["id"], dtype=np.int64)

    def document_id(self, source) -> int | None:
        """The id of the document with this source, or None."""
        row = self.con.execute("SELECT id FROM documents WHERE source = ?", [source]).fetchone()
        return None if row is None else row[0]

    def codec_bytes(self, name, version) -> bytes | None:
        """The stored parameters of a codec as msgpack bytes, or None."""
        row = self.con.execute("SELECT params FROM codecs WHERE name = ? AND version = ?", [name, version]).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    @_writes("writing the catalog")
    def insert_document(self, doc) -> None:
        metadata = doc.get("metadata")
        self.con.execute(
            "INSERT INTO documents(id, source, title, uri, metadata) VALUES (?, ?, ?, ?, ?)",
            [
                doc["id"],
                doc["source"],
                doc.get("title"),
                doc.get("uri"),
                None if metadata is None else json.dumps(metadata),
            ],
        )

    @_writes("writing the catalog")
    def update_document(self, doc) -> None:
        """Set a stored document's title, uri and metadata (a replace: the row says what the
        document's new memories were added with); its id, source and created_at stay."""
        metadata = doc.get("metadata")
        self.con.execute(
            "UPDATE documents SET title = ?, uri = ?, metadata = ? WHERE id = ?",
            [doc.get("title"), doc.get("uri"), None if metadata is None else json.dumps(metadata), doc["id"]],
        )

    def document_info(self, document_id) -> dict | None:
        """{"source", "title", "uri", "metadata"} of a document (what its memories' records carry)."""
        row = self.con.execute(
            "SELECT source, title, uri, metadata FROM documents WHERE id = ?", [int(document_id)]
        ).fetchone()
        if row is None:
            return None
        return {
            "source": row[0],
            "title": row[1],
            "uri": row[2],
            "metadata": None if row[3] is None else json.loads(row[3]),
        }

    def document_chunks(self, document_id) -> list[tuple[int, int | None, int | None, str]]:
        """[(memory id, char_start, char_end, text)] of a document's memories, in ordinal order."""
        return self.con.execute(
            "SELECT id, char_start, char_end, text FROM memories WHERE document_id = ? ORDER BY ordinal, id",
            [document_id],
        ).fetchall()

    def has_document(self, document_id) -> bool:
        return self.con.execute("SELECT count(*) FROM documents WHERE id = ?", [document_id]).fetchone()[0] > 0

    def next_document_id(self) -> int:
        """The id the next new document gets."""
        return self.con.execute("SELECT coalesce(max(id), 0) + 1 FROM documents").fetchone()[0]

    @_writes("writing the catalog")
    def insert_documents(self, batch) -> None:
        """Insert documents given as columns {id, source, title, uri, metadata (JSON text), created_at}."""
        with _registered(self.con, "_m3db_docs", batch):
            self.con.execute(
                "INSERT INTO documents(id, source, title, uri, metadata, created_at) "
                "SELECT id, source, title, uri, metadata::JSON, created_at FROM _m3db_docs"
            )

    @_writes("writing the catalog")
    def insert_codec(self, name, version, params) -> None:
        """Store a trained codec's parameters (msgpack bytes, or None)."""
        self.con.execute("INSERT INTO codecs VALUES (?, ?, ?)", [name, version, params])

    @_writes("writing the catalog")
    def replace_codec(self, name, version, params) -> None:
        """Store a trained codec's parameters (msgpack bytes), replacing those of the same name at
        any version (inside the transaction that re-encodes every record with them: no record is
        left of the old ones)."""
        self.con.execute("DELETE FROM codecs WHERE name = ?", [name])
        self.insert_codec(name, version, params)

    @_writes("checkpointing the catalog")
    def checkpoint(self) -> None:
        """Write DuckDB's WAL into the database file (a finished catalog then is one file)."""
        self.con.execute("CHECKPOINT")

    # -- reading ---------------------------------------------------------------------------

    def locations(self) -> dict[str, np.ndarray]:
        """All memories' (id, segment, offset, length, checksum) as numpy arrays."""
        r = self.con.execute('SELECT id, segment, "offset", length, checksum FROM memories').fetchnumpy()
        return {k: np.asarray(v) for k, v in r.items()}

    def segment_ends(self) -> dict[int, int]:
        """{segment number: end of its last committed record}."""
        return dict(
            self.con.execute('SELECT segment, max("offset" + length) FROM memories GROUP BY segment').fetchall()
        )

    def count(self) -> int:
        return self.con.execute("SELECT count(*) FROM memories").fetchone()[0]

    def document_count(self) -> int:
        return self.con.execute("SELECT count(*) FROM documents").fetchone()[0]

    def document_names(self, ids) -> dict[int, tuple[str, str | None]]:
        """{document id: (source, title)} for the given ids (missing ones left out)."""
        ids = sorted({int(i) for i in ids if i is not None})
        if not ids:
            return {}
        rows = self.con.execute(
            "SELECT id, source, title FROM documents WHERE id IN (SELECT UNNEST(?))", [ids]
        ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def codec_rows(self) -> list[list[str | int | bytes | None]]:
        """Every stored codec as [name, version, params bytes or None], in name and version order."""
        rows = self.con.execute("SELECT name, version, params FROM codecs ORDER BY name, version").fetchall()
        return [[n, int(v), None if p is None else bytes(p)] for n, v, p in rows]

    def document_rows(self, columns, batch_rows) -> Iterator[list[tuple[object, ...]]]:
        """Every document's `columns` (created_at as epoch microseconds), in id order, as lists
        of at most `batch_rows` row tuples."""
        select = ", ".join("epoch_us(created_at)" if c == "created_at" else f'"{c}"' for c in columns)
        cursor = self.con.execute(f"SELECT {select} FROM documents ORDER BY id")
        while rows := cursor.fetchmany(batch_rows):
            yield rows

    def memory_rows(self, columns, lo, hi) -> tuple[list[tuple[object, ...]], np.ndarray]:
        """(rows, embeddings) of the memories with ids in [lo, hi], in id order: `columns`
        (created_at as epoch microseconds) as tuples, and the embedding lists."""
        select = ", ".join("epoch_us(created_at)" if c == "created_at" else f'"{c}"' for c in columns)
        rows = self.con.execute(
            f"SELECT {select} FROM memories WHERE id BETWEEN ? AND ? ORDER BY id", [lo, hi]
        ).fetchall()
        emb = self.con.execute("SELECT embedding FROM memories WHERE id BETWEEN ? AND ? ORDER BY id", [lo, hi])
        return rows, emb.fetchnumpy()["embedding"]

    def embeddings(self, ids=None, *, after_seq=None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 embeddings) for the given ids, or those committed after `after_seq`, or all."""
        if ids is not None:
            self.con.register("_m3db_ids", {"id": np.asarray(ids, dtype=np.int64)})
            try:
                r = self.con.execute("SELECT m.id, m.embedding FROM memories m JOIN _m3db_ids USING (id)").fetchnumpy()
            finally:
                self.con.unregister("_m3db_ids")
        elif after_seq is not None:
            r = self.con.execute("SELECT id, embedding FROM memories WHERE commit_seq > ?", [after_seq]).fetchnumpy()
        else:
            r = self.con.execute("SELECT id, embedding FROM memories").fetchnumpy()
        ids_out = np.asarray(r["id"], dtype=np.int64)
        emb = np.stack(list(r["embedding"])).astype(np.float32) if len(ids_out) else np.zeros((0, 0), np.float32)
        return ids_out, emb

    def forgotten_after(self, seq) -> np.ndarray:
        return np.asarray(
            self.con.execute("SELECT DISTINCT id FROM forgotten WHERE commit_seq > ?", [seq]).fetchnumpy()["id"],
            dtype=np.int64,
        )

    def ids_where(self, where, params=None) -> np.ndarray:
        """Ids of the memories matching a SQL boolean expression over `memories`' columns."""
        query = f"SELECT id FROM memories WHERE ({where})"
        self.require_read_only_statement(query, what="a recall filter")
        try:
            r = self.con.execute(query, params or []).fetchnumpy()
        except (duckdb.Error, UnicodeDecodeError) as e:  # (see duckdb_unreadable)
            raise QueryError(
                f"the filter {where!r} failed: {_first_line(e)}. Filters are SQL over the columns of `memories`: "
                f"{', '.join(self.columns())}"
            ) from e
        return np.asarray(r["id"], dtype=np.int64)

    def require_read_only_statement(self, query, *, what="db.sql()") -> None:
        try:
            statements = self.con.extract_statements(query)
        except duckdb.Error as e:
            raise QueryError(f"{what}: {_first_line(e)}") from e
        if len(statements) != 1:
            raise QueryError(f"{what} takes exactly one statement, got {len(statements)}")
        kind = statements[0].type.name
        if kind not in _READ_STATEMENTS:
            raise QueryError(
                f"{what} only reads (SELECT, EXPLAIN); got a {kind} statement. Change memories through the "
                "API (add_memory, forget, compact)"
            )

    def interrupt(self) -> None:
        """Stop the statement running on the connection now (from another thread): it raises
        DuckDB's InterruptException in the thread running it. Nothing happens when none runs."""
        self.con.interrupt()

    def close(self) -> None:
        self.con.close()


def _connect_config() -> dict:
    config = {k: v for k, v in LOCKED_DOWN.items() if k not in _SESSION_SETTINGS}
    config.pop("lock_configuration", None)  # locked by _locked_down, once the session settings are set
    return config


def _locked_down(con):
    """The connection with LOCKED_DOWN's per-connection settings set, then its configuration
    locked. A second connection to a file already open in this process shares the first one's
    DuckDB instance, locked already: its global settings are the first's, and its per-connection
    ones can no longer be set (best effort: they keep DuckDB's defaults)."""
    try:
        if not con.execute("SELECT current_setting('lock_configuration')").fetchone()[0]:
            for name in _SESSION_SETTINGS:
                con.execute(f"SET {name} = {str(LOCKED_DOWN[name]).lower()}")
            if LOCKED_DOWN.get("lock_configuration"):
                con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def _first_line(e):
    if isinstance(e, UnicodeDecodeError):
        return duckdb_unreadable(e)
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def duckdb_unreadable(e: UnicodeDecodeError) -> str:
    """What to say when DuckDB failed and its message could not be read: DuckDB cuts the text it
    quotes at a byte count, sometimes inside a UTF-8 character, and the duckdb package then
    raises Python's UnicodeDecodeError in place of its own error (measured: a JSON value that
    does not parse, quoted in the message)."""
    return (
        "DuckDB refused the statement, and its message could not be read (it cut a UTF-8 character in two, "
        f"{e.reason} at byte {e.start}); most often a value that does not convert, quoted in that message: text "
        "that is not JSON cast to JSON, or a JSON metadata column (a list or dict) compared with a number or a "
        "boolean. Cast explicitly, e.g. col::VARCHAR = '...' or json_extract(col, '$.key')"
    )

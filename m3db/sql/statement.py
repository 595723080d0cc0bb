"""The records a planned statement is made of: `Plan`, its `Read`, each `Recall` and
`Generate`, the bound `Value`s, and the columns a recall produces (`RecallColumn`,
`MATCH_COLUMNS`). plan.py builds them, run.py binds and runs them: the order of a recall's
columns lives here once. Imports nothing of m3db.
"""

import dataclasses
from typing import NamedTuple


class RecallColumn(NamedTuple):
    """A column of a recall's relation. run.py fills it from each Match: from the attribute of
    that name where `from_match`, else from the metadata key of that name."""

    name: str
    sql_type: str  # its DuckDB type
    from_match: bool = False


# the columns every recall has, in this order at the front of its relation (SELECT * shows
# them so); the memories' metadata columns follow (Planner._recall_columns)
MATCH_COLUMNS = (
    RecallColumn("id", "BIGINT", True),
    RecallColumn("score", "DOUBLE", True),
    RecallColumn("text", "VARCHAR", True),
    RecallColumn("document_id", "BIGINT", True),
)
# bound even where the statement reads neither: the relation needs a column to carry its rows
# (SELECT count(*) FROM recall(...)), and these two are small numbers
ALWAYS_BOUND = ("id", "score")


@dataclasses.dataclass
class Value:
    """An argument m3db evaluates itself: a constant, a parameter (its internal name), or a
    constant SQL expression evaluated by DuckDB (its text and the parameters it reads)."""

    kind: str
    value: object
    params: tuple = ()


class LimitOffset(NamedTuple):
    """A LIMIT and its OFFSET as Values, each None where the statement has none."""

    limit: Value | None
    offset: Value | None


class DirectColumn(NamedTuple):
    """An output column of the direct path (see direct.py): its name and the bound list it is."""

    name: str
    key: str


@dataclasses.dataclass
class Recall:
    alias: str
    prefix: str  # names of the bound lists that stand in for the call
    query: Value
    k: Value | None  # None: k from `limit` (LIMIT + OFFSET) or run.py's DEFAULT_K
    limit: LimitOffset | None
    filter: str | None  # SQL over `memories`, with internal parameter names
    filter_params: tuple
    kept: list  # (condition, why it stays in WHERE), for EXPLAIN
    columns: list  # RecallColumn of the relation, in its order
    bound: list  # indexes into columns of those the statement reads (bound as $<prefix><index>)


@dataclasses.dataclass
class Generate:
    alias: str
    prefix: str
    prompt: Value
    options: dict  # name -> Value
    where: str | None


@dataclasses.dataclass
class Read:
    sql: str  # what DuckDB runs, with named parameters
    sql_params: tuple  # the internal parameter names it reads
    recalls: list
    generates: list
    # the direct path, when the statement only picks recall's columns in score order (see
    # direct.py): its output columns (DirectColumn) and its LIMIT and OFFSET
    direct: list | None = None
    direct_limit: LimitOffset | None = None


@dataclasses.dataclass
class Plan:
    kind: str  # "read", "insert" or "delete"
    read: Read  # the query (read), the source rows (insert) or the ids to forget (delete)
    explain: str | None  # None, "EXPLAIN" or "EXPLAIN ANALYZE"
    style: str | None  # "positional", "named" or None: how the user's parameters are bound
    user_params: dict  # internal name -> the user's key (list index or dict name)
    columns: list = dataclasses.field(default_factory=list)  # insert: the target columns
    source: str = ""  # insert: "VALUES" or "SELECT"

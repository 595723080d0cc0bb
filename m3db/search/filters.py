"""Recall filters: a `where=` turned into the sorted ids it allows, cached per commit.

The allowed set of a filter only changes with a commit, so it is cached until the next one: a
filter repeated across queries (a tenant, a language) costs one catalog scan and one parse. A
filter calling now() or random() is never cached. A dict filter {column: value} is built here
from known column names; a string filter is checked by the `check` function handed in (the SQL
layer's `checked_filter`, which refuses anything but a read-only expression: search sits below
sql and does not import it).
"""

import numpy as np

from ..errors import InvalidInputError, QueryError

FILTER_CACHE_SIZE = 64


class FilterCache:
    """Allowed-id sets of recent filters, valid for one commit of `catalog`."""

    def __init__(self, catalog, check):
        self.catalog = catalog
        self.check = check  # text -> (sql, volatile)
        self._sets = {}  # (where, params) -> sorted allowed ids; insertion order = least recently used first
        self._seq = None

    def __iter__(self):
        """The cached keys, (where, frozen params), least recently used first."""
        return iter(list(self._sets))

    def allowed(self, where, params, commit_seq: int) -> np.ndarray:
        """The sorted, read-only ids of the memories that `where` (with `params`) allows."""
        if isinstance(where, dict):
            if params is not None:
                raise InvalidInputError("a dict filter binds its own values; do not pass params with it")
            where, params = self._dict_filter(where)
            check = None  # built here from known columns
        elif not isinstance(where, str) or not where.strip():
            raise InvalidInputError(f"where must be a SQL expression string or a dict, got {where!r}")
        else:
            check = self.check
        if params is not None and not isinstance(params, (list, tuple, dict)):
            raise InvalidInputError("params must be a list (for ?) or a dict (for $name)")
        try:
            key = (where, _freeze(params))
            hash(key)
        except TypeError:
            key = None
        if self._seq != commit_seq:
            self._sets.clear()
            self._seq = commit_seq
        allowed = self._sets.pop(key, None) if key is not None else None
        if allowed is None:
            sql, volatile = (where, False) if check is None else check(where)
            allowed = np.sort(self.catalog.ids_where(sql, params))
            allowed.flags.writeable = False
            if volatile or key is None:
                return allowed
        self._sets[key] = allowed  # re-inserted: most recently used last
        while len(self._sets) > FILTER_CACHE_SIZE:
            self._sets.pop(next(iter(self._sets)))
        return allowed

    def _dict_filter(self, where):
        columns = self.catalog.columns()
        # column names ignore case, as in a string filter (DuckDB's identifiers do): {"lang": ...}
        # finds the column Lang
        by_case = {name.lower(): name for name in columns}
        parts, params = [], []
        for key, value in where.items():
            if not isinstance(key, str) or key.lower() not in by_case:
                raise QueryError(f"unknown column {key!r} in the filter; columns of `memories`: {', '.join(columns)}")
            key = by_case[key.lower()]
            if value is None:
                parts.append(f'"{key}" IS NULL')
            else:
                parts.append(f'"{key}" = ?')
                params.append(value)
        return " AND ".join(parts) or "TRUE", params


def _freeze(params):
    if params is None:
        return None
    if isinstance(params, dict):
        return tuple(sorted(params.items()))
    return tuple(params)

"""Rows: what db.sql() returns. A list of tuples with its column names, and conversions to
dicts, pyarrow, pandas and numpy.

This module owns the result type of SQL statements. It imports numpy and m3db's errors only
(pyarrow and pandas when asked for, as optional packages), and never torch.
"""

from typing import TYPE_CHECKING

import numpy as np

from ..errors import DependencyError, InvalidInputError

if TYPE_CHECKING:
    import pandas
    import pyarrow


class Rows(list):
    """Rows of a SQL statement (tuples), with the column names in `columns`; `explain` is True
    for the rows of an EXPLAIN (step, plan text). dicts(), arrow(), df() and numpy() convert them."""

    def __init__(self, columns, rows, *, explain=False):
        super().__init__(rows)
        self.columns = columns
        self.explain = explain

    def dicts(self) -> list[dict[str, object]]:
        return [dict(zip(self.columns, r)) for r in self]

    def arrow(self) -> "pyarrow.Table":
        """A pyarrow.Table (needs pyarrow)."""
        pa = _optional("pyarrow", "Rows.arrow()")
        arrays = [pa.array([r[i] for r in self]) for i in range(len(self.columns))]
        return pa.Table.from_arrays(arrays, names=list(self.columns))

    def df(self) -> "pandas.DataFrame":
        """A pandas.DataFrame (needs pandas)."""
        pd = _optional("pandas", "Rows.df()")
        return pd.DataFrame.from_records(list(self), columns=list(self.columns))

    def numpy(self) -> dict[str, np.ndarray]:
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
        raise DependencyError(
            f"{what} needs the {package} package, which is not installed: pip install {package}"
        ) from e

"""Progress bars for work that takes seconds: tqdm on stderr, or a silent stand-in.

Every layer may import this module (like errors.py): it imports nothing of m3db.
"""

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm


class _NoBar:
    def update(self, n) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def progress_bar(enabled: bool, unit: str, total: int | None = None, desc: str | None = None) -> "_NoBar | tqdm":
    """A tqdm bar counting `unit`s (with a total and an ETA when `total` is known), or a bar
    that shows nothing when not `enabled`."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

"""Kill points for the crash tests' worker processes (tests/test_pq_faults.py,
tests/test_reencode.py): `trap(owner, name)` wraps a method or function so that its N-th call,
counted over every trapped name, SIGKILLs the process before or after it runs.

A worker calls `arm(kill_at, when)` once, traps what it wants, runs the operation, and prints
`calls` (the names called, in order) so the test learns how many kill points there are."""

import os
import signal

calls: list[str] = []
_at = {"n": 0, "when": "before"}


def arm(kill_at: int, when: str) -> None:
    _at["n"], _at["when"] = kill_at, when


def trap(owner, name) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        here = len(calls) == _at["n"]
        if here and _at["when"] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if here and _at["when"] == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)

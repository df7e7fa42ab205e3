"""SIGTERM as an exception, deferred while a tracking call is in flight.

An exception raised from a signal handler lands wherever the main thread happens to be. Inside an
MLflow call that can be halfway through an sqlite transaction, whose connection then keeps the
database locked and makes the clean-up calls that mark the runs KILLED wait on the lock. Code that
must not be cut in half runs inside ``critical()``; a SIGTERM received there is raised as soon as
the section ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGTERM received: handled like Ctrl-C, so runs are marked KILLED."""


_depth = 0
_pending: int | None = None


def raise_interrupted(signum, frame) -> None:
    """The SIGTERM handler: raise now, or when the current critical section ends."""
    global _pending
    if _depth:
        _pending = signum
        return
    raise Interrupted(f"received signal {signum}")


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A section a signal must not interrupt; a signal received inside is raised at its end."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if not _depth and _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(f"received signal {signum}")

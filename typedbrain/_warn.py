"""Warnings that point at the user's code: the first caller outside typedbrain."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator

__all__ = ["Deferred", "deferred", "warn"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

Deferred = list[tuple[str, type[Warning]]]
"""Warnings kept back, to be issued later: (message, category) pairs, in order."""


class _ThreadState(threading.local):
    kept: Deferred | None = None


_thread = _ThreadState()


def warn(message: str, category: type[Warning]) -> None:
    """Issue ``message`` as ``category``, attributed to the nearest frame outside typedbrain.

    A warning raised deep inside ``fit`` or a checkpointer call then names the user's line
    (the ``fit(...)`` or ``recover_if_possible(...)`` call), however many of typedbrain's own
    frames lie between, so no call site has to count them. In a thread running
    :func:`deferred`, it is kept back instead.
    """
    kept = _thread.kept
    if kept is not None:
        kept.append((message, category))
        return
    level = 2  # warnings.warn's stacklevel for this function's caller
    frame = sys._getframe(1)  # the documented way to walk the caller frames
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


@contextlib.contextmanager
def deferred(into: Deferred) -> Iterator[None]:
    """Within the block, what :func:`warn` would issue in this thread is appended to ``into``.

    For work in a background thread: its warnings are issued later, in the thread of the
    call that picks up the work's outcome (the user's), rather than in a thread that no
    ``warnings.catch_warnings`` or filter of the user's code sees reliably.
    """
    outer, _thread.kept = _thread.kept, into
    try:
        yield
    finally:
        _thread.kept = outer

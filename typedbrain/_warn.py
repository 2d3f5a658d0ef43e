"""Warnings that point at the user's code: the first caller outside typedbrain."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning]) -> None:
    """Issue ``message`` as ``category``, attributed to the nearest frame outside typedbrain.

    A warning raised deep inside ``fit`` or a checkpointer call then names the user's line
    (the ``fit(...)`` or ``recover_if_possible(...)`` call), however many of typedbrain's own
    frames lie between, so no call site has to count them.
    """
    level = 2  # warnings.warn's stacklevel for this function's caller
    frame = sys._getframe(1)  # the documented way to walk the caller frames
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)

"""Checks of plain values shared by the modules that validate user input and saved state."""

from __future__ import annotations

import math
import numbers
import sys
from typing import Final

from typedbrain._errors import ConfigurationError

__all__ = ["check_bool", "check_int", "real_number"]

_FLOAT_MAX: Final = int(sys.float_info.max)


def check_int(name: str, value: object, *, minimum: int | None) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``.

    Raises:
        ConfigurationError: it is not, naming ``name`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (``"no"`` or ``0`` would pass a truth test, and mean yes or no).

    Raises:
        ConfigurationError: it is not, naming ``name`` and the value.
    """
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be a bool, got {value!r}")
    return value


def real_number(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else None.

    An int too large for a float is an infinity of its sign rather than an ``OverflowError``.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) > _FLOAT_MAX:
        return math.inf if value > 0 else -math.inf
    return float(value) if isinstance(value, numbers.Real) else None

"""Checks of plain values shared by the modules that validate user input and saved state."""

from __future__ import annotations

import math
import numbers
import os
import sys
from pathlib import Path
from typing import Final

from typedbrain._errors import ConfigurationError

__all__ = ["check_bool", "check_int", "check_makeable_folder", "check_path", "real_number"]

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


def check_path(name: str, value: object, *, empty: str) -> Path:
    """``value`` as a ``Path``, if it is a non-empty path (a str or ``os.PathLike``).

    ``Path("")`` is the working folder, so an empty path would quietly mean it.

    Args:
        name: how the message names the argument.
        value: what was given.
        empty: what the message for an empty path asks for (``"name the log file"``).

    Raises:
        ConfigurationError: it is not, naming ``name`` and the value.
    """
    if not isinstance(value, str | os.PathLike):
        raise ConfigurationError(
            f"{name} must be a path (a str or os.PathLike), got {type(value).__name__} {value!r}"
        )
    if os.fspath(value) == "":
        raise ConfigurationError(f"{name} is an empty path; {empty}")
    return Path(value)


def check_makeable_folder(name: str, folder: Path) -> None:
    """Refuse a ``folder`` that exists and is not a folder, or lies under a file.

    Either way it cannot be made, and the first write into it (an epoch later, for a
    checkpoint) would fail.

    Raises:
        ConfigurationError: naming ``name``, the folder and the file in the way.
    """
    if folder.exists() and not folder.is_dir():
        raise ConfigurationError(f"{name} {folder} exists and is not a folder")
    above = next((path for path in folder.parents if path.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigurationError(
            f"{name} {folder} lies under {above}, which is not a folder, so it cannot be made"
        )

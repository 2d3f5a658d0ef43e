"""Print pins of typedbrain's dependencies at their floors, for a test run at those versions.

Each runtime dependency in ``pyproject.toml`` must name a lower bound (``>=``); this prints it
as ``name==floor``, one per line, for ``pip install -r`` (``make test`` runs part of the suite in
such an environment, so that a floor that no longer works fails CI). torch is the exception: its
floor is not kept on this machine's disk, so the pin given with ``--torch`` stands in for it.

Usage: ``python tools/dependency_floors.py --torch torch==2.13.0 [pyproject.toml]``
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)")
_FLOOR = re.compile(r">=\s*([^,\s]+)")


def floors(pyproject: Path, torch_pin: str) -> list[str]:
    """The ``name==floor`` pins of the project's runtime dependencies (torch: ``torch_pin``).

    Raises:
        ValueError: a dependency has no ``>=`` floor, or cannot be read; the message names it.
    """
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    pins: list[str] = []
    for requirement in project["dependencies"]:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"{pyproject}: cannot read the dependency {requirement!r}")
        name, _, specifiers = match.groups()
        if name.lower() == "torch":
            pins.append(torch_pin)
            continue
        floor = _FLOOR.search(specifiers)
        if floor is None:
            raise ValueError(f"{pyproject}: the dependency {requirement!r} names no >= floor")
        pins.append(f"{name}=={floor.group(1)}")
    return pins


def main(argv: list[str] | None = None) -> int:
    """Print the pins; exit status 2 with a message for a dependency without a floor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--torch", required=True, help="the torch requirement to use instead")
    parser.add_argument("pyproject", nargs="?", type=Path, default=Path("pyproject.toml"))
    arguments = parser.parse_args(argv)
    try:
        pins = floors(arguments.pyproject, arguments.torch)
    except ValueError as error:
        parser.error(str(error))
    sys.stdout.write("".join(f"{pin}\n" for pin in pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())

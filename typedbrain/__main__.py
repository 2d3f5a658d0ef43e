"""``python -m typedbrain``: the ``typedbrain`` console script (see :mod:`typedbrain._cli`)."""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from typedbrain._cli import main

    sys.exit(main())

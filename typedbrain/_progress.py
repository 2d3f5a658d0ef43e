"""The progress bar of one stage: tqdm when shown, a plain pass-through otherwise."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Final, Generic, TypeVar

from tqdm import tqdm

__all__ = ["StageProgress"]

_T = TypeVar("_T")

# The running loss shown next to a bar is refreshed at most this often: formatting it on every
# batch would cost more than a small model's step.
_POSTFIX_INTERVAL_S: Final = 0.5


class StageProgress(Generic[_T]):
    """Iterates over a stage's batches, drawing a bar with the running loss when ``enabled``.

    Use as a context manager so the bar is closed even when the stage fails.
    """

    def __init__(
        self,
        batches: Iterable[_T],
        *,
        enabled: bool,
        description: str,
        total: int | None,
        colour: str | None = None,
    ) -> None:
        self._batches = batches
        self._bar: tqdm[_T] | None = None
        if enabled:
            self._bar = tqdm(
                batches, desc=description, total=total, dynamic_ncols=True, colour=colour
            )
        self._next_postfix = 0.0

    def __iter__(self) -> Iterator[_T]:
        return iter(self._bar if self._bar is not None else self._batches)

    def show_loss(self, name: str, value: float) -> None:
        """Show ``name=value`` next to the bar (throttled)."""
        if self._bar is None:
            return
        now = time.monotonic()
        if now >= self._next_postfix:
            self._next_postfix = now + _POSTFIX_INTERVAL_S
            self._bar.set_postfix({name: f"{value:.4g}"}, refresh=False)

    def __enter__(self) -> StageProgress[_T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()

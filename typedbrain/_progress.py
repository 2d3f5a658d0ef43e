"""The progress bar of one stage: tqdm when shown, a plain pass-through otherwise."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Final, Generic, Never, TypeVar

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
        initial: int = 0,
    ) -> None:
        self._batches = batches
        self._bar: tqdm[Never] | None = None  # a bar counted by hand, iterating nothing
        if enabled:
            self._bar = tqdm(
                desc=description,
                total=total,
                initial=initial,
                dynamic_ncols=True,
                colour=colour,
            )
        self._next_postfix = 0.0
        self._pending: tuple[str, float] | None = None
        self._uncounted = False  # a batch was handed out and its loop step has not come back

    def __iter__(self) -> Iterator[_T]:
        bar = self._bar
        return iter(self._batches) if bar is None else self._counted(bar)

    def _counted(self, bar: tqdm[Never]) -> Iterator[_T]:
        # Counted by hand rather than by iterating tqdm, which closes the bar as soon as the
        # batches run out, before the last loss can be shown.
        for batch in self._batches:
            self._uncounted = True
            yield batch
            self._uncounted = False
            bar.update(1)

    def show_loss(self, name: str, value: float) -> None:
        """Show ``name=value`` next to the bar (throttled)."""
        if self._bar is None:
            return
        now = time.monotonic()
        if now >= self._next_postfix:
            self._next_postfix = now + _POSTFIX_INTERVAL_S
            self._bar.set_postfix({name: f"{value:.4g}"}, refresh=False)
            self._pending = None
        else:
            self._pending = (name, value)

    def __enter__(self) -> StageProgress[_T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            if self._uncounted and exc_info[0] is None:  # the loop ended by break after it
                self._bar.update(1)
            if self._pending is not None:  # the final value, which throttling held back
                name, value = self._pending
                self._bar.set_postfix({name: f"{value:.4g}"}, refresh=False)
            self._bar.close()

"""Epoch counters: what ``fit`` iterates over, resumable, optionally with early stopping."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, Self, SupportsFloat, final

from typedbrain._checks import check_int, real_number
from typedbrain._errors import ConfigurationError

__all__ = ["EpochCounter", "EpochCounterWithStopper"]


def _require_mapping(owner: str, state_dict: object) -> Mapping[str, object]:
    if not isinstance(state_dict, Mapping):
        raise ConfigurationError(
            f"{owner}: the state must be a mapping, got {type(state_dict).__name__}"
        )
    return state_dict


class EpochCounter:
    """Yields the epoch numbers ``1 .. limit`` and remembers where it is.

    Pass it to ``Brain.fit``; save it with a checkpointer (it is ``Stateful``) so that a resumed
    run continues after the last finished epoch::

        counter = EpochCounter(limit=10)
        brain.fit(counter, train_set)

    Args:
        limit: the number of the last epoch.

    Attributes:
        current: the epoch most recently started (0 before the first).
        limit: the number of the last epoch.
    """

    def __init__(self, limit: int) -> None:
        self.limit = check_int(f"{type(self).__name__}: 'limit'", limit, minimum=0)
        self.current = 0

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> int:
        if self.current >= self.limit or self._stop_early():
            raise StopIteration
        self.current += 1
        return self.current

    def _stop_early(self) -> bool:
        return False

    def state_dict(self) -> dict[str, object]:
        """The counter's position, as plain data."""
        return {"current": self.current}

    def load_state_dict(self, state_dict: Mapping[str, object], /) -> None:
        """Restore a position saved by :meth:`state_dict`.

        The whole state is checked before anything changes: a rejected state leaves the
        counter as it was.

        Raises:
            ConfigurationError: the state is not a mapping, is missing ``current``, or
                ``current`` is not an integer of at least 0. (One beyond ``limit`` is taken:
                the counter then yields nothing.)
        """
        self.current = self._checked_current(state_dict)

    def _checked_current(self, state_dict: object) -> int:
        """Validate a saved state's ``current`` without changing the counter."""
        owner = f"{type(self).__name__} state"
        state = _require_mapping(owner, state_dict)
        if "current" not in state:
            raise ConfigurationError(f"{owner}: missing key 'current'")
        # A position beyond the limit is a finished run restarted with a lower limit (to stop
        # it early, or to evaluate it only): the counter then yields nothing.
        return check_int(f"{owner}: 'current'", state["current"], minimum=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(limit={self.limit}, current={self.current})"


@final
class EpochCounterWithStopper(EpochCounter):
    """An epoch counter that also stops once a metric has not improved for a while.

    Report the metric once per epoch (usually from ``on_stage_end`` for ``Stage.VALID``) with
    :meth:`update_metric`; iteration stops after ``limit_to_stop`` epochs without improvement,
    or at ``limit``. Patience counts from the end of the warm-up: a metric that never improves
    (one that is NaN on every epoch, say) stops training after epoch
    ``limit_warmup + limit_to_stop``. An epoch that reports NaN, or reports nothing, is an
    epoch without improvement.

    Args:
        limit: the number of the last epoch.
        limit_to_stop: epochs without improvement after which training stops (at least 1).
        limit_warmup: metrics reported in epochs ``1 .. limit_warmup`` are ignored.
        direction: ``"min"`` if lower is better (a loss or an error rate), ``"max"`` if higher
            is better (an accuracy).
        min_delta: how much better than the best so far a value must be to count as an
            improvement (a finite number, 0 or more).

    Attributes:
        best_value: the best metric seen after warm-up, or ``None``.
        best_epoch: the epoch that reported ``best_value`` (0 before any).

    Raises:
        ConfigurationError: an argument has a wrong type or value; the message names it.
    """

    def __init__(
        self,
        limit: int,
        limit_to_stop: int,
        limit_warmup: int = 0,
        direction: Literal["min", "max"] = "min",
        min_delta: float = 0.0,
    ) -> None:
        super().__init__(limit)
        name = type(self).__name__
        self.limit_to_stop = check_int(f"{name}: 'limit_to_stop'", limit_to_stop, minimum=1)
        self.limit_warmup = check_int(f"{name}: 'limit_warmup'", limit_warmup, minimum=0)
        given: object = direction  # typed as a Literal, but a config may pass anything
        if not isinstance(given, str) or given not in ("min", "max"):
            raise ConfigurationError(
                f"{name}: 'direction' must be 'min' or 'max', got {direction!r}"
            )
        delta = real_number(min_delta)
        if delta is None or not math.isfinite(delta) or delta < 0:
            raise ConfigurationError(
                f"{name}: 'min_delta' must be a finite number of at least 0, got {min_delta!r}"
            )
        self.direction: Literal["min", "max"] = direction
        self.min_delta = delta
        self.best_value: float | None = None
        self.best_epoch = 0

    def update_metric(self, value: SupportsFloat) -> None:
        """Report this epoch's metric. NaN never counts as an improvement.

        Raises:
            ConfigurationError: ``value`` is not a number (a one-element tensor is one).
        """
        try:
            if isinstance(value, bool | str | bytes):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigurationError(
                f"{type(self).__name__}.update_metric: the metric must be a number, got {value!r}"
            ) from None
        if self.current <= self.limit_warmup or math.isnan(number):
            return
        if self.best_value is None or self._improves(number, self.best_value):
            self.best_value = number
            self.best_epoch = self.current

    def _improves(self, value: float, best: float) -> bool:
        if self.direction == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    @property
    def should_stop(self) -> bool:
        """Whether the last ``limit_to_stop`` epochs brought no improvement.

        Before any improvement, patience counts from the last warm-up epoch.
        """
        last_improvement = self.best_epoch if self.best_value is not None else self.limit_warmup
        return self.current - last_improvement >= self.limit_to_stop

    def _stop_early(self) -> bool:
        return self.should_stop

    def state_dict(self) -> dict[str, object]:
        """The position and the best metric so far, as plain data."""
        return {
            "current": self.current,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state_dict: Mapping[str, object], /) -> None:
        """Restore what :meth:`state_dict` returned.

        The whole state is checked before anything changes: a rejected state leaves the
        counter as it was.

        Raises:
            ConfigurationError: the state is not a mapping, a key is missing, or a value has a
                wrong type or contradicts another (``best_epoch`` after ``current``, or a
                ``best_value`` without a ``best_epoch``).
        """
        current = self._checked_current(state_dict)
        owner = f"{type(self).__name__} state"
        for key in ("best_value", "best_epoch"):
            if key not in state_dict:
                raise ConfigurationError(f"{owner}: missing key {key!r}")
        saved_best = state_dict["best_value"]
        best_value = None if saved_best is None else real_number(saved_best)
        if saved_best is not None and (best_value is None or math.isnan(best_value)):
            raise ConfigurationError(
                f"{owner}: 'best_value' must be a number (not NaN) or None, got {saved_best!r}"
            )
        best_epoch = check_int(f"{owner}: 'best_epoch'", state_dict["best_epoch"], minimum=0)
        if best_epoch > current:
            raise ConfigurationError(
                f"{owner}: 'best_epoch' is {best_epoch}, after 'current' ({current})"
            )
        if (best_value is None) != (best_epoch == 0):
            raise ConfigurationError(
                f"{owner}: 'best_epoch' is {best_epoch} while 'best_value' is {best_value!r}: "
                "the best epoch is 0 exactly when there is no best value"
            )
        self.current = current
        self.best_epoch = best_epoch
        self.best_value = best_value

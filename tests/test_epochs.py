"""Epoch counters: iteration, resuming from saved state, early stopping."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from typedbrain import ConfigurationError, EpochCounter, EpochCounterWithStopper, Stateful


def test_counter_yields_one_to_limit_once() -> None:
    counter = EpochCounter(3)
    assert list(counter) == [1, 2, 3]
    assert list(counter) == []
    assert counter.current == 3


@given(limit=st.integers(0, 50), stop_after=st.integers(0, 50))
def test_counter_resumed_from_its_state_continues_where_it_stopped(
    limit: int, stop_after: int
) -> None:
    first = EpochCounter(limit)
    seen = list(itertools.islice(first, stop_after))
    resumed = EpochCounter(limit)
    resumed.load_state_dict(first.state_dict())
    assert seen + list(resumed) == list(range(1, limit + 1))


def test_counter_is_stateful() -> None:
    assert isinstance(EpochCounter(1), Stateful)
    assert isinstance(EpochCounterWithStopper(1, 1), Stateful)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({}, "EpochCounter state: missing key 'current'"),
        (
            {"current": "2"},
            "EpochCounter state: 'current' must be an integer of at least 0, got '2'",
        ),
        ({"current": 9}, "EpochCounter state: 'current' is 9, beyond this counter's limit of 5"),
    ],
)
def test_bad_counter_state_is_a_clear_error(state: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        EpochCounter(5).load_state_dict(state)
    assert str(caught.value) == message


def test_negative_limit_is_refused() -> None:
    with pytest.raises(
        ConfigurationError, match="'limit' must be an integer of at least 0, got -1"
    ):
        EpochCounter(-1)


def run_with_metrics(counter: EpochCounterWithStopper, metrics: list[float]) -> list[int]:
    epochs = []
    for epoch in counter:
        epochs.append(epoch)
        counter.update_metric(metrics[epoch - 1])
    return epochs


def test_stopper_stops_after_limit_to_stop_epochs_without_improvement() -> None:
    counter = EpochCounterWithStopper(limit=10, limit_to_stop=2, direction="min")
    epochs = run_with_metrics(counter, [5.0, 4.0, 4.5, 4.2, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert epochs == [1, 2, 3, 4]
    assert (counter.best_value, counter.best_epoch) == (4.0, 2)
    assert counter.should_stop


def test_stopper_with_max_direction_and_warmup() -> None:
    counter = EpochCounterWithStopper(limit=10, limit_to_stop=1, limit_warmup=2, direction="max")
    # Epochs 1-2 are warm-up: their (high) values do not count.
    epochs = run_with_metrics(counter, [0.99, 0.98, 0.5, 0.6, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert epochs == [1, 2, 3, 4, 5]
    assert (counter.best_value, counter.best_epoch) == (0.6, 4)


def test_stopper_min_delta_and_nan_are_not_improvements() -> None:
    counter = EpochCounterWithStopper(limit=10, limit_to_stop=2, min_delta=0.1)
    epochs = run_with_metrics(counter, [1.0, 0.95, math.nan, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    assert epochs == [1, 2, 3]
    assert counter.best_epoch == 1


def test_stopper_runs_to_limit_while_improving() -> None:
    counter = EpochCounterWithStopper(limit=4, limit_to_stop=1)
    assert run_with_metrics(counter, [4.0, 3.0, 2.0, 1.0]) == [1, 2, 3, 4]
    assert not counter.should_stop


def test_stopper_resumed_from_its_state_makes_the_same_decision() -> None:
    metrics = [5.0, 4.0, 4.5, 4.2, 4.1, 4.0, 3.0, 3.0, 3.0, 3.0]
    whole = run_with_metrics(EpochCounterWithStopper(10, 3), metrics)
    first = EpochCounterWithStopper(10, 3)
    for epoch in first:
        first.update_metric(metrics[epoch - 1])
        if epoch == 3:
            break
    resumed = EpochCounterWithStopper(10, 3)
    resumed.load_state_dict(first.state_dict())
    assert [1, 2, 3, *run_with_metrics(resumed, metrics)] == whole


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit_to_stop": 0}, "'limit_to_stop' must be an integer of at least 1, got 0"),
        ({"limit_warmup": -1}, "'limit_warmup' must be an integer of at least 0, got -1"),
        ({"direction": "up"}, "'direction' must be 'min' or 'max', got 'up'"),
        ({"min_delta": -0.5}, "'min_delta' must be 0 or more, got -0.5"),
    ],
)
def test_stopper_bad_arguments_are_clear_errors(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"limit": 5, "limit_to_stop": 1} | kwargs
    with pytest.raises(ConfigurationError, match=message):
        EpochCounterWithStopper(**arguments)  # type: ignore[arg-type]  # deliberately wrong values


def test_stopper_bad_state_is_a_clear_error() -> None:
    counter = EpochCounterWithStopper(5, 1)
    with pytest.raises(ConfigurationError, match="missing key 'best_value'"):
        counter.load_state_dict({"current": 1})
    with pytest.raises(ConfigurationError, match="'best_value' must be a number or None"):
        counter.load_state_dict({"current": 1, "best_value": "x", "best_epoch": 1})

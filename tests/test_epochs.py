"""Epoch counters: iteration, resuming from saved state, early stopping."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pytest
import torch
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
            "EpochCounter state: 'current' must be an int, got '2'",
        ),
        ({"current": -1}, "EpochCounter state: 'current' must be >= 0, got -1"),
    ],
)
def test_bad_counter_state_is_a_clear_error(state: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        EpochCounter(5).load_state_dict(state)
    assert str(caught.value) == message


def test_a_counter_restored_beyond_its_lowered_limit_yields_nothing() -> None:
    finished = EpochCounter(6)
    assert list(finished) == [1, 2, 3, 4, 5, 6]
    lowered = EpochCounter(4)
    lowered.load_state_dict(finished.state_dict())
    assert list(lowered) == []
    assert lowered.current == 6


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'limit' must be >= 0, got -1"):
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
        ({"limit_to_stop": 0}, "'limit_to_stop' must be >= 1, got 0"),
        ({"limit_warmup": -1}, "'limit_warmup' must be >= 0, got -1"),
        ({"direction": "up"}, "'direction' must be 'min' or 'max', got 'up'"),
        ({"min_delta": -0.5}, "'min_delta' must be a finite number of at least 0, got -0.5"),
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
    with pytest.raises(
        ConfigurationError, match=r"'best_value' must be a number \(not NaN\) or None"
    ):
        counter.load_state_dict({"current": 1, "best_value": "x", "best_epoch": 1})


@pytest.mark.parametrize("limit_warmup", [0, 2])
def test_stopper_whose_metric_is_always_nan_stops_limit_to_stop_epochs_after_warmup(
    limit_warmup: int,
) -> None:
    counter = EpochCounterWithStopper(limit=20, limit_to_stop=3, limit_warmup=limit_warmup)
    epochs = run_with_metrics(counter, [math.nan] * 20)
    assert epochs == list(range(1, limit_warmup + 4))
    assert counter.should_stop
    assert (counter.best_value, counter.best_epoch) == (None, 0)


def test_stopper_epochs_that_report_no_metric_count_as_without_improvement() -> None:
    counter = EpochCounterWithStopper(limit=10, limit_to_stop=2, limit_warmup=1)
    assert list(counter) == [1, 2, 3]
    assert counter.should_stop


def reference_epochs(
    metrics: list[float],
    limit: int,
    limit_to_stop: int,
    limit_warmup: int,
    direction: Literal["min", "max"],
    min_delta: float,
) -> list[int]:
    """The epochs an early-stopping run should go through, written out plainly."""
    epochs = []
    best: float | None = None
    last_improvement = limit_warmup
    for epoch in range(1, limit + 1):
        epochs.append(epoch)
        value = metrics[epoch - 1]
        if epoch > limit_warmup and not math.isnan(value):
            if best is None:
                better = True
            elif direction == "min":
                better = value < best - min_delta
            else:
                better = value > best + min_delta
            if better:
                best, last_improvement = value, epoch
        if epoch - last_improvement >= limit_to_stop:
            break
    return epochs


stopper_settings = st.fixed_dictionaries(
    {
        "limit": st.integers(0, 12),
        "limit_to_stop": st.integers(1, 4),
        "limit_warmup": st.integers(0, 4),
        "direction": st.sampled_from(["min", "max"]),
        "min_delta": st.sampled_from([0.0, 0.5]),
    }
)
metric_values = st.lists(
    st.one_of(st.just(math.nan), st.integers(0, 5).map(float)), min_size=12, max_size=12
)


@given(settings=stopper_settings, metrics=metric_values)
def test_stopper_stops_where_the_plain_reference_does(
    settings: dict[str, object], metrics: list[float]
) -> None:
    counter = EpochCounterWithStopper(**settings)  # type: ignore[arg-type]  # drawn above
    expected = reference_epochs(metrics, **settings)  # type: ignore[arg-type]  # drawn above
    assert run_with_metrics(counter, metrics) == expected


def drive(counter: EpochCounterWithStopper, metrics: list[float]) -> Iterator[tuple[str, int]]:
    """Run ``counter`` over ``metrics``, yielding ("start", epoch) and ("end", epoch) events."""
    for epoch in counter:
        yield "start", epoch
        counter.update_metric(metrics[epoch - 1])
        yield "end", epoch


@given(
    settings=stopper_settings,
    metrics=metric_values,
    interrupt_at=st.integers(0, 30),
)
def test_stopper_resumed_from_a_checkpoint_decides_exactly_as_the_uninterrupted_run(
    settings: dict[str, object], metrics: list[float], interrupt_at: int
) -> None:
    uninterrupted = EpochCounterWithStopper(**settings)  # type: ignore[arg-type]  # drawn above
    whole = list(drive(uninterrupted, metrics))

    first = EpochCounterWithStopper(**settings)  # type: ignore[arg-type]  # drawn above
    events = list(itertools.islice(drive(first, metrics), interrupt_at))
    resumed = EpochCounterWithStopper(**settings)  # type: ignore[arg-type]  # drawn above
    resumed.load_state_dict(first.state_dict())
    if events and events[-1][0] == "start":
        # A checkpoint taken inside an epoch: the brain has the counter yield that epoch again.
        events.pop()
        resumed.current -= 1
    events += drive(resumed, metrics)

    assert events == whole
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.should_stop == uninterrupted.should_stop


def test_stopper_state_saved_by_an_earlier_version_still_loads() -> None:
    for state in (
        {"current": 0, "best_value": None, "best_epoch": 0},
        {"current": 4, "best_value": 1.5, "best_epoch": 3},
        {"current": 4, "best_value": 2, "best_epoch": 4},
    ):
        counter = EpochCounterWithStopper(10, 2)
        counter.load_state_dict(state)
        assert counter.state_dict() == state


def advanced_stopper() -> EpochCounterWithStopper:
    counter = EpochCounterWithStopper(10, 5)
    run_with_metrics(counter, [3.0, 2.0, 2.5, *[9.0] * 7])
    return counter


@pytest.mark.parametrize(
    "state",
    [
        {"current": 3},
        {"current": 3, "best_value": 1.0},
        {"current": 3, "best_value": "x", "best_epoch": 1},
        {"current": 3, "best_value": 1.0, "best_epoch": -1},
        {"current": -1, "best_value": 1.0, "best_epoch": 1},
        {"current": 3, "best_value": 1.0, "best_epoch": 4},
    ],
)
def test_rejected_stopper_state_leaves_the_counter_unchanged(state: dict[str, object]) -> None:
    counter = advanced_stopper()
    before = counter.state_dict()
    with pytest.raises(ConfigurationError):
        counter.load_state_dict(state)
    assert counter.state_dict() == before


def test_rejected_counter_state_leaves_the_counter_unchanged() -> None:
    counter = EpochCounter(5)
    list(itertools.islice(counter, 2))
    with pytest.raises(ConfigurationError):
        counter.load_state_dict({"current": "9"})
    assert counter.current == 2


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            {"current": 3, "best_value": math.nan, "best_epoch": 2},
            "'best_value' must be a number (not NaN) or None, got nan",
        ),
        (
            {"current": 3, "best_value": True, "best_epoch": 2},
            "'best_value' must be a number (not NaN) or None, got True",
        ),
        (
            {"current": 3, "best_value": 1.0, "best_epoch": 4},
            "'best_epoch' is 4, after 'current' (3)",
        ),
        (
            {"current": 3, "best_value": None, "best_epoch": 2},
            "'best_epoch' is 2 while 'best_value' is None",
        ),
        (
            {"current": 3, "best_value": 1.0, "best_epoch": 0},
            "'best_epoch' is 0 while 'best_value' is 1.0",
        ),
    ],
)
def test_inconsistent_stopper_state_is_a_clear_error(
    state: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        EpochCounterWithStopper(5, 1).load_state_dict(state)


@pytest.mark.parametrize("counter", [EpochCounter(5), EpochCounterWithStopper(5, 1)])
def test_state_that_is_not_a_mapping_is_a_clear_error(counter: EpochCounter) -> None:
    with pytest.raises(ConfigurationError, match="the state must be a mapping, got list"):
        counter.load_state_dict([("current", 1)])  # type: ignore[arg-type]  # deliberately wrong


@pytest.mark.parametrize("min_delta", ["a", None, True, math.nan, math.inf, -math.inf, [0.1]])
def test_stopper_min_delta_that_is_not_a_finite_number_is_a_clear_error(
    min_delta: object,
) -> None:
    message = f"'min_delta' must be a finite number of at least 0, got {min_delta!r}"
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        EpochCounterWithStopper(5, 1, min_delta=min_delta)  # type: ignore[arg-type]  # wrong


def test_stopper_min_delta_accepts_an_integer_and_a_numpy_float() -> None:
    assert EpochCounterWithStopper(5, 1, min_delta=1).min_delta == 1.0
    assert EpochCounterWithStopper(5, 1, min_delta=np.float32(0.5)).min_delta == 0.5  # type: ignore[arg-type]  # numpy scalar


def test_stopper_direction_that_is_not_a_string_is_a_clear_error() -> None:
    direction = np.array(["min", "max"])
    with pytest.raises(ConfigurationError, match="'direction' must be 'min' or 'max'"):
        EpochCounterWithStopper(5, 1, direction=direction)  # type: ignore[arg-type]  # wrong


@pytest.mark.parametrize("key", ["limit", "limit_to_stop", "limit_warmup"])
@pytest.mark.parametrize("value", [True, 1.5, "3", None])
def test_stopper_integer_argument_of_a_wrong_type_is_a_clear_error(key: str, value: object) -> None:
    arguments: dict[str, object] = {"limit": 5, "limit_to_stop": 1, key: value}
    message = f"'{key}' must be an int, got {value!r}"
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        EpochCounterWithStopper(**arguments)  # type: ignore[arg-type]  # deliberately wrong


@pytest.mark.parametrize("value", [None, "0.5", True, [0.5], torch.zeros(2)])
def test_a_metric_that_is_not_a_number_is_a_clear_error(value: object) -> None:
    stopper = EpochCounterWithStopper(limit=5, limit_to_stop=2)
    next(iter(stopper))
    with pytest.raises(ConfigurationError, match="the metric must be a number, got"):
        stopper.update_metric(value)  # type: ignore[arg-type]  # wrong on purpose
    assert (stopper.best_value, stopper.best_epoch) == (None, 0)


def test_a_one_element_tensor_metric_counts_as_its_value() -> None:
    stopper = EpochCounterWithStopper(limit=5, limit_to_stop=2)
    next(iter(stopper))
    stopper.update_metric(torch.tensor(0.25))
    assert stopper.best_value == 0.25
    assert type(stopper.best_value) is float

"""The brain's run-state entry: saved as plain data per process, read back with clear errors."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import run_state
from typedbrain import CheckpointError, ConfigurationError
from typedbrain._run_record import RunRecord, RunStateRecoverable
from typedbrain._state import RunState, converter

_gradients = st.lists(
    st.none() | st.integers(1, 4).map(lambda n: torch.arange(float(n))), max_size=3
)


def _saving(record: RunRecord) -> RunStateRecoverable:
    def refuse(_: RunRecord) -> None:
        raise AssertionError("a saving recoverable was asked to load")

    return RunStateRecoverable(lambda: record, refuse)


def _loading() -> tuple[RunStateRecoverable, list[RunRecord]]:
    given_back: list[RunRecord] = []

    def take() -> RunRecord:
        raise AssertionError("a loading recoverable was asked to save")

    return RunStateRecoverable(take, given_back.append), given_back


def _weights_only_copy(state_dict: dict[str, object]) -> dict[str, object]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert isinstance(loaded, dict)
    return loaded


def _same(first: RunRecord, second: RunRecord) -> bool:
    return (
        first.state == second.state
        and len(first.gradients) == len(second.gradients)
        and all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(first.gradients, second.gradients, strict=True)
        )
    )


@given(state=run_state(), gradients=_gradients)
def test_a_saved_record_comes_back_unchanged_through_a_weights_only_load(
    state: RunState, gradients: list[torch.Tensor | None]
) -> None:
    saved = RunRecord(state, gradients)
    loader, given_back = _loading()
    loader.load_state_dict(_weights_only_copy(_saving(saved).state_dict()))
    assert len(given_back) == 1
    assert _same(given_back[0], saved)


@given(state=run_state())
def test_a_single_process_saves_one_entry_of_plain_data(state: RunState) -> None:
    saved = _saving(RunRecord(state, [])).state_dict()
    assert saved == {"ranks": [{"state": converter.unstructure(state), "gradients": []}]}


@pytest.mark.parametrize(
    ("state_dict", "message"),
    [
        ({}, "should hold a non-empty 'ranks' list, found keys \\[\\]"),
        ({"ranks": []}, "non-empty 'ranks' list"),
        ({"ranks": {"0": 1}}, "non-empty 'ranks' list"),
        ({"ranks": [{}], "extra": 1}, "found keys \\['extra', 'ranks'\\]"),
        ({"ranks": [["state", "gradients"]]}, "should hold 'state' and 'gradients'"),
        ({"ranks": [{"state": {}}]}, "should hold 'state' and 'gradients'"),
    ],
)
def test_a_malformed_entry_is_a_checkpoint_error_saying_what_is_wrong(
    state_dict: dict[str, object], message: str
) -> None:
    loader, given_back = _loading()
    with pytest.raises(CheckpointError, match=message):
        loader.load_state_dict(state_dict)
    assert given_back == []


@given(state=run_state())
def test_gradients_that_are_not_tensors_are_refused(state: RunState) -> None:
    loader, given_back = _loading()
    entry = {"state": converter.unstructure(state), "gradients": [torch.zeros(2), "x"]}
    with pytest.raises(CheckpointError, match="'gradients' should be a list of tensors"):
        loader.load_state_dict({"ranks": [entry]})
    assert given_back == []


def test_a_state_that_is_not_a_run_state_names_the_run_state_and_the_problem() -> None:
    loader, given_back = _loading()
    with pytest.raises(ConfigurationError, match="the brain's run state") as caught:
        loader.load_state_dict({"ranks": [{"state": {"epoch": "x"}, "gradients": []}]})
    assert "RunState" in str(caught.value)
    assert given_back == []

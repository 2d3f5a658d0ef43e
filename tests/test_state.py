"""State objects survive a round trip through plain data, and bad data is refused clearly."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import rng_state, run_state, sampler_state, training_progress
from typedbrain import ConfigurationError, TrainingProgress
from typedbrain._rng import RngState, capture_rng, restore_rng
from typedbrain._state import converter, structure_state

# Every state class with the strategy that draws it: each gets the same round-trip properties.
STATE_STRATEGIES = [
    pytest.param(training_progress(), id="TrainingProgress"),
    pytest.param(rng_state(), id="RngState"),
    pytest.param(sampler_state(), id="SamplerState"),
    pytest.param(run_state(), id="RunState"),
]


@pytest.mark.parametrize("strategy", STATE_STRATEGIES)
@given(data=st.data())
def test_state_round_trips_through_plain_data(
    strategy: st.SearchStrategy[object], data: st.DataObject
) -> None:
    state = data.draw(strategy)
    plain = converter.unstructure(state)
    assert converter.structure(plain, type(state)) == state


@pytest.mark.parametrize("strategy", STATE_STRATEGIES)
@given(data=st.data())
def test_state_plain_data_is_json_and_weights_only_safe(
    strategy: st.SearchStrategy[object], data: st.DataObject
) -> None:
    state = data.draw(strategy)
    plain = converter.unstructure(state)
    assert converter.structure(json.loads(json.dumps(plain)), type(state)) == state
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    assert converter.structure(torch.load(buffer, weights_only=True), type(state)) == state


def test_bad_state_lists_every_problem_and_names_the_source() -> None:
    with pytest.raises(ConfigurationError) as caught:
        structure_state({"step": "x", "surprise": 1}, TrainingProgress, source="brain.ckpt")
    message = str(caught.value)
    assert message.startswith("invalid TrainingProgress in brain.ckpt: ")
    assert "$.step" in message
    assert "surprise" in message


def test_state_values_out_of_range_are_refused() -> None:
    with pytest.raises(
        ConfigurationError, match=r"invalid value \(step must be 0 or more, got -1\) @ \$"
    ):
        structure_state({"step": -1}, TrainingProgress, source="brain.ckpt")
    with pytest.raises(ValueError, match="avg_train_loss must be finite"):
        TrainingProgress(avg_train_loss=float("nan"))


def test_captured_rng_state_restores_every_generator_after_a_save_and_weights_only_load() -> None:
    random.gauss(0.0, 1.0)  # leaves a cached value in Python's state
    np.random.standard_normal()  # ... and in NumPy's
    saved = capture_rng()
    expected = (random.random(), random.gauss(0.0, 1.0), np.random.rand(3), torch.rand(3))
    buffer = io.BytesIO()
    torch.save(converter.unstructure(saved), buffer)
    buffer.seek(0)
    loaded = structure_state(torch.load(buffer, weights_only=True), RngState, source="test")
    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    restore_rng(loaded)
    again = (random.random(), random.gauss(0.0, 1.0), np.random.rand(3), torch.rand(3))
    assert again[0] == expected[0]
    assert again[1] == expected[1]
    assert np.array_equal(again[2], expected[2])
    assert torch.equal(again[3], expected[3])

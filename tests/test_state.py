"""State objects survive a round trip through plain data, and bad data is refused clearly."""

from __future__ import annotations

import io
import json

import pytest
import torch
from hypothesis import given

from tests.strategies import training_progress
from typedbrain import ConfigurationError, TrainingProgress
from typedbrain._state import converter, structure_state


@given(training_progress())
def test_training_progress_round_trips_through_plain_data(progress: TrainingProgress) -> None:
    data = converter.unstructure(progress)
    assert converter.structure(data, TrainingProgress) == progress


@given(training_progress())
def test_training_progress_plain_data_is_json_and_weights_only_safe(
    progress: TrainingProgress,
) -> None:
    data = converter.unstructure(progress)
    assert json.loads(json.dumps(data)) == data
    buffer = io.BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == data


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

"""State objects survive a round trip through plain data, and bad data is refused clearly."""

from __future__ import annotations

import io
import json
import random
import re

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import rng_state, run_state, sampler_state, training_progress
from typedbrain import CheckpointError, ConfigurationError, ResumeWarning, TrainingProgress
from typedbrain._rng import RngState, capture_rng, restore_rng
from typedbrain._state import RunState, converter, structure_state

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


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"mid_epoch": "false"}, "expected bool (got str 'false') @ $.mid_epoch"),
        ({"epoch": 1.9}, "expected int | None (got float 1.9) @ $.epoch"),
        ({"window": True}, "expected int (got bool True) @ $.window"),
        ({"phase": 3}, "expected str (got int 3) @ $.phase"),
        ({"batch_size": "4"}, "(got str '4') @ $.batch_size"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_converted(
    changes: dict[str, object], fragment: str
) -> None:
    plain = converter.unstructure(RunState(phase="TRAIN", epoch=1, rng=capture_rng()))
    assert isinstance(plain, dict)
    with pytest.raises(ConfigurationError) as caught:
        structure_state({**plain, **changes}, RunState, source="brain.ckpt")
    assert fragment in str(caught.value)


def test_a_whole_number_is_accepted_where_a_float_is_saved() -> None:
    plain = converter.unstructure(TrainingProgress(avg_train_loss=2.0))
    assert isinstance(plain, dict)
    loaded = structure_state({**plain, "avg_train_loss": 2}, TrainingProgress, source="x")
    assert loaded.avg_train_loss == 2.0
    assert isinstance(loaded.avg_train_loss, float)


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


@pytest.mark.parametrize(
    ("torch_version", "fragment"),
    [
        (str(torch.__version__), "states of 2 CUDA devices and this process sees 0"),
        ("1.0.0", "saved by torch 1.0.0 and this is torch"),
    ],
)
def test_cuda_states_that_cannot_be_applied_here_are_left_with_a_warning(
    torch_version: str, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint from a machine with 2 GPUs (or another torch), resumed on one without CUDA:
    # the other generators are restored, and the run goes on.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    saved = attrs.evolve(capture_rng(), cuda=((1, 2, 3), (4, 5, 6)), torch_version=torch_version)
    expected = torch.rand(3)
    torch.rand(5)  # move the CPU generator on
    with pytest.warns(ResumeWarning, match=re.escape(fragment)):
        restore_rng(saved)
    assert torch.equal(torch.rand(3), expected)


def test_a_numpy_rng_state_of_the_wrong_length_is_a_checkpoint_error_naming_the_lengths() -> None:
    saved = capture_rng()
    short = attrs.evolve(saved, numpy=attrs.evolve(saved.numpy, key=saved.numpy.key[:-1]))
    with pytest.raises(CheckpointError, match=r"NumPy RNG state has 623 words, expected 624"):
        restore_rng(short)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"batch_size": 0}, "batch_size must be 1 or more, got 0"),
        ({"accumulation": 0}, "accumulation must be 1 or more, got 0"),
        ({"num_workers": -1}, "num_workers must be 0 or more, got -1"),
        ({"dataset_size": -1}, "dataset_size must be 0 or more, got -1"),
        ({"phase": "junk"}, "phase must be the name of a phase (INIT, FIT_START, "),
    ],
)
def test_run_state_values_out_of_range_are_refused_naming_the_field(
    changes: dict[str, object], fragment: str
) -> None:
    plain = converter.unstructure(RunState(phase="TRAIN", epoch=1, rng=capture_rng()))
    assert isinstance(plain, dict)
    with pytest.raises(ConfigurationError, match=re.escape(fragment)):
        structure_state({**plain, **changes}, RunState, source="brain.ckpt")


def test_optional_run_state_counts_accept_none_and_their_smallest_value() -> None:
    state = RunState(
        phase="TRAIN",
        rng=capture_rng(),
        batch_size=1,
        accumulation=1,
        num_workers=0,
        dataset_size=0,
    )
    plain = converter.unstructure(state)
    assert structure_state(plain, RunState, source="brain.ckpt") == state
    assert RunState(phase="TRAIN", rng=capture_rng()).batch_size is None


@pytest.mark.parametrize("data", [None, 3, [1], "text"])
def test_state_data_that_is_not_a_mapping_is_a_configuration_error_naming_the_source(
    data: object,
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        structure_state(data, RunState, source="brain.ckpt")
    assert str(caught.value) == (
        "invalid RunState in brain.ckpt: expected a mapping of its fields, got "
        f"{type(data).__name__}"
    )


def test_a_missing_state_field_is_described_as_missing_not_as_an_invalid_value() -> None:
    plain = converter.unstructure(RunState(phase="TRAIN", epoch=1, rng=capture_rng()))
    assert isinstance(plain, dict)
    del plain["phase"]
    with pytest.raises(ConfigurationError) as caught:
        structure_state(plain, RunState, source="brain.ckpt")
    assert str(caught.value) == "invalid RunState in brain.ckpt: required field missing @ $.phase"

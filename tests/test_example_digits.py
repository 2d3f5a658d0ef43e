"""The digits example (examples/digits/train.py) trains, validates and tests for real."""

from __future__ import annotations

import math

import pytest
import torch

from examples.digits.train import TARGET_ACCURACY, DigitsHparams, collate, load_splits, main, run

pytestmark = pytest.mark.slow


def test_main_reaches_target_test_accuracy_with_default_hparams() -> None:
    accuracy = main(["--noprogressbar"])

    assert accuracy >= TARGET_ACCURACY
    assert accuracy <= 1.0


def test_brain_records_one_stats_entry_per_epoch_with_probability_accuracy() -> None:
    brain = run(DigitsHparams(epochs=2), run_opts={"noprogressbar": True})

    assert [stats.epoch for stats in brain.history] == [1, 2]
    for stats in brain.history:
        assert 0.0 <= stats.valid_accuracy <= 1.0
        assert math.isfinite(stats.train_loss)
        assert stats.train_loss > 0.0
        assert math.isfinite(stats.valid_loss)
        assert stats.valid_loss > 0.0
    assert brain.history[1].train_loss < brain.history[0].train_loss
    assert brain.test_accuracy is not None
    assert 0.0 <= brain.test_accuracy <= 1.0


def test_same_seed_gives_same_history_and_test_accuracy() -> None:
    first = run(DigitsHparams(epochs=1), run_opts={"noprogressbar": True})
    second = run(DigitsHparams(epochs=1), run_opts={"noprogressbar": True})

    assert first.history == second.history
    assert first.test_accuracy == second.test_accuracy


def test_recorded_test_accuracy_matches_the_trained_models_predictions() -> None:
    hparams = DigitsHparams(epochs=2)
    brain = run(hparams, run_opts={"noprogressbar": True})
    test_set = load_splits(hparams).test
    batch = collate([test_set[index] for index in range(len(test_set))])

    model = brain.modules["model"]
    model.eval()
    with torch.no_grad():
        logits: torch.Tensor = model(batch.pixels)
    expected = (logits.argmax(dim=1) == batch.labels).double().mean().item()

    assert brain.test_accuracy == pytest.approx(expected)

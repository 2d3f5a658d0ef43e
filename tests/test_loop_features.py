"""What the loop does around the hooks: progress bars, data loaders, epochs, profiling."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import cast

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler

from tests.helpers import (
    Batch,
    ReadyBatches,
    RegressionBrain,
    batches,
    examples,
    ready_loader,
    regression_brain,
    sgd,
)
from typedbrain import ConfigurationError, LoaderKwargs, ResumableSampler, RunOptionsDict, Stage


def progress_brain(run_opts: RunOptionsDict | None = None) -> RegressionBrain:
    torch.manual_seed(0)
    return RegressionBrain({"model": torch.nn.Linear(4, 2)}, sgd(), run_opts=run_opts)


def test_progress_bars_are_shown_by_default_with_the_running_loss(
    capsys: pytest.CaptureFixture[str],
) -> None:
    brain = progress_brain()
    brain.fit(range(1, 3), ready_loader(batches(3, 4)), ready_loader(batches(2, 4)))
    brain.evaluate(ready_loader(batches(2, 4)))
    err = capsys.readouterr().err
    for label in ("epoch 1 train", "epoch 2 train", "epoch 1 valid", "epoch 2 valid", "test"):
        assert label in err
    assert "3/3" in err
    assert re.search(r"train_loss=\d", err)
    assert re.search(r"valid_loss=\d", err)


@pytest.mark.parametrize(
    ("run_opts", "progressbar"),
    [({"noprogressbar": True}, None), ({}, False)],
    ids=["noprogressbar-option", "progressbar-argument"],
)
def test_progress_bars_can_be_turned_off(
    capsys: pytest.CaptureFixture[str], run_opts: RunOptionsDict, progressbar: bool | None
) -> None:
    brain = progress_brain(run_opts)
    brain.fit(range(1, 2), ready_loader(batches(2, 4)), progressbar=progressbar)
    brain.evaluate(ready_loader(batches(2, 4)), progressbar=progressbar)
    assert capsys.readouterr().err == ""


def test_progressbar_argument_overrides_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    brain = progress_brain({"noprogressbar": True})
    brain.fit(range(1, 2), ready_loader(batches(2, 4)), progressbar=True)
    assert "epoch 1 train" in capsys.readouterr().err


def test_only_the_main_process_shows_progress_bars(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    brain = progress_brain()
    brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    assert capsys.readouterr().err == ""


def test_progress_bar_ends_showing_the_final_mean_loss(capsys: pytest.CaptureFixture[str]) -> None:
    class Recording(RegressionBrain):
        final = 0.0

        def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
            self.final = stage_loss

    torch.manual_seed(0)
    brain = Recording({"model": torch.nn.Linear(4, 2)}, sgd())
    brain.evaluate(ready_loader(batches(5, 4)))
    last_line = capsys.readouterr().err.strip().split("\r")[-1]
    assert f"test_loss={brain.final:.4g}" in last_line


def test_unknown_loader_option_is_an_error_that_suggests_the_right_one() -> None:
    brain = regression_brain()
    misspelt = {"bach_size": 2}  # the mistake under test, hidden from mypy as a mapping would be
    with pytest.raises(ConfigurationError) as caught:
        brain.fit(range(1, 2), examples(4), train_loader_kwargs=cast(LoaderKwargs, misspelt))
    assert str(caught.value) == "unknown DataLoader option 'bach_size'; did you mean 'batch_size'?"


class EpochAwareSampler(Sampler[int]):
    def __init__(self, size: int) -> None:
        self.size = size
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.size))

    def __len__(self) -> int:
        return self.size


class EpochAwareBatchSampler(BatchSampler):
    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_set_epoch_reaches_both_sampler_and_batch_sampler_once_per_epoch() -> None:
    sampler = EpochAwareSampler(8)
    batch_sampler = EpochAwareBatchSampler(sampler, 4)
    loader = DataLoader(ReadyBatches(examples(8)), batch_sampler=batch_sampler)
    brain = regression_brain()
    brain.fit(range(1, 4), loader)
    assert sampler.epochs == [1, 2, 3]
    assert batch_sampler.epochs == [1, 2, 3]
    assert brain.train_sampler is batch_sampler


def test_train_sampler_of_a_made_loader_is_the_sampler_that_orders_it() -> None:
    brain = regression_brain()
    brain.fit(range(1, 2), examples(8), train_loader_kwargs={"batch_size": 4, "shuffle": True})
    # The resumable sampler, not the BatchSampler torch wraps it in: SpeechBrain-style code
    # calls train_sampler.set_epoch.
    assert isinstance(brain.train_sampler, ResumableSampler)
    assert brain.train_sampler.shuffle


def test_train_sampler_of_a_users_loader_is_its_sampler_unless_it_has_a_batch_sampler() -> None:
    sampler = EpochAwareSampler(8)
    brain = regression_brain()
    brain.fit(range(1, 2), DataLoader(ReadyBatches(examples(8)), sampler=sampler, batch_size=4))
    assert brain.train_sampler is sampler
    batch_sampler = BatchSampler(EpochAwareSampler(8), 4, drop_last=False)
    batched = regression_brain()
    batched.fit(range(1, 2), DataLoader(ReadyBatches(examples(8)), batch_sampler=batch_sampler))
    assert batched.train_sampler is batch_sampler


class UnsizedExamples(IterableDataset[Batch]):
    """Single (input, target) examples from an iterable dataset, batched by the loader."""

    def __init__(self, count: int) -> None:
        self._items = examples(count)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._items)


def test_an_iterable_dataset_batched_by_the_loader_trains() -> None:
    # Its loader's BatchSampler has no length: naming the training sampler must not ask.
    made = regression_brain()
    made.fit(range(1, 3), UnsizedExamples(10), train_loader_kwargs={"batch_size": 4})
    assert made.optimizer_step == 6  # 3 batches (4, 4, 2) in each of 2 epochs
    given = regression_brain()
    given.fit(range(1, 3), DataLoader(UnsizedExamples(10), batch_size=4))
    assert given.optimizer_step == 6
    for name, parameter in made.modules.named_parameters():
        assert torch.equal(parameter, dict(given.modules.named_parameters())[name])


def test_profile_training_profiles_and_logs_the_training_stage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    brain = regression_brain(
        run_opts={"profile_training": True, "profile_warmup": 1, "profile_steps": 2}
    )
    with caplog.at_level(logging.INFO, logger="typedbrain"):
        brain.fit(range(1, 2), ready_loader(batches(5, 4)))
    assert brain.profiler is not None
    events = brain.profiler.key_averages()
    assert any("aten::mm" in event.key or "aten::addmm" in event.key for event in events)
    assert "training profile:" in caplog.text


def test_modules_are_in_train_mode_for_training_and_eval_mode_otherwise() -> None:
    class ModeSeeing(RegressionBrain):
        modes: list[tuple[Stage, bool, bool]]

        def compute_forward(self, batch: Batch, stage: Stage) -> torch.Tensor:
            self.modes.append((stage, self.modules.training, torch.is_grad_enabled()))
            return super().compute_forward(batch, stage)

    torch.manual_seed(0)
    brain = ModeSeeing({"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True})
    brain.modes = []
    brain.fit(range(1, 2), ready_loader(batches(1, 4)), ready_loader(batches(1, 4)))
    brain.evaluate(ready_loader(batches(1, 4)))
    assert brain.modes == [
        (Stage.TRAIN, True, True),
        (Stage.VALID, False, False),
        (Stage.TEST, False, False),
    ]


def test_a_stage_cut_short_by_debug_batches_shows_every_batch_it_ran(
    capsys: pytest.CaptureFixture[str],
) -> None:
    brain = progress_brain({"debug": True, "debug_batches": 3, "debug_epochs": 1})
    brain.fit(range(1, 2), ready_loader(batches(5, 4)))
    err = capsys.readouterr().err
    assert "epoch 1 train" in err
    assert "3/3" in err

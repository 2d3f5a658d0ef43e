"""A recovery that leaves part of the run out says so, instead of resuming something else.

Two mistakes a recipe makes without noticing: registering an object with the checkpointer
after ``fit`` has recovered (a scheduler built after ``super().on_fit_start()``), and not
registering the epoch counter. Either way the run goes on, but not as the interrupted one.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

import typedbrain as tb
from tests.helpers import Batch, call, examples
from typedbrain import ResumeWarning, Stage


class Regressor(tb.Brain[Batch, Tensor]):
    """Saves a checkpoint at the end of each epoch, as recipes do."""

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        return call(self.modules["model"], batch[0])

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        return torch.nn.functional.mse_loss(predictions, batch[1])

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is Stage.TRAIN and self.checkpointer is not None:
            self.checkpointer.save_and_keep_only(meta={"loss": stage_loss})


class LateSchedulerBrain(Regressor):
    """Builds and registers its scheduler after ``super().on_fit_start()`` has recovered."""

    def on_fit_start(self) -> None:
        super().on_fit_start()
        scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        assert self.checkpointer is not None
        self.checkpointer.add_recoverable("scheduler", scheduler)


class EarlySchedulerBrain(Regressor):
    """Builds and registers its scheduler in ``init_optimizers``, before the recovery."""

    def init_optimizers(self) -> None:
        super().init_optimizers()
        scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        assert self.checkpointer is not None
        self.checkpointer.add_recoverable("scheduler", scheduler)


def _fit(
    brain_class: type[Regressor], folder: Path, *, epochs: int, register_counter: bool = True
) -> None:
    """One start of a script: fresh objects, ``fit`` for ``epochs`` epochs in all."""
    model = torch.nn.Linear(4, 2)
    counter = tb.EpochCounter(epochs)
    recoverables: dict[str, object] = {"model": model}
    if register_counter:
        recoverables["counter"] = counter
    brain = brain_class(
        {"model": model},
        lambda params: torch.optim.SGD(params, lr=0.1),
        run_opts={"noprogressbar": True},
        checkpointer=tb.Checkpointer(folder, recoverables),
    )
    brain.fit(counter, examples(8), train_loader_kwargs={"batch_size": 4})


@pytest.mark.parametrize(
    ("brain_class", "warns"), [(LateSchedulerBrain, True), (EarlySchedulerBrain, False)]
)
def test_an_object_registered_after_the_recovery_warns_that_its_state_was_not_loaded(
    tmp_path: Path, brain_class: type[Regressor], warns: bool
) -> None:
    _fit(brain_class, tmp_path, epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(brain_class, tmp_path, epochs=2)  # the restart recovers epoch 1's checkpoint
    messages = [str(w.message) for w in caught if issubclass(w.category, ResumeWarning)]
    if warns:
        [message] = messages
        assert message.startswith("'scheduler' registered with the checkpointer after checkpoint")
        assert "init_optimizers()" in message
    else:
        assert messages == []


@pytest.mark.parametrize("register_counter", [False, True])
def test_an_unregistered_epoch_counter_warns_that_recovered_epochs_are_trained_again(
    tmp_path: Path, register_counter: bool
) -> None:
    _fit(Regressor, tmp_path, epochs=2, register_counter=register_counter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(Regressor, tmp_path, epochs=3, register_counter=register_counter)
    messages = [str(w.message) for w in caught if issubclass(w.category, ResumeWarning)]
    if register_counter:
        assert messages == []  # the restart trains epoch 3 only
    else:
        [message] = messages
        assert "epoch counter is not registered with the checkpointer: it starts at epoch 1" in (
            message
        )
        assert "saved in epoch 2" in message


def test_a_fit_after_evaluate_builds_its_optimizer_before_recovering_and_does_not_warn(
    tmp_path: Path,
) -> None:
    """The new optimizer is registered after evaluate's recovery, then fit's recovery loads it."""
    model, counter = torch.nn.Linear(4, 2), tb.EpochCounter(2)
    brain = Regressor(
        {"model": model},
        lambda params: torch.optim.SGD(params, lr=0.1),
        run_opts={"noprogressbar": True},
        checkpointer=tb.Checkpointer(tmp_path, {"model": model, "counter": counter}),
    )
    brain.fit(counter, examples(8), train_loader_kwargs={"batch_size": 4})
    brain.evaluate(examples(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        brain.fit(counter, examples(8), train_loader_kwargs={"batch_size": 4})


class ReRegisteringBrain(Regressor):
    """Registers its model again after the recovery: the same object, whose state was loaded."""

    def on_fit_start(self) -> None:
        super().on_fit_start()
        assert self.checkpointer is not None
        self.checkpointer.add_recoverable("model", self.modules["model"])


def test_registering_the_recovered_object_again_does_not_warn(tmp_path: Path) -> None:
    _fit(ReRegisteringBrain, tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        _fit(ReRegisteringBrain, tmp_path, epochs=2)


def test_an_unregistered_counter_already_past_the_checkpoints_epoch_does_not_warn(
    tmp_path: Path,
) -> None:
    """A counter the recipe moved on itself trains no recovered epoch again."""
    _fit(Regressor, tmp_path, epochs=2, register_counter=False)
    model, counter = torch.nn.Linear(4, 2), tb.EpochCounter(3)
    counter.current = 2  # as the checkpoint saved in epoch 2 would have left it
    brain = Regressor(
        {"model": model},
        lambda params: torch.optim.SGD(params, lr=0.1),
        run_opts={"noprogressbar": True},
        checkpointer=tb.Checkpointer(tmp_path, {"model": model}),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        brain.fit(counter, examples(8), train_loader_kwargs={"batch_size": 4})


def test_a_finished_run_started_again_says_why_it_trains_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fit(Regressor, tmp_path, epochs=2)
    with caplog.at_level(logging.INFO, logger="typedbrain"):
        _fit(Regressor, tmp_path, epochs=2)
    assert "the epoch counter is at its limit (epoch 2 of 2): no epoch to train" in caplog.messages

"""A recipe typed end to end: attrs hyperparameters, a batch class, a prediction type.

``Brain[Batch, Tensor, RegressionHparams]`` types every hook: ``batch`` is a ``Batch``,
``compute_forward`` returns the ``Tensor`` that ``compute_objectives`` receives, and
``self.hparams`` is the attrs instance with its fields' own types.
"""

from __future__ import annotations

from typing import assert_type

import attrs
import torch
from torch import Tensor

from typedbrain import Brain, EpochCounter, Stage


@attrs.frozen
class RegressionHparams:
    lr: float
    model: torch.nn.Linear
    epochs: int = 3
    max_grad_norm: float = 1.0  # a run option given through the hyperparameters


@attrs.frozen
class Batch:
    inputs: Tensor
    targets: Tensor


class Regressor(Brain[Batch, Tensor, RegressionHparams]):
    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        assert_type(batch, Batch)
        assert_type(stage, Stage)
        assert_type(self.hparams, RegressionHparams)
        assert_type(self.hparams.lr, float)
        assert_type(self.hparams.epochs, int)
        assert_type(self.hparams.model, torch.nn.Linear)
        # nn.Module.__call__ is typed ``Any`` by torch; forward() keeps the Tensor type.
        return self.hparams.model.forward(batch.inputs)

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        assert_type(predictions, Tensor)
        return torch.nn.functional.mse_loss(predictions, batch.targets)

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        if stage is Stage.TRAIN:
            assert_type(epoch, int | None)

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        assert_type(stage_loss, float)
        if stage is Stage.VALID and epoch is not None:
            assert_type(epoch, int)

    def on_fit_batch_end(
        self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
    ) -> None:
        assert_type(outputs, Tensor)
        assert_type(loss, Tensor)

    def fit_batch(self, batch: Batch) -> Tensor:
        loss = super().fit_batch(batch)
        assert_type(loss, Tensor)
        return loss

    def evaluate_batch(self, batch: Batch, stage: Stage) -> Tensor:
        return super().evaluate_batch(batch, stage)

    def init_optimizers(self) -> None:
        # The optimizer property has a setter: an override may build its own.
        self.optimizer = torch.optim.SGD(self.modules.parameters(), lr=self.hparams.lr)
        self.optimizers_dict = {"model": self.optimizer}


class WiderObjectives(Brain[Batch, Tensor, RegressionHparams]):
    """Overrides may widen parameter types (they are contravariant)."""

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        return batch.inputs

    def compute_objectives(self, predictions: object, batch: object, stage: Stage) -> Tensor:
        return torch.zeros(())


def build_and_run(train: list[Batch], valid: list[Batch]) -> float:
    model = torch.nn.Linear(3, 1)
    hparams = RegressionHparams(lr=0.1, model=model)
    brain = Regressor(
        modules={"model": model},
        opt_class=lambda params: torch.optim.SGD(params, lr=hparams.lr),
        hparams=hparams,
        run_opts={"max_grad_norm": 1.0, "precision": "bf16"},
    )
    assert_type(brain, Regressor)
    assert_type(brain.hparams, RegressionHparams)
    # Positional hyperparameters pick the same overload.
    assert_type(Regressor(None, None, hparams), Regressor)

    counter = EpochCounter(limit=hparams.epochs)
    brain.fit(counter, train, valid, train_loader_kwargs={"batch_size": 4})
    brain.fit(range(1, 3), train, progressbar=False)
    test_loss = brain.evaluate(valid, min_key="loss", test_loader_kwargs={"batch_size": 8})
    assert_type(test_loss, float)
    return test_loss

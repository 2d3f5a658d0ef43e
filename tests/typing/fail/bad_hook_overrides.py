"""Hook overrides that do not match the brain's type parameters are ``override`` errors."""

from __future__ import annotations

import attrs
from torch import Tensor

from typedbrain import Brain, Stage


@attrs.frozen
class Batch:
    inputs: Tensor
    targets: Tensor


class WrongPredictionsType(Brain[Batch, Tensor]):
    def compute_objectives(
        self,
        predictions: list[Tensor],  # E: override
        batch: Batch,
        stage: Stage,
    ) -> Tensor:
        return predictions[0].sum()


class MissingStage(Brain[Batch, Tensor]):
    def compute_objectives(self, predictions: Tensor, batch: Batch) -> Tensor:  # E: override
        return predictions.sum()


class WrongObjectiveType(Brain[Batch, Tensor]):
    def compute_objectives(  # E: override
        self, predictions: Tensor, batch: Batch, stage: Stage
    ) -> float:
        return float(predictions.sum())


class WrongPredictionType(Brain[Batch, Tensor]):
    def compute_forward(self, batch: Batch, stage: Stage) -> tuple[Tensor, Tensor]:  # E: override
        return batch.inputs, batch.targets


class WrongBatchType(Brain[Batch, Tensor]):
    def compute_forward(self, batch: Tensor, stage: Stage) -> Tensor:  # E: override
        return batch


class ReturnsWrongValue(Brain[Batch, Tensor]):
    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        return (batch.inputs, batch.targets)  # E: return-value


class StageLossIsAFloat(Brain[Batch, Tensor]):
    def on_stage_end(
        self,
        stage: Stage,
        stage_loss: Tensor,  # E: override
        epoch: int | None = None,
    ) -> None:
        del stage, stage_loss, epoch


class BatchEndOutputs(Brain[Batch, Tensor]):
    def on_fit_batch_end(
        self,
        batch: Batch,
        outputs: str,  # E: override
        loss: Tensor,
        should_step: bool,
    ) -> None:
        del batch, outputs, loss, should_step


class CallsHookWithWrongBatch(Brain[Batch, Tensor]):
    def fit_batch(self, batch: Batch) -> Tensor:
        self.compute_forward(batch.inputs, Stage.TRAIN)  # E: arg-type
        return super().fit_batch(batch)


class Unparametrized(Brain):  # E: type-arg
    pass

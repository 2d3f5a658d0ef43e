from typing import NamedTuple

import attrs
import torch
from torch import Tensor

import typedbrain as tb


class Batch(NamedTuple):
    pixels: Tensor
    labels: Tensor


@attrs.frozen
class Hyper:
    lr: float
    label_smoothing: float


class Classifier(tb.Brain[Batch, Tensor, Hyper]):
    def compute_forward(self, batch: Batch, stage: tb.Stage) -> Tensor:
        logits: Tensor = self.modules["model"](batch.pixels)  # the loop moved the batch
        return logits

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: tb.Stage) -> Tensor:
        smoothing = self.hparams.label_smoothing  # a float, for mypy too
        return torch.nn.functional.cross_entropy(
            predictions, batch.labels, label_smoothing=smoothing
        )


brain = Classifier(
    modules={"model": torch.nn.Linear(64, 10)},
    opt_class=lambda params: torch.optim.Adam(params, lr=0.01),
    hparams=Hyper(lr=0.01, label_smoothing=0.1),
)

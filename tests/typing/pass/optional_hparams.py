"""A brain whose hyperparameters are optional: ``Brain[Tensor, Tensor, Hyper | None]``.

It is built with a ``Hyper``, with ``hparams=None``, or without ``hparams`` at all; then
``self.hparams`` is ``None``. mypy accepts all three through the constructor's overloads
whatever their self-types say; pyright holds each self-type, and takes the call without
``hparams`` only through the overload written for it (checked by hand, see docs/typing.md).
"""

from __future__ import annotations

from typing import assert_type

import attrs
import torch
from torch import Tensor

from typedbrain import Brain, Stage


@attrs.frozen
class Hyper:
    scale: float


class Scaler(Brain[Tensor, Tensor, Hyper | None]):
    def compute_forward(self, batch: Tensor, stage: Stage) -> Tensor:
        assert_type(self.hparams, Hyper | None)
        return batch if self.hparams is None else batch * self.hparams.scale

    def compute_objectives(self, predictions: Tensor, batch: Tensor, stage: Stage) -> Tensor:
        return predictions.sum()


def build() -> list[Scaler]:
    modules = {"m": torch.nn.Linear(1, 1)}
    return [
        Scaler(modules),
        Scaler(),
        Scaler(modules, hparams=None),
        Scaler(modules, hparams=Hyper(2.0)),
        Scaler(modules, None, Hyper(2.0)),
    ]

"""Hyperparameters: typed fields for an attrs class, ``object`` values for a mapping."""

from __future__ import annotations

import attrs
from torch import Tensor

from typedbrain import Brain, Hparams, Stage


@attrs.frozen
class Settings:
    learning_rate: float
    scale: float = 2.0


class Typed(Brain[Tensor, Tensor, Settings]):
    def compute_forward(self, batch: Tensor, stage: Stage) -> Tensor:
        lr = self.hparams.learning_rat  # E: attr-defined
        self.hparams.scale = 1.0  # E: misc
        label: str = self.hparams.scale  # E: assignment
        del lr, label
        return batch


class Untyped(Brain[Tensor, Tensor]):
    def compute_forward(self, batch: Tensor, stage: Stage) -> Tensor:
        # Values of a mapping are ``object``: using one as a number needs a check first.
        return batch * self.hparams.scale  # E: operator


def hparams_is_read_only(hparams: Hparams) -> None:
    # Hparams has no __setitem__; mypy looks it up through Hparams.__getattr__ (-> object).
    hparams["lr"] = 0.1  # E: operator
    hparams.lr = 0.1  # E: attr-defined


def constructing() -> None:
    Typed(hparams=Settings(learning_rate="fast"))  # E: arg-type
    Typed(hparams=Settings(learning_rate=0.1), run_opts={"debug": "yes"})  # E: call-overload
    Typed(None, Settings(learning_rate=0.1))  # E: call-overload

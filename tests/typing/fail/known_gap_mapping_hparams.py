"""KNOWN GAP (xfail in tests/test_typing.py): a mapping given to a brain typed with attrs hparams.

``Brain.__init__``'s first overload (``self: Brain[BatchT, PredT, Hparams]``, ``hparams:
Mapping[str, object] | None``) is meant to apply only to brains whose hyperparameters type is
``Hparams``. mypy ignores a constructor's ``self`` annotation when the class's type arguments are
already fixed (a subclass such as ``Typed``, or an explicit ``Brain[...]``), so these calls are
accepted and ``self.hparams`` is typed ``Settings`` while at run time it is an ``Hparams``.
Each marked line should be an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from torch import Tensor

from typedbrain import Brain, Hparams


@attrs.frozen
class Settings:
    learning_rate: float

    def decayed(self, epoch: int) -> float:
        return self.learning_rate / epoch


class Typed(Brain[Tensor, Tensor, Settings]):
    pass


def mapping_given_to_typed_brain(values: Mapping[str, object]) -> float:
    brain = Typed(hparams={"learning_rate": 0.1})  # E: call-overload
    Typed(hparams=values)  # E: call-overload
    Typed(None, None, values)  # E: call-overload
    Typed(hparams=Hparams(values))  # E: call-overload
    Typed()  # E: call-overload
    Brain[Tensor, Tensor, Settings](hparams={"learning_rate": 0.1})  # E: call-overload
    # Accepted, and fails at run time: an Hparams has no decayed().
    return brain.hparams.decayed(1)

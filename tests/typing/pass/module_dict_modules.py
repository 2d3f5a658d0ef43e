"""A ``torch.nn.ModuleDict`` is accepted as a brain's ``modules``, as it is at run time.

Another brain's ``modules`` (a ``ModuleDict``) can so be handed to a new brain.
"""

from __future__ import annotations

from typing import assert_type

import torch
from torch import Tensor

from typedbrain import Brain


class Regressor(Brain[Tensor, Tensor]):
    pass


def construct() -> None:
    first = Regressor(modules=torch.nn.ModuleDict({"model": torch.nn.Linear(2, 1)}))
    second = Regressor(first.modules)
    assert_type(second.modules, torch.nn.ModuleDict)
    typed: Brain[Tensor, Tensor, float] = Brain(first.modules, None, 0.1)
    assert_type(typed.hparams, float)

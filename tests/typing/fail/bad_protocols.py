"""Objects that do not fit ``Stateful``, ``OptimizerFactory``, ``PhaseObserver``,
``CheckpointerLike``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from typedbrain import (
    Brain,
    CheckpointerLike,
    OptimizerFactory,
    Phase,
    PhaseObserver,
    Stateful,
)


class Model(Brain[Tensor, Tensor]):
    pass


class SaveOnly:
    def state_dict(self) -> dict[str, object]:
        return {}


class StateIsAList:
    def state_dict(self) -> list[float]:
        return []

    def load_state_dict(self, state: dict[str, object], /) -> None:
        del state


class LoadsAString:
    def state_dict(self) -> dict[str, object]:
        return {}

    def load_state_dict(self, path: str) -> None:
        del path


def stateful() -> None:
    save_only: Stateful = SaveOnly()  # E: assignment
    wrong_state: Stateful = StateIsAList()  # E: assignment
    wrong_load: Stateful = LoadsAString()  # E: assignment
    not_stateful: Stateful = torch.zeros(1)  # E: assignment
    del save_only, wrong_state, wrong_load, not_stateful


def narrow(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params)


def no_parameters() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1)])


def use(factory: OptimizerFactory) -> None:
    del factory


def optimizer_factories() -> None:
    use(lambda params: None)  # E: arg-type, return-value
    use(no_parameters)  # E: arg-type
    wrong_lr: OptimizerFactory = functools.partial(torch.optim.SGD, lr="fast")  # E: arg-type
    too_narrow: OptimizerFactory = narrow  # E: assignment
    an_instance: OptimizerFactory = torch.optim.SGD([torch.zeros(1)])  # E: assignment
    del wrong_lr, too_narrow, an_instance


class StringPhases:
    def on_phase_change(self, old: str, new: str) -> None:
        del old, new


class MisnamedHook:
    def on_phase_changed(self, old: Phase, new: Phase) -> None:
        del old, new


def observers(brain: Model) -> None:
    brain.add_phase_observer(StringPhases())  # E: arg-type
    brain.add_phase_observer(MisnamedHook())  # E: arg-type
    brain.add_phase_observer(lambda old, new: None)  # E: arg-type
    observer: PhaseObserver = brain  # E: assignment
    del observer


class NoDeviceCheckpointer:
    def add_recoverable(self, name: str, obj: object) -> None:
        del name, obj

    def recover_if_possible(
        self, *, max_key: str | None = None, min_key: str | None = None
    ) -> object:
        return None


def checkpointers() -> None:
    checkpointer: CheckpointerLike = NoDeviceCheckpointer()  # E: assignment
    del checkpointer

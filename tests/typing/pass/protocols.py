"""The protocols a brain consumes: ``Stateful``, ``OptimizerFactory``, ``PhaseObserver``,
``CheckpointerLike``. Torch's own objects and plain callables satisfy them structurally.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, assert_type

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from typedbrain import (
    Brain,
    CheckpointerLike,
    CheckpointInfo,
    EpochCounter,
    EpochCounterWithStopper,
    OptimizerFactory,
    Phase,
    PhaseObserver,
    Stateful,
)


class Model(Brain[Tensor, Tensor]):
    pass


# ------------------------------------------------------------------------------------------
# Stateful


class Counter:
    """A user object with the two methods, and looser parameter types than the protocol."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        count = state["count"]
        self.count = count if isinstance(count, int) else 0


def torch_objects_are_stateful() -> list[Stateful]:
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    recoverables: list[Stateful] = [
        module,
        torch.nn.Sequential(module, torch.nn.ReLU()),
        optimizer,
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=1),
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer),
        torch.amp.GradScaler("cpu"),
        EpochCounter(limit=3),
        EpochCounterWithStopper(limit=3, limit_to_stop=1),
        Counter(),
    ]
    scheduler: Stateful = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    recoverables.append(scheduler)
    return recoverables


def stateful_is_runtime_checkable(candidate: object) -> None:
    if isinstance(candidate, Stateful):
        assert_type(candidate, Stateful)
        assert_type(candidate.state_dict(), Mapping[str, object])


# ------------------------------------------------------------------------------------------
# OptimizerFactory


def sgd(params: ParamsT) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def optimizer_factories() -> list[OptimizerFactory]:
    factories: list[OptimizerFactory] = [
        lambda params: torch.optim.SGD(params, lr=0.1),
        functools.partial(torch.optim.Adam, lr=1e-3),
        functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
        torch.optim.Adam,  # the class itself: every argument but the parameters has a default
        sgd,
    ]
    adam: OptimizerFactory = functools.partial(torch.optim.Adam, lr=1e-3)
    Model(modules={"lin": torch.nn.Linear(1, 1)}, opt_class=adam)
    Model(opt_class=lambda params: torch.optim.SGD(params, lr=0.1))
    Model(opt_class=functools.partial(torch.optim.Adam, lr=1e-3))
    assert_type(adam(torch.nn.Linear(1, 1).parameters()), torch.optim.Optimizer)
    return factories


# ------------------------------------------------------------------------------------------
# PhaseObserver


class PhaseLog:
    def __init__(self) -> None:
        self.changes: list[tuple[Phase, Phase]] = []

    def on_phase_change(self, old: Phase, new: Phase) -> None:
        self.changes.append((old, new))


class LenientObserver:
    """Wider parameter types still fit."""

    def on_phase_change(self, old: object, new: object) -> None:
        del old, new


def observers() -> None:
    observer: PhaseObserver = PhaseLog()
    brain = Model()
    brain.add_phase_observer(observer)
    brain.add_phase_observer(LenientObserver())
    brain.remove_phase_observer(observer)


# ------------------------------------------------------------------------------------------
# CheckpointerLike


class InMemoryCheckpointer:
    def __init__(self) -> None:
        self.recoverables: dict[str, object] = {}

    def add_recoverable(self, name: str, obj: object) -> None:
        self.recoverables[name] = obj

    def recover_if_possible(
        self,
        *,
        max_key: str | None = None,
        min_key: str | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Any] | None:
        del max_key, min_key, device
        return None

    def save_and_keep_only(
        self,
        *,
        meta: Mapping[str, object] | None = None,
        end_of_epoch: bool = True,
        num_to_keep: int = 1,
        ckpt_predicate: Callable[[CheckpointInfo], bool] | None = None,
    ) -> None:
        del meta, end_of_epoch, num_to_keep, ckpt_predicate


def checkpointers() -> None:
    checkpointer: CheckpointerLike = InMemoryCheckpointer()
    Model(checkpointer=checkpointer)
    Model(modules={"lin": torch.nn.Linear(1, 1)}, checkpointer=InMemoryCheckpointer())

"""Run options as brain attributes keep their types; read-only state cannot be assigned."""

from __future__ import annotations

import torch
from torch import Tensor

from typedbrain import Brain, Phase, Stage


class Model(Brain[Tensor, Tensor]):
    pass


def assign_options(brain: Model) -> None:
    brain.max_grad_norm = "x"  # E: assignment
    brain.precision = "fp64"  # E: assignment
    brain.debug_batches = 2.5  # E: assignment
    brain.jit_module_keys = ["encoder"]  # E: assignment
    brain.optimizer_step_limit = "10"  # E: assignment
    brain.run_opts = {"debug": True}  # E: assignment


def read_only_state(brain: Model) -> None:
    brain.device = "cpu"  # E: misc
    brain.phase = Phase.IDLE  # E: misc
    brain.optimizer = torch.nn.Linear(1, 1)  # E: assignment


def entry_points(brain: Model, data: list[Tensor]) -> None:
    brain.fit(10, data)  # E: arg-type
    brain.fit(range(3), data, progressbar="yes")  # E: arg-type
    brain.fit(range(3), data, train_loader_kwargs={"batch_sise": 4})  # E: arg-type
    brain.make_dataloader(data, Stage.TRAIN, batch_sise=4)  # E: call-arg
    brain.make_dataloader(data, "train")  # E: arg-type
    loss: str = brain.evaluate(data)  # E: assignment
    brain.evaluate(data, max_key=1)  # E: arg-type
    del loss


def constructor(brain: Model) -> None:
    Model(modules=[torch.nn.Linear(1, 1)])  # E: call-overload
    Model(opt_class=torch.optim.SGD(brain.modules.parameters()))  # E: call-overload

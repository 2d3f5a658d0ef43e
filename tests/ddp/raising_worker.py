"""One rank of a 2-process job in which rank 1 raises in a forward pass while rank 0 trains on:
``python -m tests.ddp.raising_worker WAY`` under torchrun's environment.

Rank 0 is then blocked in DDP's gradient all-reduce, which rank 1 never joins. The job must end
at once with rank 1's error, not after the process group's timeout (30 minutes):

    atexit: the brain joins the group itself (``init_distributed``); the group is torn down
        by the exit hook that registers.
    finally: the script makes the group and calls ``shutdown_distributed`` in a ``finally:``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor

import typedbrain as sb
from tests.ddp.worker import Batch, examples, model
from typedbrain._launch import shutdown_distributed


class FailsOnRankOne(sb.Brain[Batch, Tensor]):
    def compute_forward(self, batch: Batch, stage: sb.Stage) -> Tensor:
        if dist.get_rank() == 1 and self.step == 2:
            raise ValueError("rank 1 fails in its second forward pass")
        predictions: Tensor = self.modules["model"](batch[0])
        return predictions

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: sb.Stage) -> Tensor:
        return torch.nn.functional.mse_loss(predictions, batch[1])


def train() -> None:
    brain = FailsOnRankOne(
        {"model": model()},
        lambda params: torch.optim.SGD(params, lr=0.05),
        run_opts={"device": "cpu", "distributed_backend": "gloo", "noprogressbar": True},
    )
    brain.fit(range(1, 3), examples(24), train_loader_kwargs={"batch_size": 2})


def main(way: str) -> None:
    torch.set_num_threads(1)
    if way == "atexit":
        train()
        return
    dist.init_process_group("gloo")
    try:
        train()
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])

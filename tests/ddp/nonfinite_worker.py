"""One rank of a 2-process job in which rank 1 alone meets a non-finite loss:
``python -m tests.ddp.nonfinite_worker ACCUMULATION STEP PATIENCE OUT [fsdp]`` under torchrun's
environment (the model is wrapped in DDP, or sharded with FSDP2 given ``fsdp``).

Rank 1's loss is NaN at training batch STEP of the first epoch; the brain trains with
``grad_accumulation_factor=ACCUMULATION`` and ``nonfinite_patience=PATIENCE`` and each rank
writes ``OUT.<rank>``: its parameters and its count of non-finite losses.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

import typedbrain as sb
from tests.ddp.worker import Batch, examples, model
from typedbrain._launch import shutdown_distributed


class NaNOnRankOne(sb.Brain[Batch, Tensor]):
    nan_step = 0

    def compute_forward(self, batch: Batch, stage: sb.Stage) -> Tensor:
        predictions: Tensor = self.modules["model"](batch[0])
        return predictions

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: sb.Stage) -> Tensor:
        loss = torch.nn.functional.mse_loss(predictions, batch[1])
        if dist.get_rank() == 1 and self._epoch == 1 and self.step == self.nan_step:
            loss = loss * float("nan")
        return loss

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is sb.Stage.TRAIN and epoch == 1:
            self.first_epoch_nonfinite = self.nonfinite_count

    first_epoch_nonfinite = -1


def main(accumulation: int, step: int, patience: int, out: str, *, fsdp: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        module = model()
        brain = NaNOnRankOne(
            {"model": module},
            lambda params: torch.optim.SGD(params, lr=0.05),
            run_opts={
                "device": "cpu",
                "noprogressbar": True,
                "grad_accumulation_factor": accumulation,
                "nonfinite_patience": patience,
                "fsdp": fsdp,
            },
        )
        brain.nan_step = step
        brain.fit(range(1, 3), examples(24), train_loader_kwargs={"batch_size": 2})
        result = {
            "parameters": [
                parameter.full_tensor() if isinstance(parameter, DTensor) else parameter.detach()
                for parameter in module.parameters()
            ],
            "nonfinite": brain.first_epoch_nonfinite,
        }
        torch.save(result, f"{out}.{dist.get_rank()}")
        dist.barrier()  # leave together (see tests/ddp/resume_worker.py)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], fsdp="fsdp" in sys.argv)

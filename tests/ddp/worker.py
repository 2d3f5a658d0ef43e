"""One rank of a 2-process test job: ``python -m tests.ddp.worker MODE OUT`` under torchrun's env.

Modes:
    train: train a small regression model on 24 examples, writing the final parameters.
    batchnorm-sync, batchnorm-local: train a model with a batch norm layer, with and without
        ``sync_batchnorm``, writing the layer's type and running mean.
    evaluate-24, evaluate-25: evaluate a fixed model on 24 or 25 examples, writing the mean
        loss and the number of examples this rank and all ranks saw.
    own-average-25: evaluate on 25 examples with an ``update_average`` override that keeps its
        own mean (the brain counts nothing), writing the loss and this rank's batch losses.
    timed-checkpoints: train with an intra-epoch checkpoint every 0.6 s while rank 0 alone is
        slow after one batch, writing the steps after which this rank saved.

The process group is initialised from the environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), as ``torchrun`` sets it; each rank writes ``OUT.<rank>``.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from torch import Tensor

import typedbrain as sb
from typedbrain._launch import shutdown_distributed

Batch = tuple[Tensor, Tensor]
FEATURES = 3


def examples(count: int) -> list[Batch]:
    """``count`` fixed (input, target) pairs: the same on every rank and in every process."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(count, FEATURES, generator=generator)
    targets = inputs.sum(dim=1, keepdim=True) + 0.1 * torch.randn(count, 1, generator=generator)
    return [(inputs[index], targets[index]) for index in range(count)]


def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Linear(FEATURES, 1)


class Regressor(sb.Brain[Batch, Tensor]):
    def compute_forward(self, batch: Batch, stage: sb.Stage) -> Tensor:
        predictions: Tensor = self.modules["model"](batch[0])
        return predictions

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: sb.Stage) -> Tensor:
        if stage is not sb.Stage.TRAIN:
            self.seen += len(batch[1])
        return torch.nn.functional.mse_loss(predictions, batch[1])

    seen = 0


def brain(module: torch.nn.Module) -> Regressor:
    return Regressor(
        {"model": module},
        lambda params: torch.optim.SGD(params, lr=0.05),
        run_opts={"device": "cpu", "max_grad_norm": 0.0, "noprogressbar": True},
    )


def train(batch_size: int) -> torch.nn.Module:
    module = model()
    brain(module).fit(range(3), examples(24), train_loader_kwargs={"batch_size": batch_size})
    return module


def evaluate(count: int, batch_size: int) -> tuple[float, int]:
    evaluator = brain(model())
    loss = evaluator.evaluate(examples(count), test_loader_kwargs={"batch_size": batch_size})
    return loss, evaluator.seen


class OwnAverage(Regressor):
    """Averages as an older recipe might: its own running mean, no call to the brain's."""

    batch_losses: list[float]

    def update_average(self, loss: Tensor | float, avg_loss: float) -> float:
        value = float(loss)
        self.batch_losses.append(value)
        return avg_loss + (value - avg_loss) / self.step


def evaluate_own_average(count: int) -> dict[str, object]:
    evaluator = OwnAverage(
        {"model": model()},
        lambda params: torch.optim.SGD(params, lr=0.05),
        run_opts={"device": "cpu", "noprogressbar": True},
    )
    evaluator.batch_losses = []
    loss = evaluator.evaluate(examples(count), test_loader_kwargs={"batch_size": 4})
    return {"loss": loss, "batch_losses": evaluator.batch_losses}


def batchnorm_statistics(sync: bool) -> dict[str, object]:
    """Train a model with a batch norm layer for an epoch; its layer type and running mean."""
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Linear(FEATURES, 2), torch.nn.BatchNorm1d(2))
    trainer = Regressor(
        {"model": module},
        lambda params: torch.optim.SGD(params, lr=0.05),
        run_opts={"device": "cpu", "noprogressbar": True, "sync_batchnorm": sync},
    )
    pairs = [(inputs, targets.expand(2)) for inputs, targets in examples(24)]
    trainer.fit(range(1), pairs, train_loader_kwargs={"batch_size": 4})
    return {"layer": type(module[1]).__name__, "running_mean": module[1].running_mean}


class _SaveLog:
    """A recoverable that records the step of every save it takes part in."""

    def __init__(self) -> None:
        self.brain: Regressor | None = None
        self.saved_at: list[int] = []

    def state_dict(self) -> dict[str, int]:
        assert self.brain is not None
        self.saved_at.append(self.brain.step)
        return {"saves": len(self.saved_at)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        del state


class _SlowOnMain(Regressor):
    def on_fit_batch_end(
        self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
    ) -> None:
        if dist.get_rank() == 0 and self.step == 3:
            time.sleep(1.0)  # the main process alone logs something slow, say


def timed_checkpoints(folder: str) -> list[int]:
    """Train with time-based intra-epoch checkpoints; the steps after which this rank saved."""
    module = model()
    log = _SaveLog()
    trainer = _SlowOnMain(
        {"model": module},
        lambda params: torch.optim.SGD(params, lr=0.05),
        checkpointer=sb.Checkpointer(folder, {"model": module, "log": log}),
        run_opts={"device": "cpu", "noprogressbar": True, "ckpt_interval_minutes": 0.01},
    )
    log.brain = trainer
    trainer.fit(range(1), examples(48), train_loader_kwargs={"batch_size": 2})
    return log.saved_at


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        if mode == "train":
            result: object = train(batch_size=4).state_dict()
        elif mode == "timed-checkpoints":
            result = {"saved_at": timed_checkpoints(f"{out}.save")}
        elif mode == "own-average-25":
            result = evaluate_own_average(25)
        elif mode.startswith("batchnorm-"):
            result = batchnorm_statistics(sync=mode == "batchnorm-sync")
        else:
            loss, seen = evaluate(int(mode.removeprefix("evaluate-")), batch_size=4)
            total = torch.tensor([seen])
            dist.all_reduce(total)
            result = {"loss": loss, "seen": seen, "total": int(total.item())}
        torch.save(result, f"{out}.{rank}")
        dist.barrier()  # leave together (see tests/ddp/resume_worker.py)
    finally:
        # After a success every process waits for the others before the group goes (one
        # that tore its connections down first could make gloo abort a peer); on a failure
        # it does not wait, as peers may be blocked in a collective it will never join.
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

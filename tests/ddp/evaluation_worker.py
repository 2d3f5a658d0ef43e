"""One rank of a 2-process job whose evaluation stages give the ranks unequal numbers of batches.

``python -m tests.ddp.evaluation_worker MODE OUT`` under torchrun's environment; each rank
writes ``OUT.<rank>``. Validation and test shards are not padded, so with a set of one example
rank 1 has no batch at all; with five examples in batches of one, rank 0 has three and rank 1
two. A forward pass that made a collective (DDP's buffer broadcast, FSDP2's all-gather) would
leave a rank waiting for a peer that has no batch left.

Modes:
    batchnorm-fit: a model with a batch norm layer (buffers, so DDP broadcasts them) trained
        for 2 epochs twice from the same start, without and then with a validation set of one
        example; writes both runs' final states, the validation losses and the loss of the
        validation example as the trained model gives it.
    batchnorm-evaluate: the same model trained for an epoch, then ``evaluate`` on 3 examples in
        batches of 2 with ``drop_last`` (rank 0 has one batch, rank 1 none); writes the test
        loss and the loss of the examples rank 0 evaluated, as the trained model gives it.
    fsdp, fsdp-nested: a model sharded with FSDP2 (``fsdp-nested``: its first layer sharded
        by the recipe before the brain shards the whole), trained for an epoch with 1 and then
        with 5 validation examples in batches of 1; writes the validation losses, the mean
        loss of the validation examples under the full (unsharded) weights, and whether the
        nested layer reshards after forward again once validation is over.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch import Tensor

import typedbrain as sb
from tests.ddp.worker import FEATURES, Batch, examples
from typedbrain._launch import shutdown_distributed


class Recorder(sb.Brain[Batch, Tensor]):
    """Regression with MSE; keeps each validation and test stage's loss."""

    def compute_forward(self, batch: Batch, stage: sb.Stage) -> Tensor:
        predictions: Tensor = self.modules["model"](batch[0])
        return predictions

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: sb.Stage) -> Tensor:
        return torch.nn.functional.mse_loss(predictions, batch[1])

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is not sb.Stage.TRAIN:
            self.losses.append(stage_loss)

    losses: list[float]


def recorder(module: torch.nn.Module, *, fsdp: bool = False) -> Recorder:
    brain = Recorder(
        {"model": module},
        lambda params: torch.optim.SGD(params, lr=0.05),
        run_opts={"device": "cpu", "max_grad_norm": 0.0, "noprogressbar": True, "fsdp": fsdp},
    )
    brain.losses = []
    return brain


def batchnorm_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    )


def loss_of(module: torch.nn.Module, batch: list[Batch]) -> float:
    """The MSE of ``module`` (in eval mode) over ``batch``, computed here, in one process."""
    inputs = torch.stack([example[0] for example in batch])
    targets = torch.stack([example[1] for example in batch])
    module.eval()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(module(inputs), targets))


def state_of(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def batchnorm_fit() -> dict[str, object]:
    alone = batchnorm_model()
    recorder(alone).fit(range(2), examples(8), train_loader_kwargs={"batch_size": 2})
    validated = batchnorm_model()
    brain = recorder(validated)
    brain.fit(
        range(2),
        examples(8),
        examples(1),
        train_loader_kwargs={"batch_size": 2},
        valid_loader_kwargs={"batch_size": 1},
    )
    return {
        "without_validation": state_of(alone),
        "with_validation": state_of(validated),
        "losses": brain.losses,
        "example_loss": loss_of(validated, examples(1)),
    }


def batchnorm_evaluate() -> dict[str, object]:
    module = batchnorm_model()
    brain = recorder(module)
    brain.fit(range(1), examples(8), train_loader_kwargs={"batch_size": 2})
    loss = brain.evaluate(examples(3), test_loader_kwargs={"batch_size": 2, "drop_last": True})
    test_set = examples(3)
    return {"loss": loss, "rank_0_examples_loss": loss_of(module, [test_set[0], test_set[2]])}


def fsdp(nested: bool) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    from typedbrain._modules import _param_groups

    result: dict[str, object] = {}
    for count in (1, 5):
        torch.manual_seed(1)
        module = torch.nn.Sequential(torch.nn.Linear(FEATURES, 4), torch.nn.Linear(4, 1))
        if nested:
            fully_shard(module[0], mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
        brain = recorder(module, fsdp=True)
        brain.fit(
            range(1),
            examples(8),
            examples(count),
            train_loader_kwargs={"batch_size": 2},
            valid_loader_kwargs={"batch_size": 1},
        )
        full = {
            name: value.full_tensor() if isinstance(value, DTensor) else value
            for name, value in module.state_dict().items()
        }
        plain = torch.nn.Sequential(torch.nn.Linear(FEATURES, 4), torch.nn.Linear(4, 1))
        plain.load_state_dict(full)
        per_example = [loss_of(copy.deepcopy(plain), [example]) for example in examples(count)]
        result[f"losses_{count}"] = brain.losses
        result[f"example_mean_{count}"] = sum(per_example) / count
        if nested:
            assert isinstance(module[0], FSDPModule)
            result[f"nested_reshards_{count}"] = all(
                group.post_forward_mesh_info is not None for group in _param_groups(module[0])
            )
    return result


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if mode == "batchnorm-fit":
            result = batchnorm_fit()
        elif mode == "batchnorm-evaluate":
            result = batchnorm_evaluate()
        else:
            result = fsdp(nested=mode == "fsdp-nested")
        torch.save(result, f"{out}.{dist.get_rank()}")
        dist.barrier()  # leave together (see tests/ddp/resume_worker.py)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

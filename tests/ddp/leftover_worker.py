"""One rank of a 2-process job whose epoch ends with a window the loop steps after it:
``python -m tests.ddp.leftover_worker BATCHES SIZED OUT`` under torchrun's environment.

Each rank trains one epoch of BATCHES batches of its own (rank-dependent) examples with
``grad_accumulation_factor=2`` in a DDP-wrapped model, through a loader with a length (SIZED
``sized``: the last window is known as it comes) or without (``unsized``: an IterableDataset,
whose leftover window is stepped after the loop), and writes ``OUT.<rank>``: its parameters.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import cast

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tests.ddp.worker import Batch, Regressor, examples, model
from typedbrain._launch import shutdown_distributed


class RankBatches(IterableDataset[Batch]):
    """This rank's ``count`` examples, one per batch, with no length."""

    def __init__(self, count: int) -> None:
        rank = dist.get_rank()
        self.items = examples(2 * count)[rank * count : (rank + 1) * count]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.items)


def main(batches: int, sized: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        module = model()
        brain = Regressor(
            {"model": module},
            lambda params: torch.optim.SGD(params, lr=0.05),
            run_opts={"device": "cpu", "noprogressbar": True, "grad_accumulation_factor": 2},
        )
        data = RankBatches(batches)
        loader: DataLoader[Batch] = (
            DataLoader(cast(Dataset[Batch], data.items), batch_size=None)
            if sized
            else DataLoader(data, batch_size=None)
        )
        brain.fit(range(1, 2), loader)
        parameters = [parameter.detach() for parameter in module.parameters()]
        torch.save({"parameters": parameters}, f"{out}.{dist.get_rank()}")
        dist.barrier()  # leave together (see tests/ddp/resume_worker.py)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "sized", sys.argv[3])

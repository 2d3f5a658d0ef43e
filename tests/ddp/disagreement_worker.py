"""One rank of a 2-process job whose ranks disagree on how to train:
``python -m tests.ddp.disagreement_worker WHAT`` under torchrun's environment.

WHAT is what rank 1 does differently from rank 0: ``examples`` (20 training examples, not 16),
``batch-size`` (4, not 2), ``accumulation`` (``grad_accumulation_factor`` 2, not 1) or
``epochs`` (3 epochs, not 2, as a per-rank early-stopping decision would). Each rank trains a
linear model (with a validation set of 4 examples) and prints ``DONE`` if ``fit`` returns.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from tests.ddp.worker import Regressor, examples, model
from typedbrain._launch import shutdown_distributed


def main(what: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        odd = dist.get_rank() == 1
        brain = Regressor(
            {"model": model()},
            lambda params: torch.optim.SGD(params, lr=0.05),
            run_opts={
                "device": "cpu",
                "noprogressbar": True,
                "grad_accumulation_factor": 2 if odd and what == "accumulation" else 1,
            },
        )
        brain.fit(
            range(3 if odd and what == "epochs" else 2),
            examples(20 if odd and what == "examples" else 16),
            examples(4),
            train_loader_kwargs={"batch_size": 4 if odd and what == "batch-size" else 2},
        )
        print("DONE", flush=True)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])

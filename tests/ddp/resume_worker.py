"""One rank of the resume harness under torch.distributed: ``python -m tests.ddp.resume_worker
CONFIG FOLDER OUT [STOP_AT]``.

CONFIG is a JSON :class:`~tests.resume_harness.RunConfig`; every rank checkpoints into FOLDER
(the main process writes), crashes at forward pass STOP_AT if given (every rank at the same
pass, as a job-wide failure would), and writes its final state to ``OUT.<rank>`` when the run
completes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Final

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.resume_harness import RunConfig, SimulatedCrashError, final_state, run
from typedbrain import TrainingInterruptedError
from typedbrain._launch import shutdown_distributed
from typedbrain._sharded_state import gathered as full_state
from typedbrain._state import converter

STOPPED_SUFFIX: Final = ".stopped.json"
"""A rank stopped by ``TrainingInterruptedError`` records it in ``OUT.<rank>`` + this.

The exit status says it too, but a rank can still be aborted by gloo while the group is torn
down (a peer that closed its connections first), which replaces its exit status.
"""


def main(argv: list[str]) -> int:
    config_path, folder, out, *rest = argv
    config = converter.structure(json.loads(Path(config_path).read_text()), RunConfig)
    stop_at = int(rest[0]) if rest else None
    # nccl for a CUDA run (tests/test_cuda.py), gloo on CPU. Made here rather than by the
    # brain so that a single rank (torchrun --nproc_per_node 1) has a group too.
    if config.device.startswith("cuda"):
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        try:
            brain = run(config, Path(folder), stop_at=stop_at)
        except SimulatedCrashError:
            dist.barrier()  # every rank crashed at the same pass; leave together
            return 3
        except TrainingInterruptedError as stopped:
            # What this rank saw, written before the group is torn down (see STOPPED_SUFFIX).
            outcome = {"signal": stopped.signal, "checkpoint_saved": stopped.checkpoint_saved}
            Path(f"{out}.{dist.get_rank()}{STOPPED_SUFFIX}").write_text(json.dumps(outcome))
            dist.barrier()  # every rank stopped after the same batch; leave together
            return 128 + stopped.signal
        # Sharded (FSDP2) tensors are saved whole, as a checkpoint saves them.
        state = full_state(final_state(brain))
        assert isinstance(state, dict)
        state["sharded"] = any(
            isinstance(parameter, DTensor) for parameter in brain.modules.parameters()
        )
        torch.save(state, f"{out}.{dist.get_rank()}")
        # Leave together: a rank that tears its group down while the other still talks to it
        # can make gloo abort the other process.
        dist.barrier()
        return 0
    finally:
        # After a success every process waits for the others before the group goes (one
        # that tore its connections down first could make gloo abort a peer); on a failure
        # it does not wait, as peers may be blocked in a collective it will never join.
        shutdown_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))

"""One rank of a distributed test: ``python -m tests.distributed.worker SCENARIO``.

It is started once per rank, with the variables torchrun sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), or by torchrun itself. It prints ``READY`` when
its process group is up and, at the end, one line ``RESULT <json>`` with what it observed; the
test reads both from its output. ``TB_TIMEOUT`` is the process group's timeout in seconds.

Exit status: 0 when the scenario ran through, 3 when it stopped on a ``DistributedError`` (the
``RESULT`` line says which), anything else on an unexpected error (its traceback is printed).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final
from unittest import mock

import torch
import torch.distributed as dist

import typedbrain._distributed
from typedbrain._distributed import (
    all_gather_object,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    is_distributed,
    main_process_only,
    run_on_main,
)
from typedbrain._errors import DistributedError
from typedbrain._launch import device_for, init_distributed, shutdown_distributed

STOPPED_ON_DISTRIBUTED_ERROR: Final = 3

Result = dict[str, object]


def say(line: str) -> None:
    # One write call, shorter than a pipe's atomic size: under torchrun both ranks share the
    # launcher's stdout, and print's separate writes could interleave inside a line.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def report(result: Result) -> None:
    say("RESULT " + json.dumps(result))


def ready() -> None:
    say("READY")


def timeout() -> float:
    return float(os.environ.get("TB_TIMEOUT", "10"))


def scratch() -> Path:
    return Path(os.environ["TB_SCRATCH"])


def collectives() -> Result:
    # nccl on a CPU process must become gloo; a second call must leave the group alone.
    launch = init_distributed(backend="nccl", timeout=timeout())
    again = init_distributed(backend="gloo")
    assert launch is not None
    rank = launch.rank
    ready()
    source = torch.tensor([rank + 1.0, 10.0 * rank])
    summed = all_reduce_sum(source)
    calls: list[int] = []

    @main_process_only
    def answer(value: int) -> int:
        calls.append(value)
        return value * 2

    marker = scratch() / "prepared.txt"
    seen_by_post: list[bool] = []

    def prepare(text: str) -> None:
        time.sleep(0.5)  # the other rank must wait for this, not read a missing file
        marker.write_text(text)

    def load() -> None:
        seen_by_post.append(marker.read_text() == "prepared")

    run_on_main(prepare, args=("prepared",), post_func=load)
    barrier(timeout=5)
    result: Result = {
        "rank": rank,
        "launch": [launch.rank, launch.local_rank, launch.world_size, launch.master_port],
        "idempotent": again == launch,
        "backend": dist.get_backend(),
        "device": device_for(launch),
        "world_size": get_world_size(),
        "broadcast": broadcast_object({"from": rank, "items": [rank] * 3}, src=1),
        "gathered": all_gather_object(f"rank{rank}"),
        "sum": summed.tolist(),
        "source_after": source.tolist(),
        "mean": all_reduce_mean(torch.tensor([rank + 1])).tolist(),
        "main_only": [answer(21), calls],
        "post_func_saw_file": seen_by_post,
    }
    shutdown_distributed()
    shutdown_distributed()
    result["after_shutdown"] = [is_distributed(), get_world_size()]
    return result


def catch(action: Callable[[], None]) -> list[str]:
    try:
        action()
    except Exception as error:  # the test looks at which error each rank got
        return [type(error).__name__, str(error)]
    return ["no error", ""]


def prepare_fails() -> None:
    raise ValueError("no data here")


def nothing() -> None:
    pass


def load_fails_on_rank_1() -> None:
    if get_rank() == 1:
        raise KeyError("missing shard")


def failures() -> Result:
    launch = init_distributed(timeout=timeout())
    assert launch is not None
    ready()
    main_failed = catch(lambda: run_on_main(prepare_fails))
    post_failed = catch(lambda: run_on_main(nothing, post_func=load_fails_on_rank_1))
    # Neither failure broke the process group: a collective still works.
    still_usable = all_gather_object(launch.rank)
    shutdown_distributed()
    return {
        "rank": launch.rank,
        "main_failed": main_failed,
        "post_failed": post_failed,
        "still_usable": still_usable,
    }


def die_now() -> None:
    os._exit(1)


def dead_peer() -> Result:
    """``TB_VICTIM`` dies: in a barrier's place, or inside the ``run_on_main`` function."""
    launch = init_distributed(timeout=timeout())
    assert launch is not None
    victim = int(os.environ["TB_VICTIM"])
    operation = os.environ["TB_OPERATION"]
    barrier()  # both ranks are up before one of them dies
    ready()
    if operation == "barrier":
        if launch.rank == victim:
            die_now()
        barrier()
    elif operation == "run_on_main":
        run_on_main(die_now)
    elif operation == "all_reduce_sum":
        if launch.rank == victim:
            die_now()
        all_reduce_sum(torch.ones(3))
    return {"rank": launch.rank, "error": "none"}


def stuck_peer() -> Result:
    """Rank 1 stops answering (sleeps); rank 0 waits in a barrier with ``TB_BARRIER_TIMEOUT``."""
    launch = init_distributed(timeout=timeout())
    assert launch is not None
    barrier()
    ready()
    if launch.rank == 1:
        time.sleep(120)  # the test kills it long before
    call_timeout = os.environ.get("TB_BARRIER_TIMEOUT")
    with contextlib.ExitStack() as stack:
        if os.environ.get("TB_BARRIER_WITHOUT_TIMEOUT"):
            # As under a torch whose dist.barrier takes no timeout, whatever this one does.
            stack.enter_context(
                mock.patch.object(
                    typedbrain._distributed, "_barrier_takes_timeout", return_value=False
                )
            )
        barrier(timeout=None if call_timeout is None else float(call_timeout))
    return {"rank": launch.rank, "error": "none"}


def fsdp() -> Result:
    """One SGD step of a ``fully_shard``-ed Linear, compared with the same step unsharded."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    launch = init_distributed(timeout=timeout())
    assert launch is not None
    ready()
    world = launch.world_size
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    reference = copy.deepcopy(model)
    initial = model.weight.detach().clone()
    inputs = [
        torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)
    ]

    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.autograd.backward(model(inputs[launch.rank]).sum())
    optimizer.step()

    # FSDP averages the gradients over ranks: the unsharded step uses the mean of the losses.
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference_losses = [reference(x).sum() for x in inputs]
    torch.autograd.backward(torch.stack(reference_losses).mean())
    reference_optimizer.step()

    differences: list[float] = []
    kinds: list[str] = []
    local_shapes: list[list[int]] = []
    for (name, sharded), expected in zip(
        model.named_parameters(), reference.parameters(), strict=True
    ):
        kinds.append(f"{name}:{type(sharded).__name__}")
        assert isinstance(sharded, DTensor)
        local_shapes.append(list(sharded.to_local().shape))
        differences.append(float((sharded.full_tensor() - expected).abs().max()))
    shutdown_distributed()
    return {
        "rank": launch.rank,
        "kinds": kinds,
        "local_shapes": local_shapes,
        "max_difference": max(differences),
        "step_moved_weights": bool((reference.weight != initial).any()),
    }


def bool_reductions() -> Result:
    """Sum and mean of ``[True, rank == 0]``: every rank holds True, then rank 0 alone does."""
    launch = init_distributed(timeout=timeout())
    assert launch is not None
    ready()
    flags = torch.tensor([True, launch.rank == 0])
    summed = all_reduce_sum(flags)
    mean = all_reduce_mean(flags)
    shutdown_distributed()
    return {
        "rank": launch.rank,
        "sum": [str(summed.dtype), summed.tolist()],
        "mean": [str(mean.dtype), mean.tolist()],
    }


SCENARIOS: Final[dict[str, Callable[[], Result]]] = {
    "bool_reductions": bool_reductions,
    "collectives": collectives,
    "failures": failures,
    "dead_peer": dead_peer,
    "stuck_peer": stuck_peer,
    "fsdp": fsdp,
}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    scenario = SCENARIOS[argv[0]]
    try:
        result = scenario()
    except DistributedError as error:
        report(
            {
                "rank": error.rank,
                "error": type(error).__name__,
                "operation": error.operation,
                "message": str(error),
            }
        )
        return STOPPED_ON_DISTRIBUTED_ERROR
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

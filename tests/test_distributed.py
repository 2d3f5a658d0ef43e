"""Launch detection, process-group set-up and the rank helpers, on one process and on two.

The multi-process tests start two ranks on the gloo backend over 127.0.0.1, as torchrun would
(see tests/distributed/). A rank that fails must make the other one exit: each such test bounds
the time the survivor may take once both are up, and kills every process it started.
"""

from __future__ import annotations

import ast
import datetime
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import (
    STARTUP_SECONDS,
    Process,
    base_environment,
    finish,
    free_port,
    ranks,
    wait_ready,
)
from tests.helpers import python_blocks
from typedbrain._distributed import (
    _reduction_device,
    all_gather_object,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    get_world_size,
    is_distributed,
    main_process_only,
    run_on_main,
)
from typedbrain._errors import ConfigurationError, DistributedError, TypedBrainError
from typedbrain._launch import (
    LaunchInfo,
    detect_launch,
    device_for,
    init_distributed,
    select_backend,
    shutdown_distributed,
)
from typedbrain._modules import cpu_fsdp_problem

TORCHRUN_ENV = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "MASTER_ADDR": "node0.example",
    "MASTER_PORT": "29500",
}
STOPPED_ON_DISTRIBUTED_ERROR = 3
# Once both ranks are up, how long the survivor may take beyond the timeout that applies.
MARGIN_SECONDS = 6.0

# ---------------------------------------------------------------------------------------------
# Launch detection


def test_detect_launch_reads_every_torchrun_variable() -> None:
    assert detect_launch(TORCHRUN_ENV) == LaunchInfo(
        rank=3, local_rank=1, world_size=4, master_addr="node0.example", master_port=29500
    )


def test_detect_launch_is_none_without_world_size() -> None:
    assert detect_launch({"RANK": "0", "LOCAL_RANK": "0"}) is None


def test_detect_launch_is_none_for_a_world_of_one() -> None:
    # torchrun --nproc_per_node 1 sets WORLD_SIZE=1: a single process, no group needed.
    assert (
        detect_launch({**TORCHRUN_ENV, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None
    )


def test_detect_launch_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    launch = detect_launch()
    assert launch is not None
    assert (launch.rank, launch.world_size, launch.is_main) == (3, 4, False)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WORLD_SIZE", "two"),
        ("WORLD_SIZE", "0"),
        ("RANK", None),
        ("RANK", "4"),
        ("RANK", "-1"),
        ("LOCAL_RANK", None),
        ("LOCAL_RANK", "x"),
        ("MASTER_ADDR", None),
        ("MASTER_ADDR", " "),
        ("MASTER_PORT", None),
        ("MASTER_PORT", "70000"),
        ("MASTER_PORT", "port"),
    ],
)
def test_detect_launch_names_a_bad_variable(variable: str, value: str | None) -> None:
    env = dict(TORCHRUN_ENV)
    if value is None:
        del env[variable]
    else:
        env[variable] = value
    with pytest.raises(ConfigurationError, match=variable):
        detect_launch(env)


# ---------------------------------------------------------------------------------------------
# Backend and device


def test_select_backend_picks_gloo_for_a_cpu_process() -> None:
    assert select_backend(None, "cpu") == "gloo"


def test_select_backend_turns_nccl_into_gloo_on_cpu_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="typedbrain._launch"):
        assert select_backend("nccl", "cpu") == "gloo"
    assert "using gloo instead" in caplog.text


def test_select_backend_keeps_an_explicit_gloo_or_custom_backend() -> None:
    assert select_backend("gloo", "cpu") == "gloo"
    assert select_backend("cpu:gloo,cuda:nccl", "cpu") == "cpu:gloo,cuda:nccl"


@pytest.mark.skipif(torch.distributed.is_mpi_available(), reason="this torch has MPI")
def test_select_backend_refuses_mpi_when_torch_lacks_it() -> None:
    with pytest.raises(ConfigurationError, match="'mpi' is not available"):
        select_backend("mpi", "cpu")


def test_device_for_is_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for(detect_launch(TORCHRUN_ENV)) == "cpu"
    assert device_for(None) == "cpu"


def test_device_for_is_the_local_rank_gpu_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for(detect_launch(TORCHRUN_ENV)) == "cuda:1"
    assert device_for(None) == "cuda:0"


def test_device_for_refuses_more_processes_than_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigurationError, match="LOCAL_RANK=1"):
        device_for(detect_launch(TORCHRUN_ENV))


# ---------------------------------------------------------------------------------------------
# One process: no group, every helper still works


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not is_distributed()


@pytest.mark.usefixtures("single_process")
def test_init_distributed_without_launcher_sets_up_nothing() -> None:
    assert init_distributed(backend="nccl") is None
    assert not is_distributed()
    shutdown_distributed()  # nothing to shut down: no error


@pytest.mark.usefixtures("single_process")
def test_shutdown_leaves_the_gil_to_the_backends_threads_after_destroying_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A gloo thread still freeing a finished collective's tensors needs the GIL; once the
    # interpreter finalizes it cannot have it, and the process aborted (see _THREADS_GRACE).
    import torch.distributed as dist
    from torch._C._distributed_c10d import HashStore

    import typedbrain._launch as launch

    events: list[str] = []
    real_destroy = dist.destroy_process_group

    def destroy() -> None:
        events.append("destroy")
        real_destroy()

    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    monkeypatch.setattr(time, "sleep", lambda seconds: events.append(f"sleep {seconds}"))
    dist.init_process_group("gloo", rank=0, world_size=1, store=HashStore())
    try:
        shutdown_distributed()
    finally:
        if dist.is_initialized():
            real_destroy()
    assert events == ["destroy", f"sleep {launch._THREADS_GRACE.total_seconds()}"]
    assert datetime.timedelta(milliseconds=50) <= launch._THREADS_GRACE


@pytest.mark.parametrize("timeout", [0, -1.0, datetime.timedelta(0)])
def test_init_distributed_refuses_a_timeout_that_is_not_positive(
    timeout: float | datetime.timedelta,
) -> None:
    with pytest.raises(ConfigurationError, match="timeout must be positive"):
        init_distributed(timeout=timeout)


@pytest.mark.parametrize(
    ("device", "backend"),
    [("cpu", "gloo"), ("cpu", "cpu:gloo,cuda:nccl"), ("cuda:1", "nccl"), ("cuda:0", "gloo")],
)
def test_a_tensor_is_reduced_where_it_is_when_the_backend_takes_its_device(
    device: str, backend: str
) -> None:
    """A CPU tensor under nccl alone moves to the current CUDA device (tests/test_cuda.py)."""
    assert _reduction_device(torch.device(device), backend) == torch.device(device)


@pytest.mark.usefixtures("single_process")
def test_collectives_without_group_act_on_this_process_alone() -> None:
    payload = {"a": [1, 2]}
    assert broadcast_object(payload) is payload
    assert all_gather_object(payload) == [payload]
    values = torch.tensor([1.0, 2.0])
    total = all_reduce_sum(values)
    assert total is not values
    assert torch.equal(total, values)
    assert all_reduce_mean(torch.tensor([3])).tolist() == [3.0]
    assert get_world_size() == 1
    barrier(timeout=1)


@pytest.mark.usefixtures("single_process")
def test_bool_tensors_are_counted_alone_as_with_several_processes() -> None:
    flags = torch.tensor([True, False])
    summed = all_reduce_sum(flags)
    assert summed.dtype == torch.int64  # as the reduction over processes gives it
    assert summed.tolist() == [1, 0]
    assert all_reduce_mean(flags).tolist() == [1.0, 0.0]
    assert flags.tolist() == [True, False]  # the input is left alone


@pytest.mark.usefixtures("single_process")
def test_broadcast_object_refuses_a_source_that_is_not_a_rank() -> None:
    with pytest.raises(ConfigurationError, match="source rank 1"):
        broadcast_object("x", src=1)


@pytest.mark.usefixtures("single_process")
def test_run_on_main_alone_runs_func_and_raises_its_own_error() -> None:
    calls: list[str] = []
    run_on_main(calls.append, args=("func",), post_func=calls.append, post_args=("post",))
    assert calls == ["func"]  # post_func is for the other ranks unless run_post_on_main
    run_on_main(
        calls.append, args=("f",), post_func=calls.append, post_args=("p",), run_post_on_main=True
    )
    assert calls == ["func", "f", "p"]
    error = ValueError("broken")

    def fails() -> None:
        raise error

    with pytest.raises(ValueError, match="broken") as caught:
        run_on_main(fails)
    assert caught.value is error


def test_collectives_before_the_group_is_up_under_a_launcher_are_refused(
    single_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchrun set the variables, but init_distributed has not run yet: a collective would
    # neither wait for nor hear from the other processes.
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    calls: list[str] = []

    def prepare() -> None:
        calls.append("prepare")

    collectives: list[tuple[str, Callable[[], object]]] = [
        (".prepare)", lambda: run_on_main(prepare)),
        ("barrier", barrier),
        ("broadcast_object", lambda: broadcast_object("x")),
        ("all_gather_object", lambda: all_gather_object("x")),
        ("all_reduce_sum", lambda: all_reduce_sum(torch.ones(1))),
        ("all_reduce_sum", lambda: all_reduce_mean(torch.ones(1))),
    ]
    for name, collective in collectives:
        expected = f"{name} was called on rank 3 of 4 before the process group is up"
        with pytest.raises(ConfigurationError, match=re.escape(expected)) as caught:
            collective()
        assert "init_distributed()" in str(caught.value)
    assert calls == []  # refused before func ran


def test_main_process_only_runs_on_rank_0(
    single_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    @main_process_only
    def double(value: int) -> int:
        """Twice the value."""
        calls.append(value)
        return 2 * value

    assert double(4) == 8
    monkeypatch.setenv("RANK", "1")
    assert double(5) is None
    assert calls == [4]
    assert double.__name__ == "double"
    assert double.__doc__ == "Twice the value."


def test_distributed_error_names_rank_and_operation() -> None:
    error = DistributedError("peer gone", rank=1, operation="barrier")
    assert isinstance(error, TypedBrainError)
    assert isinstance(error, RuntimeError)
    assert str(error) == "rank 1, barrier: peer gone"
    assert (error.rank, error.operation) == (1, "barrier")


# ---------------------------------------------------------------------------------------------
# Two processes on gloo


def as_list(value: object) -> list[object]:
    assert isinstance(value, list), value
    return value


def by_rank(processes: list[Process]) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    for process in processes:
        found = process.results()
        assert len(found) == 1, process.output
        results.append(found[0])
    return results


@pytest.mark.slow
def test_two_ranks_initialise_gloo_and_agree_on_collectives(tmp_path: Path) -> None:
    with ranks("collectives", tmp_path) as processes:
        assert finish(processes, STARTUP_SECONDS) == [0, 0], processes[0].output
        first, second = by_rank(processes)
    for rank, result in enumerate((first, second)):
        assert result["rank"] == rank
        assert as_list(result["launch"])[:3] == [rank, rank, 2]
        assert result["idempotent"] is True
        assert result["backend"] == "gloo"  # nccl asked for, CPU process
        assert result["device"] == "cpu"
        assert result["world_size"] == 2
        assert result["broadcast"] == {"from": 1, "items": [1, 1, 1]}
        assert result["gathered"] == ["rank0", "rank1"]
        assert result["sum"] == [3.0, 10.0]
        assert result["source_after"] == [rank + 1.0, 10.0 * rank]
        assert result["mean"] == [1.5]
        assert result["after_shutdown"] == [False, 1]
    assert first["main_only"] == [42, [21]]
    assert second["main_only"] == [None, []]
    assert first["post_func_saw_file"] == []  # post_func runs on the other ranks only
    assert second["post_func_saw_file"] == [True]  # after func finished on the main process


@pytest.mark.slow
def test_bool_tensors_are_counted_over_the_ranks_not_ored(tmp_path: Path) -> None:
    # gloo's SUM of bool tensors is a logical OR: [True, True] summed would stay [True, True],
    # and its mean over 2 ranks would be [0.5, 0.5].
    with ranks("bool_reductions", tmp_path) as processes:
        assert finish(processes, STARTUP_SECONDS) == [0, 0], processes[0].output
        results = by_rank(processes)
    for result in results:
        assert result["sum"] == ["torch.int64", [2, 1]]
        assert result["mean"] == ["torch.float32", [1.0, 0.5]]


@pytest.mark.slow
def test_a_failure_in_run_on_main_reaches_every_rank(tmp_path: Path) -> None:
    with ranks("failures", tmp_path) as processes:
        assert finish(processes, STARTUP_SECONDS) == [0, 0], processes[0].output
        main, other = by_rank(processes)
    # The main process re-raises its own error; the other rank learns what failed where.
    assert main["main_failed"] == ["ValueError", "no data here"]
    assert other["main_failed"] == [
        "DistributedError",
        "rank 1, run_on_main(prepare_fails): the main process failed in prepare_fails: "
        "ValueError: no data here",
    ]
    assert other["post_failed"] == ["KeyError", "'missing shard'"]
    kind, message = as_list(main["post_failed"])
    assert kind == "DistributedError"
    assert "rank 1 failed in load_fails_on_rank_1: KeyError" in str(message)
    assert main["still_usable"] == other["still_usable"] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("operation", "victim"),
    [("barrier", 1), ("run_on_main", 0), ("all_reduce_sum", 0)],
)
def test_a_dead_rank_makes_the_other_raise_distributed_error(
    tmp_path: Path, operation: str, victim: int
) -> None:
    group_timeout = 5.0
    extra = {"TB_TIMEOUT": str(group_timeout), "TB_OPERATION": operation, "TB_VICTIM": str(victim)}
    survivor = 1 - victim
    with ranks("dead_peer", tmp_path, extra=extra) as processes:
        wait_ready(processes)
        statuses = finish(processes, group_timeout + MARGIN_SECONDS)
        output = processes[survivor].output
        assert statuses[victim] == 1, processes[victim].output
        assert statuses[survivor] == STOPPED_ON_DISTRIBUTED_ERROR, output
        (result,) = processes[survivor].results()
    assert result["error"] == "DistributedError"
    assert result["rank"] == survivor
    expected = "run_on_main(die_now)" if operation == "run_on_main" else operation
    assert result["operation"] == expected
    assert "the collective failed: " in str(result["message"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("group_timeout", "barrier_timeout", "native"),
    [(3.0, None, True), (60.0, 2.0, True), (60.0, 2.0, False)],
    ids=["group-timeout", "barrier-timeout", "barrier-timeout-older-torch"],
)
def test_a_rank_that_stops_answering_times_the_other_out(
    tmp_path: Path, group_timeout: float, barrier_timeout: float | None, native: bool
) -> None:
    """``native``: as this torch's ``dist.barrier`` goes (its own timeout where it has one).

    ``native=False``: as under a torch whose ``dist.barrier`` takes no timeout.
    """
    extra = {"TB_TIMEOUT": str(group_timeout)}
    if barrier_timeout is not None:
        extra["TB_BARRIER_TIMEOUT"] = str(barrier_timeout)
    if not native:
        extra["TB_BARRIER_WITHOUT_TIMEOUT"] = "1"
    bound = min(group_timeout, barrier_timeout or group_timeout) + MARGIN_SECONDS
    with ranks("stuck_peer", tmp_path, extra=extra) as processes:
        wait_ready(processes)
        # Rank 1 sleeps (and is killed on leaving); rank 0 alone must give up in time.
        assert finish(processes[:1], bound) == [STOPPED_ON_DISTRIBUTED_ERROR], processes[0].output
        (result,) = processes[0].results()
        assert processes[1].popen.poll() is None  # still stuck: rank 0 did not wait for it
    assert result["error"] == "DistributedError"
    assert result["operation"] == "barrier"
    if not native:  # gloo's monitored barrier stood in, and named the rank that did not come
        assert "Rank 1 failed to pass monitoredBarrier" in str(result["message"])


@pytest.mark.slow
def test_torchrun_launch_with_two_processes(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--module",
        "tests.distributed.worker",
        "collectives",
    ]
    launcher = Process(command, base_environment({"TB_SCRATCH": str(tmp_path)}))
    try:
        assert finish([launcher], STARTUP_SECONDS) == [0], launcher.output
        results = sorted(launcher.results(), key=lambda result: str(result["rank"]))
    finally:
        launcher.kill()
    assert [result["rank"] for result in results] == [0, 1], launcher.output
    for result in results:
        assert result["gathered"] == ["rank0", "rank1"]
        assert result["sum"] == [3.0, 10.0]
        assert result["backend"] == "gloo"
        assert result["idempotent"] is True


@pytest.mark.slow
@pytest.mark.xfail(
    cpu_fsdp_problem(torch.device("cpu"), str(torch.__version__)) is not None,
    reason="before torch 2.9, fully_shard on the CPU fails (2.6) or sums the gradients (2.7, 2.8)",
)
def test_fsdp2_fully_shard_trains_on_cpu_with_gloo(tmp_path: Path) -> None:
    """FINDING (torch 2.9.1, 2.13.0, 2.14.1): ``fully_shard`` works on CPU over gloo.

    Each rank holds half of every parameter (as a DTensor), and one SGD step gives the same
    weights as the unsharded step on the mean of both ranks' losses. Recorded in
    docs/distributed.md; if a torch upgrade breaks it, this test says so. Under torch 2.6 to
    2.8 it fails (strict xfail), which is why typedbrain refuses ``fsdp`` on the CPU there.
    """
    with ranks("fsdp", tmp_path) as processes:
        assert finish(processes, STARTUP_SECONDS) == [0, 0], processes[0].output
        results = by_rank(processes)
    for result in results:
        assert result["kinds"] == ["weight:DTensor", "bias:DTensor"]
        assert result["local_shapes"] == [[1, 4], [1]]  # Linear(4, 2) split along dim 0
        assert result["step_moved_weights"] is True
        assert float(str(result["max_difference"])) < 1e-6


# ---------------------------------------------------------------------------------------------
# The page


def test_every_python_block_of_the_page_is_valid_python() -> None:
    blocks = python_blocks("docs/distributed.md")
    assert len(blocks) >= 3
    for block in blocks:
        ast.parse(block)


def test_without_a_process_group_the_mean_over_processes_is_this_processs_mean() -> None:
    from typedbrain._distributed import mean_over_processes, seed_from_main

    assert mean_over_processes(2.5, 4) == 2.5
    torch.manual_seed(3)
    first = seed_from_main()
    torch.manual_seed(3)
    assert seed_from_main() == first  # a draw from this process's torch RNG

"""The brain under torch.distributed: 2 processes, gloo, on this machine's CPU."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Literal, cast

import attrs
import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from torch._C._distributed_c10d import HashStore
from torch.distributed.tensor import DTensor

import typedbrain as sb
from tests.ddp.evaluation_worker import batchnorm_model
from tests.ddp.resume_worker import STOPPED_SUFFIX
from tests.ddp.worker import evaluate, train
from tests.resume_harness import RunConfig, differences
from tests.test_crash_resume import saves_so_far
from typedbrain._modules import (
    _param_groups,
    collective_free_forwards,
    cpu_fsdp_problem,
    sync_batchnorm,
    wrap_modules,
)
from typedbrain._options import RunOptions
from typedbrain._state import converter

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_ranks(module: str, *arguments: str, world_size: int = 2) -> list[subprocess.Popen[bytes]]:
    """Start ``world_size`` ranks of ``python -m module arguments`` as torchrun would."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *arguments],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return processes


def finish_ranks(
    processes: list[subprocess.Popen[bytes]], timeout: float = 120, *, may_abort: bool = False
) -> list[int]:
    """Wait for every rank (killing them all on a timeout); their exit statuses.

    With ``may_abort``, a rank may have been aborted by gloo (SIGABRT) after losing its peer:
    when the job was just SIGKILLed, or while the group was torn down after a stop (a peer
    that closed its connections first).
    """
    allowed = {0, 3, 128 + signal.SIGTERM, -signal.SIGKILL} | (
        {-signal.SIGABRT} if may_abort else set()
    )
    outcomes = communicate_all(processes, timeout)
    for rank, (process, (_, stderr)) in enumerate(zip(processes, outcomes, strict=True)):
        if process.returncode not in allowed:
            raise AssertionError(f"rank {rank}: {stderr.decode(errors='replace')}")
    return [process.returncode for process in processes]


def communicate_all(
    processes: list[subprocess.Popen[bytes]], timeout: float = 120
) -> list[tuple[bytes, bytes]]:
    """Every rank's (stdout, stderr) once it has ended; all are killed if one is not in time."""
    try:
        return [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def run_ranks(module: str, *arguments: str) -> None:
    assert finish_ranks(start_ranks(module, *arguments)) == [0, 0]


def load(path: Path) -> dict[str, object]:
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, dict)
    return loaded


def test_two_ranks_with_batch_b_train_like_one_process_with_batch_2b(tmp_path: Path) -> None:
    run_ranks("tests.ddp.worker", "train", str(tmp_path / "ddp"))
    expected = train(batch_size=8).state_dict()
    for rank in (0, 1):
        trained = load(tmp_path / f"ddp.{rank}")
        for name, value in expected.items():
            found = trained[name]
            assert isinstance(found, torch.Tensor)
            torch.testing.assert_close(found, value, rtol=1e-5, atol=1e-6)


def test_without_sync_batchnorm_each_rank_keeps_its_own_statistics(tmp_path: Path) -> None:
    run_ranks("tests.ddp.worker", "batchnorm-local", str(tmp_path / "bn"))
    results = [load(tmp_path / f"bn.{rank}") for rank in (0, 1)]
    assert [result["layer"] for result in results] == ["BatchNorm1d", "BatchNorm1d"]
    means = [result["running_mean"] for result in results]
    assert isinstance(means[0], torch.Tensor)
    assert isinstance(means[1], torch.Tensor)
    assert not torch.allclose(means[0], means[1])  # each rank saw other examples


def test_sync_batchnorm_on_cpu_is_a_clear_error_on_every_rank(tmp_path: Path) -> None:
    processes = start_ranks("tests.ddp.worker", "batchnorm-sync", str(tmp_path / "bn"))
    try:
        outputs = [process.communicate(timeout=120)[1].decode() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [process.returncode for process in processes] == [1, 1]
    for output in outputs:
        assert "ConfigurationError: run option sync_batchnorm=True needs CUDA devices" in output


def test_sync_batchnorm_turns_batch_norm_layers_into_synchronised_ones() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    names = list(module.state_dict())
    converted = sync_batchnorm(module)
    assert converted is module  # changed in place: a checkpointer holding it sees the change
    assert isinstance(module[1], torch.nn.SyncBatchNorm)
    assert list(module.state_dict()) == names


@pytest.mark.parametrize("version", ["2.6.0", "2.7.1+cu126", "2.8.0"])
def test_fsdp_on_the_cpu_is_refused_under_torch_before_2_9(version: str) -> None:
    # Found by running tests/test_distributed.py under these releases: 2.6 fails, 2.7 and 2.8
    # sum the ranks' gradients where 2.9+ averages them.
    problem = cpu_fsdp_problem(torch.device("cpu"), version)
    assert problem is not None
    assert f"needs torch 2.9 or newer; with torch {version}," in problem


@pytest.mark.parametrize("version", ["2.9.1", "2.10.0", "2.13.0+cpu", "3.0.0"])
def test_fsdp_on_the_cpu_is_allowed_from_torch_2_9(version: str) -> None:
    assert cpu_fsdp_problem(torch.device("cpu"), version) is None


def test_fsdp_on_a_gpu_is_not_held_to_the_cpu_limit() -> None:
    assert cpu_fsdp_problem(torch.device("cuda", 0), "2.6.0") is None


@pytest.mark.skipif(
    cpu_fsdp_problem(torch.device("cpu"), str(torch.__version__)) is not None,
    reason="typedbrain refuses fsdp on the CPU under this torch (see the tests above)",
)
def test_fsdp_shards_on_the_brains_device_where_torch_sees_an_accelerator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fully_shard's default mesh is on the machine's accelerator: stand in for a machine with a
    # GPU, on which a brain told to compute on the CPU must still get CPU shards. (Seen on an
    # H100: an FSDP2 job on the CPU failed there.)
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))

    def check() -> None:
        modules = torch.nn.ModuleDict({"model": torch.nn.Linear(4, 2)})
        wrap_modules(modules, RunOptions(fsdp=True), torch.device("cpu"))
        weight = modules["model"].weight
        assert isinstance(weight, DTensor)
        assert weight.device_mesh.device_type == "cpu"
        assert weight.device == torch.device("cpu")

    one_process_group(check)


def test_time_based_checkpoints_are_saved_after_the_same_batch_on_every_rank(
    tmp_path: Path,
) -> None:
    # Each rank's clock says "due" after a different batch (rank 0 is slow once); a rank that
    # saved alone would wait in the checkpoint's collectives while the other trained on.
    run_ranks("tests.ddp.worker", "timed-checkpoints", str(tmp_path / "timed"))
    saved_at = [load(tmp_path / f"timed.{rank}")["saved_at"] for rank in (0, 1)]
    assert saved_at[0] == saved_at[1]
    assert saved_at[0]  # the 1 s pause alone makes one due


def test_sharded_evaluation_returns_the_single_process_loss(tmp_path: Path) -> None:
    # 24 examples in batches of 4: every batch is full in both layouts, so the mean of the
    # batch means is the mean over examples either way.
    run_ranks("tests.ddp.worker", "evaluate-24", str(tmp_path / "eval"))
    single_loss, _ = evaluate(24, batch_size=4)
    results = [load(tmp_path / f"eval.{rank}") for rank in (0, 1)]
    assert [result["seen"] for result in results] == [12, 12]
    for result in results:
        loss = result["loss"]
        assert isinstance(loss, float)
        assert loss == pytest.approx(single_loss, rel=1e-6)


def test_uneven_shards_count_every_example_exactly_once(tmp_path: Path) -> None:
    run_ranks("tests.ddp.worker", "evaluate-25", str(tmp_path / "eval"))
    results = [load(tmp_path / f"eval.{rank}") for rank in (0, 1)]
    assert [result["seen"] for result in results] == [13, 12]  # not padded to 13 + 13
    assert [result["total"] for result in results] == [25, 25]
    assert results[0]["loss"] == results[1]["loss"]  # reduced: the same on every rank


def test_a_loss_averaged_by_the_recipe_itself_is_the_mean_of_every_ranks_batch_losses(
    tmp_path: Path,
) -> None:
    """An ``update_average`` override the brain cannot count: each batch is one value, and the
    stage loss weighs each rank's mean by its batches (13 examples make 4 on rank 0, 12 make 3
    on rank 1), not the two means alike."""
    run_ranks("tests.ddp.worker", "own-average-25", str(tmp_path / "eval"))
    results = [load(tmp_path / f"eval.{rank}") for rank in (0, 1)]
    batch_losses: list[list[float]] = []
    for result in results:
        losses = result["batch_losses"]
        assert isinstance(losses, list)
        batch_losses.append([float(value) for value in losses])
    assert [len(losses) for losses in batch_losses] == [4, 3]
    every_batch = [value for losses in batch_losses for value in losses]
    for result in results:
        assert result["loss"] == pytest.approx(sum(every_batch) / len(every_batch), rel=1e-9)


# Bit-exact resume on 2 ranks: the harness of tests/test_resume.py, run by two processes.

DDP_RUN = RunConfig(
    data_seed=4, samples=32, batch_size=2, epochs=2, accumulation=2, dropout=0.3, augment=True
)


def resume_job(config: RunConfig, folder: Path, out: Path, stop_at: int | None = None) -> list[int]:
    config_path = folder.parent / f"{folder.name}.json"
    config_path.write_text(json.dumps(converter.unstructure(config)))
    extra = [] if stop_at is None else [str(stop_at)]
    return finish_ranks(
        start_ranks("tests.ddp.resume_worker", str(config_path), str(folder), str(out), *extra)
    )


def test_a_job_killed_at_random_moments_resumes_bit_for_bit(tmp_path: Path) -> None:
    config = attrs.evolve(DDP_RUN, samples=400, epochs=4)  # about 20 s
    assert resume_job(config, tmp_path / "straight", tmp_path / "straight.pt") == [0, 0]
    folder, out = tmp_path / "killed", tmp_path / "killed.pt"
    config_path = tmp_path / "killed.json"
    config_path.write_text(json.dumps(converter.unstructure(config)))
    chooser = random.Random(5)
    kills = 0
    for _ in range(4):
        processes = start_ranks("tests.ddp.resume_worker", str(config_path), str(folder), str(out))
        # After 1 to 6 more saves (progress, not time: the kill lands inside the run).
        target = saves_so_far(folder) + chooser.randint(1, 6)
        while saves_so_far(folder) < target and all(p.poll() is None for p in processes):
            time.sleep(0.005)
        time.sleep(chooser.uniform(0, 0.05))
        if any(process.poll() is not None for process in processes):
            finish_ranks(processes)
            break
        for process in processes:
            process.kill()  # SIGKILL, the whole job at once
        finish_ranks(processes, may_abort=True)
        kills += 1
    if not (tmp_path / "killed.pt.0").exists():
        assert resume_job(config, folder, out) == [0, 0]
    assert kills == 4, "the job finished before it could be killed 4 times"
    assert_same_ranks(tmp_path / "straight.pt", tmp_path / "killed.pt")


def torchrun(*program: str, ranks: int = 2) -> list[str]:
    """The command that runs ``program`` on ``ranks`` processes of this machine with torchrun."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *program,
    ]


def torchrun_job(
    config: RunConfig, folder: Path, out: Path, stop_at: int | None = None, *, ranks: int = 2
) -> int:
    """Run the harness on ``ranks`` ranks launched by torchrun; torchrun's exit status."""
    config_path = folder.parent / f"{folder.name}.json"
    config_path.write_text(json.dumps(converter.unstructure(config)))
    command = torchrun(
        "-m",
        "tests.ddp.resume_worker",
        str(config_path),
        str(folder),
        str(out),
        *([] if stop_at is None else [str(stop_at)]),
        ranks=ranks,
    )
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=300, check=False)
    if done.returncode != 0:  # shown by pytest when the test fails
        print(done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))
    return done.returncode


def stopped_and_restarted(
    config: RunConfig, tmp_path: Path, stop_at: int, *, ranks: int = 2
) -> Path:
    """Stop a torchrun job at pass ``stop_at``, run it again to the end; its results' stem.

    The results are ``broken.pt.<rank>`` in ``tmp_path``; the checkpoints are in ``broken``.
    """
    folder, out = tmp_path / "broken", tmp_path / "broken.pt"
    assert torchrun_job(config, folder, out, stop_at=stop_at, ranks=ranks) != 0  # reported
    assert not (tmp_path / "broken.pt.0").exists()
    assert torchrun_job(config, folder, out, ranks=ranks) == 0
    return out


def assert_same_ranks(expected: Path, resumed: Path, *, ranks: int = 2) -> None:
    """Every rank's final state in ``resumed.<rank>`` equals the one in ``expected.<rank>``."""
    for rank in range(ranks):
        reference = load(expected.with_name(f"{expected.name}.{rank}"))
        assert differences(reference, load(resumed.with_name(f"{resumed.name}.{rank}"))) == []


# Each rank runs 8 training and 4 validation passes per epoch, with a checkpoint every 2
# training batches and an optimizer step every 2.
STOP_POINTS = {
    "mid-accumulation, after a checkpoint": 16,
    "right after a checkpoint": 15,
    "in validation": 11,
    "first pass of an epoch": 13,
    "first pass of the run": 1,
}


@pytest.fixture(scope="module")
def uninterrupted_torchrun_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final states of an uninterrupted 2-rank run: ``straight.pt.<rank>`` in the folder."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert torchrun_job(DDP_RUN, folder / "straight", folder / "straight.pt") == 0
    return folder


@pytest.mark.parametrize("stop_at", STOP_POINTS.values(), ids=STOP_POINTS.keys())
def test_a_torchrun_job_stopped_anywhere_and_restarted_with_torchrun_ends_identical(
    stop_at: int, tmp_path: Path, uninterrupted_torchrun_job: Path
) -> None:
    out = stopped_and_restarted(DDP_RUN, tmp_path, stop_at)
    assert load(out.with_name("broken.pt.0"))["sharded"] is False  # DDP, not FSDP2
    assert_same_ranks(uninterrupted_torchrun_job / "straight.pt", out)


# (the recipe's own save point, forward pass of the stop): each stop comes after that save.
RECIPE_SAVES = {
    "saved as training ends, stopped in validation": ("train_end", 11),
    "saved as validation starts, stopped in it": ("valid_start", 11),
    "saved as an epoch starts, stopped at its first pass": ("train_start", 13),
}


@pytest.mark.parametrize(("save_point", "stop_at"), RECIPE_SAVES.values(), ids=RECIPE_SAVES.keys())
def test_a_torchrun_job_resumes_from_a_checkpoint_the_recipe_saved_at_a_stage_boundary(
    save_point: Literal["train_start", "train_end", "valid_start"],
    stop_at: int,
    tmp_path: Path,
    uninterrupted_torchrun_job: Path,
) -> None:
    # Saving changes nothing the run computes: the uninterrupted job above is the reference.
    config = attrs.evolve(DDP_RUN, save_point=save_point)
    out = stopped_and_restarted(config, tmp_path, stop_at)
    assert_same_ranks(uninterrupted_torchrun_job / "straight.pt", out)


# Forward passes of one rank (see STOP_POINTS): training and validation of epoch 1, training
# of epoch 2.
# (forward pass, whether the stop saves a checkpoint): a signal in the last validation is seen
# when training is over, with nothing left to save.
SIGNAL_POINTS = {
    "in training": (3, True),
    "last training batch of an epoch": (8, True),
    "in validation": (10, True),
    "in the last validation": (22, False),
}


def stopped_on_rank_0(
    config: RunConfig, signal_at: int, saves: bool, tmp_path: Path
) -> tuple[Path, Path]:
    """Run ``config`` on 2 ranks, SIGTERM to rank 0 at ``signal_at``; its folder and output.

    Checks that every rank left with SIGTERM's status, having saved a checkpoint or not as
    ``saves`` says.
    """
    stopped = attrs.evolve(config, signal_at=signal_at, signal_rank=0)
    folder, out = tmp_path / "stopped", tmp_path / "stopped.pt"
    config_path = tmp_path / "stopped.json"
    config_path.write_text(json.dumps(converter.unstructure(stopped)))
    ranks = start_ranks("tests.ddp.resume_worker", str(config_path), str(folder), str(out))
    codes = finish_ranks(ranks, timeout=60, may_abort=True)
    assert set(codes) <= {128 + signal.SIGTERM, -signal.SIGABRT}  # not 0, 3 or a hang
    for rank in (0, 1):
        outcome = json.loads(Path(f"{out}.{rank}{STOPPED_SUFFIX}").read_text())
        assert outcome == {"signal": signal.SIGTERM, "checkpoint_saved": saves}
    return folder, out


@pytest.mark.parametrize(("signal_at", "saves"), SIGNAL_POINTS.values(), ids=SIGNAL_POINTS.keys())
def test_a_sigterm_that_reaches_one_rank_stops_every_rank_after_the_same_batch(
    signal_at: int, saves: bool, tmp_path: Path, uninterrupted_torchrun_job: Path
) -> None:
    # Rank 0 alone gets the signal: the ranks must agree on where to stop, save one checkpoint
    # together and leave with SIGTERM's exit status, not hang in mismatched collectives.
    folder, out = stopped_on_rank_0(DDP_RUN, signal_at, saves, tmp_path)
    assert not (tmp_path / "stopped.pt.0").exists()
    assert resume_job(DDP_RUN, folder, out) == [0, 0]
    assert_same_ranks(uninterrupted_torchrun_job / "straight.pt", tmp_path / "stopped.pt")


@pytest.mark.skipif(
    cpu_fsdp_problem(torch.device("cpu"), str(torch.__version__)) is not None,
    reason="typedbrain refuses FSDP2 on the CPU under this torch (tested above)",
)
@pytest.mark.parametrize(
    ("interval", "stop_at"),
    [(2, 16), (3, 5)],
    ids=["checkpoint between two steps", "checkpoint inside an accumulation window"],
)
def test_an_fsdp2_job_stopped_mid_epoch_resumes_bit_for_bit(
    tmp_path: Path, interval: int, stop_at: int
) -> None:
    # Accumulation 2: a checkpoint every 3 batches holds the first batch's sharded gradients.
    config = attrs.evolve(DDP_RUN, fsdp=True, ckpt_interval_steps=interval)
    assert torchrun_job(config, tmp_path / "straight", tmp_path / "straight.pt") == 0
    out = stopped_and_restarted(config, tmp_path, stop_at)
    assert_same_ranks(tmp_path / "straight.pt", out)
    folder = tmp_path / "broken"
    assert load(tmp_path / "broken.pt.0")["sharded"] is True  # FSDP2 did shard the model
    # The checkpoint holds full tensors, not shards: the model's full shapes.
    saved = torch.load(next(folder.glob("*/model.ckpt")), weights_only=True)
    assert saved["0.weight"].shape == (8, 4)


# The main process commits in the background; the checkpoints hold the same states.
BACKGROUND_RUN = attrs.evolve(DDP_RUN, commit_in_background=True)


def test_a_torchrun_job_committing_in_the_background_stopped_and_restarted_ends_identical(
    tmp_path: Path, uninterrupted_torchrun_job: Path
) -> None:
    stop_at = STOP_POINTS["mid-accumulation, after a checkpoint"]
    out = stopped_and_restarted(BACKGROUND_RUN, tmp_path, stop_at)
    assert_same_ranks(uninterrupted_torchrun_job / "straight.pt", out)


def test_a_sigterm_to_one_rank_committing_in_the_background_saves_on_every_rank_then_resumes(
    tmp_path: Path, uninterrupted_torchrun_job: Path
) -> None:
    # The stop waits (collectively) for its checkpoint's commit before saying it saved one.
    signal_at = SIGNAL_POINTS["in training"][0]
    folder, out = stopped_on_rank_0(BACKGROUND_RUN, signal_at, True, tmp_path)
    # Every checkpoint folder was committed when the ranks exited.
    folders = sorted(path for path in folder.iterdir() if path.is_dir())
    assert sorted(manifest.parent for manifest in folder.glob("*/MANIFEST.json")) == folders
    assert resume_job(BACKGROUND_RUN, folder, out) == [0, 0]
    assert_same_ranks(uninterrupted_torchrun_job / "straight.pt", out)


@pytest.mark.parametrize("way", ["atexit", "finally"])
def test_a_rank_that_raises_ends_the_job_at_once_rather_than_at_the_groups_timeout(
    way: str,
) -> None:
    # Rank 0 waits in DDP's all-reduce for a rank that raised: the raising rank must leave
    # without waiting for it at the group's teardown (the wait would take the group's whole
    # timeout, 30 minutes), so that its closed connections fail rank 0's collective at once.
    processes = start_ranks("tests.ddp.raising_worker", way)
    outcomes = communicate_all(processes)
    _, failing = outcomes[1]
    # gloo may abort a process whose peer tore its connections down first (see finish_ranks).
    assert processes[1].returncode in (1, -signal.SIGABRT)
    assert b"rank 1 fails in its second forward pass" in failing
    assert processes[0].returncode != 0  # its collective failed: the job is over


@pytest.mark.parametrize(
    ("accumulation", "step", "sharding"),
    [
        (1, 2, "ddp"),  # no accumulation
        (2, 3, "ddp"),  # a window's first batch
        (2, 4, "ddp"),  # a window's last
        (1, 2, "fsdp"),  # FSDP2: no DDP wrapper, so once on the inline step
    ],
)
def test_a_non_finite_loss_on_one_rank_is_skipped_on_every_rank_alike(
    tmp_path: Path, accumulation: int, step: int, sharding: str
) -> None:
    # Each rank skipping its own non-finite backward pass would desynchronise DDP's gradient
    # all-reduce (a crash) or, with accumulation, step different gradients on each rank.
    out = tmp_path / "nan"
    arguments = (str(accumulation), str(step), "3", str(out), sharding)
    run_ranks("tests.ddp.nonfinite_worker", *arguments)
    first, second = load(out.with_name("nan.0")), load(out.with_name("nan.1"))
    assert first["nonfinite"] == second["nonfinite"] == 1
    for mine, theirs in zip(
        cast(list[Tensor], first["parameters"]),
        cast(list[Tensor], second["parameters"]),
        strict=True,
    ):
        assert torch.equal(mine, theirs)


def test_a_window_left_over_after_a_loader_without_a_length_steps_the_mean_over_the_ranks(
    tmp_path: Path,
) -> None:
    # 3 batches with a factor of 2: the last window holds one batch. Without a length, no
    # backward pass is known to end it, so DDP synced none: the loop must, or each rank steps
    # its own gradient and the replicas drift apart.
    for sized in ("unsized", "sized"):
        run_ranks("tests.ddp.leftover_worker", "3", sized, str(tmp_path / sized))
    parameters = {
        (sized, rank): cast(list[Tensor], load(tmp_path / f"{sized}.{rank}")["parameters"])
        for sized in ("unsized", "sized")
        for rank in (0, 1)
    }
    for rank in (0, 1):
        for mine, expected in zip(parameters["unsized", rank], parameters["sized", 0], strict=True):
            assert torch.equal(mine, expected)  # as the loader with a length steps it


def test_a_non_finite_loss_past_the_patience_on_one_rank_stops_every_rank() -> None:
    processes = start_ranks("tests.ddp.nonfinite_worker", "1", "2", "0", "unused")
    outcomes = communicate_all(processes)
    for process, (_, stderr) in zip(processes, outcomes, strict=True):
        assert process.returncode != 0
        assert b"NonFiniteLossError" in stderr


# Evaluation stages in which the ranks hold unequal numbers of batches, some none at all.


def evaluation_job(mode: str, tmp_path: Path) -> list[dict[str, object]]:
    """Run ``tests.ddp.evaluation_worker MODE`` on 2 ranks; each rank's results.

    A forward pass that made a collective would leave one rank waiting for the other, which
    has no batch left, until the group's 30-minute timeout: ``finish_ranks`` fails first.
    """
    out = tmp_path / mode
    assert finish_ranks(start_ranks("tests.ddp.evaluation_worker", mode, str(out))) == [0, 0]
    return [load(out.with_name(f"{mode}.{rank}")) for rank in (0, 1)]


def tensors(value: object) -> dict[str, Tensor]:
    assert isinstance(value, dict)
    return cast(dict[str, Tensor], value)


def test_a_ddp_model_with_buffers_validates_on_a_set_that_leaves_a_rank_without_a_batch(
    tmp_path: Path,
) -> None:
    first, second = evaluation_job("batchnorm-fit", tmp_path)
    # One example: rank 0 validates it, with its buffers broadcast to rank 1 as DDP's own
    # validation pass would, and every rank gets that loss.
    assert first["losses"] == second["losses"]
    for result in (first, second):
        assert cast(list[float], result["losses"])[-1] == result["example_loss"]
        assert set(tensors(result["with_validation"])) == set(tensors(first["with_validation"]))
    for name, value in tensors(first["with_validation"]).items():
        assert torch.equal(tensors(second["with_validation"])[name], value), name
    # Validation computes nothing training uses: the parameters of both ranks and rank 0's
    # buffers are those of the same run without a validation set (rank 1's buffers are
    # rank 0's after a validation, its own after a training batch).
    buffers = {name for name, _ in batchnorm_model().named_buffers()}
    for rank, result in enumerate((first, second)):
        alone, validated = tensors(result["without_validation"]), tensors(result["with_validation"])
        for name, value in alone.items():
            if rank == 0 or name not in buffers:
                assert torch.equal(validated[name], value), (rank, name)


def test_a_ddp_model_with_buffers_is_tested_when_a_rank_has_no_test_batch(
    tmp_path: Path,
) -> None:
    for result in evaluation_job("batchnorm-evaluate", tmp_path):
        # 3 examples in batches of 2 with drop_last: rank 0 tests examples 0 and 2, rank 1
        # none; the loss is the one-process loss of those two.
        assert result["loss"] == pytest.approx(result["rank_0_examples_loss"], rel=1e-6)


@pytest.mark.skipif(
    cpu_fsdp_problem(torch.device("cpu"), str(torch.__version__)) is not None,
    reason="typedbrain refuses FSDP2 on the CPU under this torch (tested above)",
)
@pytest.mark.parametrize("mode", ["fsdp", "fsdp-nested"])
def test_an_fsdp2_model_validates_on_uneven_shards_with_the_one_process_loss(
    mode: str, tmp_path: Path
) -> None:
    # 1 example: rank 1 has no batch; 5 in batches of 1: rank 0 has 3, rank 1 has 2. With a
    # nested sharded layer, each forward pass would all-gather it again.
    for result in evaluation_job(mode, tmp_path):
        for count in (1, 5):
            assert result[f"losses_{count}"] == [
                pytest.approx(result[f"example_mean_{count}"], rel=1e-6)
            ]
            if mode == "fsdp-nested":
                # Kept gathered for the stage only: in training it reshards after forward.
                assert result[f"nested_reshards_{count}"] is True


def one_process_group(check: Callable[[], None]) -> None:
    """Run ``check`` in a one-process gloo group, and free what it made before the group goes.

    A DDP wrapper (its reducer) or an FSDP module holds the process group: freed after
    ``destroy_process_group``, the group's destructor can wait for its threads forever (seen
    once in a full test run). ``check``'s objects are freed when it returns.
    """
    dist.init_process_group("gloo", rank=0, world_size=1, store=HashStore())
    try:
        check()
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # a failed check's objects go too
        raise
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_evaluation_forwards_run_through_the_wrapped_module_and_the_wrapper_comes_back() -> None:
    def check() -> None:
        inner = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        modules = torch.nn.ModuleDict({"model": inner})
        (wrapper,) = wrap_modules(modules, RunOptions(), torch.device("cpu"))
        assert modules["model"] is wrapper
        seen: list[torch.nn.Module] = []

        def failing_stage() -> None:
            with collective_free_forwards(modules):
                seen.append(modules["model"])
                raise ValueError("the stage failed")

        with pytest.raises(ValueError, match="the stage failed"):
            failing_stage()
        assert seen == [inner]  # DDP's forward, with its broadcast, is not run in the stage
        assert modules["model"] is wrapper  # back, although the stage raised
        # As after DDP's own evaluation pass: the next training pass broadcasts nothing.
        assert wrapper.require_forward_param_sync is False

    one_process_group(check)


@pytest.mark.skipif(
    cpu_fsdp_problem(torch.device("cpu"), str(torch.__version__)) is not None,
    reason="typedbrain refuses FSDP2 on the CPU under this torch (tested above)",
)
def test_fsdp2_modules_stay_gathered_for_the_evaluation_forwards_only() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    def check() -> None:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        fully_shard(model[0], mesh=init_device_mesh("cpu", (1,)))  # the recipe's own sharding
        modules = torch.nn.ModuleDict({"model": model})
        wrap_modules(modules, RunOptions(fsdp=True), torch.device("cpu"))
        layer = model[0]
        assert isinstance(layer, FSDPModule)
        with torch.no_grad(), collective_free_forwards(modules):
            model(torch.randn(2, 3))
            model(torch.randn(2, 3))
            # Still gathered after its forward passes: the next one all-gathers nothing.
            assert not isinstance(layer.weight, DTensor)
            assert all(group.post_forward_mesh_info is None for group in _param_groups(layer))
        assert isinstance(layer.weight, DTensor)  # resharded
        assert isinstance(model[1].weight, DTensor)
        # Its setting is back: in training it reshards after each forward pass again.
        assert all(group.post_forward_mesh_info is not None for group in _param_groups(layer))

    one_process_group(check)


@pytest.mark.parametrize(
    ("what", "error"),
    [
        (
            "examples",
            "ConfigurationError: fit(): the processes disagree on the training examples "
            "(rank 0: 16, rank 1: 20)",
        ),
        (
            "batch-size",
            "ConfigurationError: fit(): the processes disagree on the training batches per "
            "epoch (rank 0: 4, rank 1: 2)",
        ),
        (
            "accumulation",
            "ConfigurationError: fit(): the processes disagree on the grad_accumulation_factor "
            "(rank 0: 1, rank 1: 2)",
        ),
        (
            "epochs",
            "DistributedError: rank {rank}, fit: the processes disagree on the next epoch "
            "(rank 0: no more epochs, rank 1: epoch 2)",
        ),
    ],
)
def test_ranks_that_disagree_on_training_all_stop_with_an_error_showing_each_ranks_value(
    what: str, error: str
) -> None:
    # Without the check: a gloo abort (a C++ message, no traceback) on one rank, or a hang
    # until the group's timeout, half an hour.
    processes = start_ranks("tests.ddp.disagreement_worker", what)
    outcomes = communicate_all(processes)
    for rank, (process, (stdout, stderr)) in enumerate(zip(processes, outcomes, strict=True)):
        # Each rank raises and leaves at once; now and then gloo aborts one whose peer closed
        # its connections first, as it tears the group down (after the error was printed).
        assert process.returncode in (1, -signal.SIGABRT), stderr.decode(errors="replace")
        assert b"DONE" not in stdout
        assert error.format(rank=rank) in stderr.decode(errors="replace")


class _Regression(sb.Brain[tuple[Tensor, Tensor], Tensor]):
    def compute_forward(self, batch: tuple[Tensor, Tensor], stage: sb.Stage) -> Tensor:
        predictions: Tensor = self.modules["model"](batch[0])
        return predictions

    def compute_objectives(
        self, predictions: Tensor, batch: tuple[Tensor, Tensor], stage: sb.Stage
    ) -> Tensor:
        return torch.nn.functional.mse_loss(predictions, batch[1])


def test_a_brain_whose_first_fit_had_no_group_wraps_its_modules_in_a_fit_under_one() -> None:
    # Before, the first fit settled "wrapped" for good: each process then trained on its own.
    examples = [(torch.full((3,), float(i)), torch.zeros(2)) for i in range(4)]
    inner = torch.nn.Linear(3, 2)
    brains = [
        _Regression(
            {"model": inner},
            lambda params: torch.optim.SGD(params, lr=0.01),
            run_opts={"device": "cpu", "noprogressbar": True},
        )
    ]
    brains[0].fit(range(1, 2), examples, train_loader_kwargs={"batch_size": 2})
    assert brains[0].modules["model"] is inner

    def check() -> None:
        brain = brains.pop()  # freed with check's frame, before the group goes
        brain.fit(range(1, 3), examples, train_loader_kwargs={"batch_size": 2})
        wrapper = brain.modules["model"]
        assert isinstance(wrapper, torch.nn.parallel.DistributedDataParallel)
        assert wrapper.module is inner

    one_process_group(check)

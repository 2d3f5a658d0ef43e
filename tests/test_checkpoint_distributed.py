"""Checkpoints under torch.distributed: one writer, one decision, every process in agreement.

Each launch starts two processes (gloo, 127.0.0.1) running tests/ckpt_distributed/worker.py,
which runs a group of scenarios and writes what each process observed; the tests below check
those observations. A launch that does not finish in time is killed and reported as a hang.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import attrs
import pytest
import torch
import torch.distributed as dist

from tests.ckpt_distributed.worker import keep_only_run
from typedbrain._checkpoint import Checkpointer

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed (gloo)"
)

WORLD_SIZE: Final = 2
REPO: Final = Path(__file__).resolve().parent.parent
WORKING_WAIT_S: Final = 120.0
FAILING_WAIT_S: Final = 60.0
BACKGROUND_WAIT_S: Final = 60.0
# Longer than the failing launch's wait: a process stuck in a collective shows up as a hang,
# not as a gloo timeout.
PROCESS_GROUP_TIMEOUT_S: Final = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@attrs.frozen
class Launch:
    """What the processes of one launch did: exit codes, output, and their observations."""

    finished: bool
    returncodes: tuple[int | None, ...]
    output: str
    results: Path

    def observed(self, scenario: str) -> list[dict[str, object]]:
        """Each process's observations of ``scenario``, by rank."""
        assert self.finished, f"the processes did not finish in time (hung):\n{self.output}"
        found = []
        for rank in range(WORLD_SIZE):
            path = self.results / f"{scenario}.rank{rank}.json"
            assert path.is_file(), f"process {rank} recorded nothing for {scenario}:\n{self.output}"
            found.append(json.loads(path.read_text(encoding="utf-8")))
        return found


def launch(group: str, root: Path, wait_s: float) -> Launch:
    """Run the worker's ``group`` in two processes; kill any still running after ``wait_s``."""
    scratch, results = root / "scratch", root / "results"
    scratch.mkdir(parents=True)
    results.mkdir()
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    logs = [root / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    finished = False
    try:
        for rank, log in enumerate(logs):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(WORLD_SIZE),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            with log.open("wb") as sink:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "tests.ckpt_distributed.worker",
                            group,
                            str(scratch),
                            str(results),
                            str(PROCESS_GROUP_TIMEOUT_S),
                        ],
                        cwd=REPO,
                        env=env,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + wait_s
        for process in processes:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        finished = True
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = "\n".join(
        f"--- process {rank} (exit {process.returncode}):\n{log.read_text(errors='replace')}"
        for rank, (process, log) in enumerate(zip(processes, logs, strict=False))
    )
    return Launch(
        finished=finished,
        returncodes=tuple(process.returncode for process in processes),
        output=output,
        results=results,
    )


@pytest.fixture(scope="module")
def working(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    result = launch("working", tmp_path_factory.mktemp("working"), WORKING_WAIT_S)
    assert result.finished, f"the processes did not finish in time (hung):\n{result.output}"
    assert result.returncodes == (0,) * WORLD_SIZE, result.output
    return result


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    return launch("failing", tmp_path_factory.mktemp("failing"), FAILING_WAIT_S)


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """A launch of checkpointers that commit in the background (``commit_in_background``)."""
    return launch("background", tmp_path_factory.mktemp("background"), BACKGROUND_WAIT_S)


def test_a_save_from_every_process_writes_exactly_one_committed_folder(working: Launch) -> None:
    main, other = working.observed("save_once")
    assert main["folders"] == other["folders"]
    assert isinstance(main["folders"], list)
    assert len(main["folders"]) == 1
    assert main["committed_on_return"] is True
    assert other["committed_on_return"] is True


def test_every_process_gets_the_same_checkpoint_from_a_save(working: Launch) -> None:
    main, other = working.observed("save_once")
    assert main["all_equal"] is True
    assert other["all_equal"] is True
    assert main["repr"] == other["repr"]


def test_a_state_dict_gathering_every_process_is_saved_whole_and_each_gets_its_own_back(
    working: Launch,
) -> None:
    main, other = working.observed("gathered_state")
    assert main["file_per_rank"] == other["file_per_rank"] == [100, 101]
    assert main["value_after_recovery"] == 100
    assert other["value_after_recovery"] == 101
    assert main["recovered"] == other["recovered"] is not None


def test_save_and_keep_only_leaves_what_one_process_would_and_every_process_agrees(
    working: Launch, tmp_path: Path
) -> None:
    main, other = working.observed("keep_only")
    alone = keep_only_run(tmp_path)
    assert main["after_each_save"] == other["after_each_save"] == alone
    assert main["deleted_by_delete_checkpoints"] == other["deleted_by_delete_checkpoints"]
    assert main["left"] == other["left"] == ["e"]


def test_the_main_process_deletes_only_once_every_process_has_asked_to(working: Launch) -> None:
    main, other = working.observed("slow_reader")
    assert main["seen_before_deleting"] == other["seen_before_deleting"] == ["new", "old"]
    assert main["deleted"] == other["deleted"] == ["old"]
    assert main["left"] == other["left"] == ["new"]


def test_debug_mode_sends_every_process_to_one_temporary_folder(working: Launch) -> None:
    main, other = working.observed("debug_folder")
    assert main["folder"] == other["folder"]
    assert main["checkpoint_inside"] is other["checkpoint_inside"] is True
    assert main["beside_real_folder"] is other["beside_real_folder"] is True
    assert main["in_real_folder"] is other["in_real_folder"] is False


def test_recover_if_possible_loads_the_newest_checkpoint_on_every_process(
    working: Launch,
) -> None:
    main, other = working.observed("recover_newest")
    assert isinstance(main["saved"], list)
    newest = main["saved"][-1]
    for observed in (main, other):
        assert observed["found"] == newest
        assert observed["listed"] == main["saved"]
        assert observed["recovered"] == newest
        assert observed["weight"] == 3.0


def test_a_corrupted_newest_checkpoint_is_skipped_by_every_process_with_a_warning_on_main(
    working: Launch,
) -> None:
    main, other = working.observed("corrupt_newest")
    for observed in (main, other):
        assert observed["recovered"] == main["older"]
        assert observed["weight"] == 1.0
    assert isinstance(main["warnings"], list)
    assert len(main["warnings"]) == 1
    message, where = main["warnings"][0]
    assert str(main["newer"]) in message
    assert "SHA-256" in message
    assert where == "worker.py"  # the warning points at the caller of recover_if_possible
    assert other["warnings"] == []


def test_an_uncommitted_folder_is_never_loaded_by_any_process(working: Launch) -> None:
    main, other = working.observed("uncommitted")
    for observed in (main, other):
        assert observed["recovered"] == main["committed"]
        assert observed["weight"] == 1.0
    assert isinstance(main["warnings"], list)
    assert [where for _, where in main["warnings"]] == ["worker.py"]
    assert str(main["uncommitted"]) in main["warnings"][0][0]
    assert other["warnings"] == []


def test_main_failing_to_save_makes_the_others_raise_instead_of_hanging(failing: Launch) -> None:
    main, other = failing.observed("main_fails_to_save")
    assert isinstance(main["raised"], dict)
    assert main["raised"]["type"] == "OSError"
    assert "No space left on device" in main["raised"]["message"]
    assert isinstance(other["raised"], dict)
    assert other["raised"]["type"] == "CheckpointError"
    assert "the main process failed to save" in other["raised"]["message"]
    assert "No space left on device" in other["raised"]["message"]
    assert main["folders"] == other["folders"] == []
    assert failing.returncodes == (0,) * WORLD_SIZE, failing.output


def test_a_state_dict_failing_on_one_process_makes_every_process_raise_and_nothing_is_saved(
    failing: Launch,
) -> None:
    main, other = failing.observed("state_dict_fails_on_one_process")
    assert isinstance(main["raised"], dict)
    assert main["raised"]["type"] == "CheckpointError"
    assert "process 1: RuntimeError: state_dict broke on process 1" in main["raised"]["message"]
    assert other["raised"] == {"type": "RuntimeError", "message": "state_dict broke on process 1"}
    assert main["folders"] == other["folders"] == []


def test_processes_loading_different_checkpoints_all_raise_and_load_nothing(
    failing: Launch,
) -> None:
    for observed in failing.observed("different_checkpoints"):
        assert isinstance(observed["raised"], dict)
        assert observed["raised"]["type"] == "CheckpointError"
        assert "disagree" in observed["raised"]["message"]
        assert observed["weight"] == 0.0


def test_a_process_failing_to_verify_its_files_stops_every_process_from_loading(
    failing: Launch,
) -> None:
    main, other = failing.observed("one_process_fails_to_verify")
    assert isinstance(main["raised"], dict)
    assert main["raised"]["type"] == "CheckpointError"
    assert "process 1: CorruptCheckpointError" in main["raised"]["message"]
    assert isinstance(other["raised"], dict)
    assert other["raised"]["type"] == "CorruptCheckpointError"
    assert "SHA-256" in other["raised"]["message"]
    # The main process's files were fine, but it changed nothing either.
    assert main["weight"] == other["weight"] == 0.0


# ----------------------------------------------------------- committing in the background


def test_a_background_save_and_keep_only_returns_the_same_checkpoint_everywhere_uncommitted(
    background: Launch,
) -> None:
    main, other = background.observed("background_keep_only")
    assert main["held"] is True  # the main process's commit thread was held at its fsync
    for observed in (main, other):
        assert observed["returned"] == "third"
        assert observed["same_everywhere"] is True
        # The main process's commit is held: the files are there, the manifest is not, and the
        # keep policy has deleted nothing yet.
        assert observed["before_wait"] == ["first", "second", "third"]
        assert observed["committed_before_wait"] is False


def test_wait_returns_on_every_process_once_the_main_process_committed_and_deleted(
    background: Launch,
) -> None:
    main, other = background.observed("background_keep_only")
    # The other process commits nothing itself, yet its wait() waits for the main process's.
    assert other["still_waiting"] is True
    for observed in (main, other):
        assert observed["wait_raised"] is None
        assert observed["committed_after_wait"] is True
        assert observed["after_wait"] == ["second", "third"]
        assert observed["listed"] == ["second", "third"]
        # The checkpoint the save returned is the one its manifest holds.
        assert observed["listed_equals_returned"] is True


def test_recover_after_a_background_save_loads_it_on_every_process(background: Launch) -> None:
    for observed in background.observed("background_keep_only"):
        assert observed["recovered"] == "third"
        assert observed["weight"] == 3.0


def _raised_from_main_commit(main: object, other: object, doomed: str, what: str) -> None:
    """The main process raised its commit's OSError; the other one a CheckpointError about it."""
    assert isinstance(main, dict)
    assert main["type"] == "OSError"
    assert "No space left on device" in main["message"]
    assert f"{doomed}/model.ckpt" in main["message"]
    assert main["notes"] == [
        f"(while committing checkpoint {doomed} in the background, after the save returned)"
    ]
    assert isinstance(other, dict)
    assert other["type"] == "CheckpointError"
    assert f"the main process failed to {what} a checkpoint in" in other["message"]
    assert "OSError: [Errno 28] No space left on device" in other["message"]


def test_a_background_commit_failing_on_the_main_process_is_raised_by_wait_everywhere(
    background: Launch,
) -> None:
    main, other = background.observed("background_commit_fails_at_wait")
    assert main["doomed"] == other["doomed"]
    assert isinstance(main["doomed"], str)
    assert main["same_everywhere"] is other["same_everywhere"] is True
    _raised_from_main_commit(main["wait_raised"], other["wait_raised"], main["doomed"], "commit")
    # The uncommitted folder is gone; the keep policy did not run, so the older one is kept.
    assert main["left"] == other["left"] == ["kept"]
    # Raised once: the next wait() has nothing to raise.
    assert main["wait_raised_again"] is other["wait_raised_again"] is None
    assert isinstance(main["logged"], list)
    assert len(main["logged"]) == 1
    level, message = main["logged"][0]
    assert level == "ERROR"
    assert main["doomed"] in message
    assert "No space left on device" in message
    assert other["logged"] == []  # the other process committed nothing
    assert background.returncodes == (0,) * WORLD_SIZE, background.output


def test_a_background_commit_failing_on_the_main_process_is_raised_by_the_next_save_everywhere(
    background: Launch,
) -> None:
    main, other = background.observed("background_commit_fails_at_next_save")
    assert main["doomed"] == other["doomed"]
    assert isinstance(main["doomed"], str)
    assert main["same_everywhere"] is other["same_everywhere"] is True
    _raised_from_main_commit(main["save_raised"], other["save_raised"], main["doomed"], "save")
    # The failing save wrote nothing of its own, and the older checkpoint is kept.
    assert main["left"] == other["left"] == ["kept"]
    assert main["wait_raised"] is other["wait_raised"] is None  # raised once
    assert background.returncodes == (0,) * WORLD_SIZE, background.output


@pytest.mark.parametrize(
    "scenario", ["background_commit_fails_at_wait", "background_commit_fails_at_next_save"]
)
def test_after_a_background_commit_failed_the_next_save_works_on_every_process(
    background: Launch, scenario: str
) -> None:
    for observed in background.observed(scenario):
        assert observed["again_same_everywhere"] is True
        assert observed["again_wait_raised"] is None
        assert observed["again_left"] == ["again"]
        assert observed["recovered"] == "again"
        assert observed["weight"] == 5.0


def test_without_a_process_group_no_collective_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a collective ran without a process group")

    for collective in ("broadcast_object_list", "all_gather_object", "barrier"):
        monkeypatch.setattr(dist, collective, refuse)
    model = torch.nn.Linear(1, 1, bias=False)
    checkpointer = Checkpointer(tmp_path, {"model": model})
    saved = checkpointer.save_and_keep_only(num_to_keep=1)
    assert checkpointer.find_checkpoint() == saved
    assert checkpointer.recover_if_possible() == saved
    checkpointer.load_checkpoint(saved)
    assert checkpointer.delete_checkpoints(num_to_keep=1) == []


def test_a_save_whose_processes_differ_in_commit_mode_is_refused_everywhere(
    background: Launch,
) -> None:
    main, other = background.observed("background_modes_differ")
    for observed in (main, other):
        raised = observed["raised"]
        assert isinstance(raised, dict)
        assert raised["type"] == "CheckpointError"
        assert "disagree" in raised["message"]
        assert "commit_in_background=True" in raised["message"]
        assert "commit_in_background=False" in raised["message"]
        assert observed["left"] == []  # nothing was written
    assert background.returncodes == (0,) * WORLD_SIZE, background.output

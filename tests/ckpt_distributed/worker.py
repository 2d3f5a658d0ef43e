"""One process of the multi-process checkpoint tests.

Run as ``python -m tests.ckpt_distributed.worker GROUP SCRATCH RESULTS PG_TIMEOUT`` with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, as torchrun
sets them. It joins a gloo process group (``PG_TIMEOUT`` seconds for each collective), runs the
scenarios of ``GROUP`` one after the other, each in its own folder under ``SCRATCH`` (a folder
every process sees), and writes what each scenario observed to
``RESULTS/<scenario>.rank<N>.json`` for the test to check.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, TypeAlias
from unittest import mock

import attrs
import torch
import torch.distributed as dist

from typedbrain import Brain
from typedbrain._checkpoint import Checkpoint, Checkpointer
from typedbrain._epochs import EpochCounter
from typedbrain._errors import CheckpointWarning
from typedbrain._launch import shutdown_distributed
from typedbrain._manifest import MANIFEST_NAME

Observed: TypeAlias = dict[str, object]
Scenario: TypeAlias = Callable[[Path], Observed]

KEEP_ONLY_STEPS: Final = (("a", 3.0), ("b", 1.0), ("c", 2.0), ("d", 4.0), ("e", 0.5))
"""Checkpoint names and their losses, saved in this order by :func:`keep_only_run`."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _model(weight: float) -> torch.nn.Linear:
    model = torch.nn.Linear(1, 1, bias=False)
    _fill(model, weight)
    return model


def _fill(model: torch.nn.Linear, weight: float) -> None:
    with torch.no_grad():
        model.weight.fill_(weight)


def _weight(model: torch.nn.Linear) -> float:
    return float(model.weight.item())


def _folders(folder: Path) -> list[str]:
    # Not the writer lock file that the first save leaves there.
    return sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))


def _checkpoint_warnings(caught: Sequence[warnings.WarningMessage]) -> list[list[str]]:
    """Each CheckpointWarning's message and the file it points at (the caller's, it should be)."""
    return [
        [str(w.message), Path(w.filename).name]
        for w in caught
        if issubclass(w.category, CheckpointWarning)
    ]


class RankGatherer:
    """State that differs per process, saved as the list of every process's value.

    Its ``state_dict`` runs a collective (as the brain's run state gathers the RNG states); on
    load each process takes back its own entry.
    """

    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict[str, object]:
        everyone: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self.value)
        return {"per_rank": everyone}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["per_rank"][dist.get_rank()]


class FailsOnRank1:
    """State whose ``state_dict`` raises on process 1 only."""

    def state_dict(self) -> dict[str, object]:
        if _rank() == 1:
            raise RuntimeError("state_dict broke on process 1")
        return {"fine": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def keep_only_run(folder: Path) -> list[list[str]]:
    """Save :data:`KEEP_ONLY_STEPS` with a keep policy; the folders left after each save."""
    checkpointer = Checkpointer(folder, {"model": _model(0.0)})
    after: list[list[str]] = []
    for name, loss in KEEP_ONLY_STEPS:
        checkpointer.save_and_keep_only(
            meta={"loss": loss}, name=name, num_to_keep=2, min_keys=["loss"]
        )
        after.append(_folders(folder))
    return after


# ----------------------------------------------------------------------------- scenarios


def save_once(folder: Path) -> Observed:
    checkpointer = Checkpointer(folder, {"model": _model(1.0), "counter": EpochCounter(3)})
    checkpoint = checkpointer.save_checkpoint(meta={"loss": 0.5})
    committed_on_return = (checkpoint.path / MANIFEST_NAME).is_file()
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, checkpoint)
    dist.barrier()
    return {
        "folders": _folders(folder),
        "committed_on_return": committed_on_return,
        "all_equal": all(other == checkpoint for other in everyone),
        "path": str(checkpoint.path),
        "repr": repr(checkpoint),
    }


def gathered_state(folder: Path) -> Observed:
    gatherer = RankGatherer(100 + _rank())
    checkpointer = Checkpointer(folder, {"gatherer": gatherer})
    checkpoint = checkpointer.save_checkpoint()
    saved = torch.load(checkpoint.paramfiles["gatherer"], weights_only=True)
    gatherer.value = -1
    recovered = checkpointer.recover_if_possible()
    return {
        "file_per_rank": saved["per_rank"],
        "value_after_recovery": gatherer.value,
        "recovered": None if recovered is None else recovered.path.name,
    }


def keep_only(folder: Path) -> Observed:
    after = keep_only_run(folder)
    deleted = Checkpointer(folder, {"model": _model(0.0)}).delete_checkpoints(num_to_keep=1)
    dist.barrier()
    return {
        "after_each_save": after,
        "deleted_by_delete_checkpoints": sorted(c.path.name for c in deleted),
        "left": _folders(folder),
    }


SLOW_PROCESS_DELAY_S: Final = 1.0
"""How long the other process dawdles in :func:`slow_reader` before it looks at the folder."""


def slow_reader(folder: Path) -> Observed:
    """The main process deletes at once; the other one looks at the folder late, then deletes.

    The main process's ``delete_checkpoints`` must wait for the other one to make the same
    call, so what the other process sees first is what the saves left, not the deletion.
    """
    checkpointer = Checkpointer(folder, {"model": _model(0.0)})
    for name in ("old", "new"):
        checkpointer.save_checkpoint(name=name)
    if _rank() != 0:
        time.sleep(SLOW_PROCESS_DELAY_S)
    seen_before_deleting = _folders(folder)
    deleted = checkpointer.delete_checkpoints(num_to_keep=1)
    return {
        "seen_before_deleting": seen_before_deleting,
        "deleted": sorted(c.path.name for c in deleted),
        "left": _folders(folder),
    }


def debug_folder(folder: Path) -> Observed:
    """A brain in debug mode sends every process's checkpointer to one temporary folder."""
    checkpointer = Checkpointer(folder / "save", {"model": _model(1.0)})
    Brain(modules={"model": _model(1.0)}, run_opts={"debug": True}, checkpointer=checkpointer)
    checkpoint = checkpointer.save_checkpoint()
    return {
        "folder": str(checkpointer.checkpoints_dir),
        "checkpoint_inside": checkpoint.path.parent == checkpointer.checkpoints_dir,
        "in_real_folder": (folder / "save").exists(),
        "beside_real_folder": checkpointer.checkpoints_dir.parent == folder,
    }


def _save_weights(folder: Path, weights: Sequence[float]) -> list[str]:
    model = _model(0.0)
    checkpointer = Checkpointer(folder, {"model": model})
    names = []
    for weight in weights:
        _fill(model, weight)
        names.append(checkpointer.save_checkpoint().path.name)
    return names


def recover_newest(folder: Path) -> Observed:
    names = _save_weights(folder, (1.0, 2.0, 3.0))
    fresh = _model(0.0)
    checkpointer = Checkpointer(folder, {"model": fresh})
    found = checkpointer.find_checkpoint()
    listed = checkpointer.list_checkpoints()
    recovered = checkpointer.recover_if_possible()
    return {
        "saved": names,
        "found": None if found is None else found.path.name,
        "listed": [c.path.name for c in listed],
        "recovered": None if recovered is None else recovered.path.name,
        "weight": _weight(fresh),
    }


def _recover_fresh(folder: Path) -> Observed:
    """Recover a fresh model from ``folder``: which folder loaded, its weight, the warnings."""
    fresh = _model(0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recovered = Checkpointer(folder, {"model": fresh}).recover_if_possible()
    return {
        "recovered": None if recovered is None else recovered.path.name,
        "weight": _weight(fresh),
        "warnings": _checkpoint_warnings(caught),
    }


def corrupt_newest(folder: Path) -> Observed:
    older, newer = _save_weights(folder, (1.0, 2.0))
    if _rank() == 0:
        damaged = folder / newer / "model.ckpt"
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0xFF
        damaged.write_bytes(bytes(data))
    dist.barrier()
    return {"older": older, "newer": newer, **_recover_fresh(folder)}


def uncommitted(folder: Path) -> Observed:
    committed, uncommitted = _save_weights(folder, (1.0, 9.0))
    if _rank() == 0:
        # The newer folder keeps its (intact) files but loses its commit.
        (folder / uncommitted / MANIFEST_NAME).unlink()
    dist.barrier()
    return {"committed": committed, "uncommitted": uncommitted, **_recover_fresh(folder)}


def _disk_full(obj: list[str], path: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(path))


def _read_journal(obj: list[str], path: Path, end_of_epoch: bool) -> None:
    obj[:] = path.read_text().splitlines()


def _failed_save(folder: Path, checkpointer: Checkpointer) -> Observed:
    started = time.monotonic()
    try:
        checkpointer.save_checkpoint()
    except Exception as error:  # the scenario records whatever was raised
        raised: object = {"type": type(error).__name__, "message": str(error)}
    else:
        raised = None
    seconds = time.monotonic() - started
    dist.barrier()
    return {"raised": raised, "seconds": seconds, "folders": _folders(folder)}


def main_fails_to_save(folder: Path) -> Observed:
    checkpointer = Checkpointer(folder, {"model": _model(1.0)})
    # The save hook runs on the main process only: it fails there, as a full disk would.
    checkpointer.add_recoverable(
        "journal", ["line"], custom_save_hook=_disk_full, custom_load_hook=_read_journal
    )
    return _failed_save(folder, checkpointer)


def state_dict_fails_on_one_process(folder: Path) -> Observed:
    checkpointer = Checkpointer(folder, {"model": _model(1.0), "fragile": FailsOnRank1()})
    return _failed_save(folder, checkpointer)


def _failed_load(
    model: torch.nn.Linear, checkpointer: Checkpointer, checkpoint: Checkpoint
) -> Observed:
    try:
        checkpointer.load_checkpoint(checkpoint)
    except Exception as error:  # the scenario records whatever was raised
        raised: object = {"type": type(error).__name__, "message": str(error)}
    else:
        raised = None
    return {"raised": raised, "weight": _weight(model)}


def different_checkpoints(folder: Path) -> Observed:
    _save_weights(folder, (1.0, 2.0))
    fresh = _model(0.0)
    checkpointer = Checkpointer(folder, {"model": fresh})
    listed = checkpointer.list_checkpoints()
    return _failed_load(fresh, checkpointer, listed[_rank()])


def one_process_fails_to_verify(folder: Path) -> Observed:
    _save_weights(folder, (1.0,))
    fresh = _model(0.0)
    checkpointer = Checkpointer(folder, {"model": fresh})
    checkpoint = checkpointer.list_checkpoints()[0]
    if _rank() == 1:
        # What process 1 would see if its view of the file differed from the main process's.
        record = attrs.evolve(checkpoint.files["model"], sha256=("0" * 64,))
        checkpoint = attrs.evolve(checkpoint, files={"model": record})
    return _failed_load(fresh, checkpointer, checkpoint)


# ----------------------------------------------------------- committing in the background

COMMIT_THREAD: Final = "typedbrain-commit"
"""The name prefix of the thread in which a checkpointer commits its saves in the background."""

RELEASE_WAIT_S: Final = 30.0
"""The longest a held commit waits to be released: a bug must not hang the launch for good."""


def _outcome(call: Callable[[], object]) -> object:
    """``None`` if ``call`` returned, else what it raised: its type, message and notes."""
    try:
        call()
    except Exception as error:  # the scenario records whatever was raised
        notes: list[str] = list(getattr(error, "__notes__", []))
        return {"type": type(error).__name__, "message": str(error), "notes": notes}
    return None


@contextlib.contextmanager
def _in_commit_thread(before_fsync: Callable[[], None]) -> Iterator[list[str]]:
    """Run ``before_fsync`` before each ``os.fsync`` of this process's background commit.

    The fsyncs of other threads (a save's own, say) are left alone. The library calls
    ``os.fsync`` through the ``os`` module, so replacing the module's attribute reaches them.
    Yields the names of the threads ``before_fsync`` ran in, filled in as it runs.
    """
    real = os.fsync
    ran_in: list[str] = []

    def fsync(descriptor: int) -> None:
        name = threading.current_thread().name
        if name.startswith(COMMIT_THREAD):
            ran_in.append(name)
            before_fsync()
        real(descriptor)

    with mock.patch.object(os, "fsync", fsync):
        yield ran_in


def _held_until(marker: Path) -> Callable[[], None]:
    """Something that waits until ``marker`` exists (at most :data:`RELEASE_WAIT_S`)."""

    def hold() -> None:
        deadline = time.monotonic() + RELEASE_WAIT_S
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    return hold


def _fsync_fails() -> None:
    raise OSError(errno.ENOSPC, "No space left on device (simulated)")


class _Records(logging.Handler):
    """Keeps the level and message of each record it handles."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append([record.levelname, record.getMessage()])


@contextlib.contextmanager
def _background_log() -> Iterator[list[list[str]]]:
    """What the ``typedbrain._background`` logger logs meanwhile: [level, message] pairs."""
    handler = _Records()
    background_logger = logging.getLogger("typedbrain._background")
    background_logger.addHandler(handler)
    try:
        yield handler.seen
    finally:
        background_logger.removeHandler(handler)


def _same_everywhere(checkpoint: Checkpoint) -> bool:
    """Whether every process holds a checkpoint equal to ``checkpoint``."""
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, checkpoint)
    return all(other == checkpoint for other in everyone)


def _recovered(folder: Path) -> Observed:
    """Recover a fresh model from ``folder`` (collectively): which folder, and its weight."""
    fresh = _model(0.0)
    checkpointer = Checkpointer(folder, {"model": fresh}, commit_in_background=True)
    recovered = checkpointer.recover_if_possible()
    return {
        "recovered": None if recovered is None else recovered.path.name,
        "weight": _weight(fresh),
    }


def background_keep_only(folder: Path) -> Observed:
    """``save_and_keep_only`` committing in the background, its commit held on the main process.

    The main process's commit thread is held (at its first fsync) until the other process has
    called ``wait()`` and seen it still waiting: so what both see before ``wait()`` returns is
    the checkpoint written but not committed, and nothing deleted yet.
    """
    rank = _rank()
    model = _model(0.0)
    checkpointer = Checkpointer(folder, {"model": model}, commit_in_background=True)
    for weight, name in ((1.0, "first"), (2.0, "second")):
        _fill(model, weight)
        checkpointer.save_and_keep_only(name=name, num_to_keep=2)
    checkpointer.wait()
    released = folder.parent / f"{folder.name}.released"
    _fill(model, 3.0)
    held: contextlib.AbstractContextManager[list[str]] = contextlib.nullcontext([])
    if rank == 0:
        held = _in_commit_thread(_held_until(released))
    with held as held_in:
        saved = checkpointer.save_and_keep_only(name="third", num_to_keep=2)
        same_everywhere = _same_everywhere(saved)
        before_wait = _folders(folder)
        committed_before_wait = (saved.path / MANIFEST_NAME).is_file()
        still_waiting: bool | None = None
        if rank == 0:
            raised = _outcome(checkpointer.wait)
        else:
            outcome: list[object] = []
            waiter = threading.Thread(target=lambda: outcome.append(_outcome(checkpointer.wait)))
            waiter.start()
            waiter.join(timeout=0.3)
            still_waiting = waiter.is_alive()
            released.touch()
            waiter.join(timeout=2 * RELEASE_WAIT_S)
            if waiter.is_alive():
                raise RuntimeError("wait() did not return once the main process could commit")
            raised = outcome[0]
    listed = checkpointer.list_checkpoints()
    return {
        "held": bool(held_in),
        "returned": saved.path.name,
        "same_everywhere": same_everywhere,
        "before_wait": before_wait,
        "committed_before_wait": committed_before_wait,
        "still_waiting": still_waiting,
        "wait_raised": raised,
        "after_wait": _folders(folder),
        "committed_after_wait": (saved.path / MANIFEST_NAME).is_file(),
        "listed": [c.path.name for c in listed],
        "listed_equals_returned": listed[-1] == saved,
        **_recovered(folder),
    }


def _doomed_save(checkpointer: Checkpointer) -> tuple[Checkpoint, bool]:
    """Save ``doomed``; also whether every process got the same checkpoint back."""
    doomed = checkpointer.save_and_keep_only(name="doomed", num_to_keep=1)
    return doomed, _same_everywhere(doomed)


def _save_works_again(folder: Path, checkpointer: Checkpointer, model: torch.nn.Linear) -> Observed:
    """After a failure: save ``again`` (weight 5), wait, and recover it on a fresh model."""
    _fill(model, 5.0)
    again = checkpointer.save_and_keep_only(name="again", num_to_keep=1)
    return {
        "again_same_everywhere": _same_everywhere(again),
        "again_wait_raised": _outcome(checkpointer.wait),
        "again_left": _folders(folder),
        **_recovered(folder),
    }


def background_commit_fails_at_wait(folder: Path) -> Observed:
    """The main process's commit fails (a full disk at fsync); ``wait()`` raises it."""
    model = _model(1.0)
    checkpointer = Checkpointer(folder, {"model": model}, commit_in_background=True)
    checkpointer.save_and_keep_only(name="kept", num_to_keep=1)
    checkpointer.wait()
    failing = _in_commit_thread(_fsync_fails) if _rank() == 0 else contextlib.nullcontext()
    with _background_log() as logged, failing:
        doomed, same_everywhere = _doomed_save(checkpointer)
        raised = _outcome(checkpointer.wait)
    left = _folders(folder)
    return {
        "doomed": str(doomed.path),
        "same_everywhere": same_everywhere,
        "wait_raised": raised,
        "logged": logged,
        "left": left,
        "wait_raised_again": _outcome(checkpointer.wait),
        **_save_works_again(folder, checkpointer, model),
    }


def background_commit_fails_at_next_save(folder: Path) -> Observed:
    """The main process's commit fails (a full disk at fsync); the next save raises it."""
    model = _model(1.0)
    checkpointer = Checkpointer(folder, {"model": model}, commit_in_background=True)
    checkpointer.save_and_keep_only(name="kept", num_to_keep=1)
    checkpointer.wait()
    failing = _in_commit_thread(_fsync_fails) if _rank() == 0 else contextlib.nullcontext()
    with failing:
        doomed, same_everywhere = _doomed_save(checkpointer)
        raised = _outcome(lambda: checkpointer.save_checkpoint(name="next"))
    left = _folders(folder)
    return {
        "doomed": str(doomed.path),
        "same_everywhere": same_everywhere,
        "save_raised": raised,
        "left": left,
        "wait_raised": _outcome(checkpointer.wait),
        **_save_works_again(folder, checkpointer, model),
    }


def background_modes_differ(folder: Path) -> Observed:
    """The main process commits in the background, the other does not: the save is refused."""
    model = _model(1.0)
    checkpointer = Checkpointer(folder, {"model": model}, commit_in_background=_rank() == 0)
    raised = _outcome(lambda: checkpointer.save_checkpoint(name="mixed"))
    return {"raised": raised, "left": _folders(folder) if folder.exists() else []}


GROUPS: Final[Mapping[str, Mapping[str, Scenario]]] = {
    "working": {
        "save_once": save_once,
        "gathered_state": gathered_state,
        "keep_only": keep_only,
        "slow_reader": slow_reader,
        "debug_folder": debug_folder,
        "recover_newest": recover_newest,
        "corrupt_newest": corrupt_newest,
        "uncommitted": uncommitted,
    },
    "failing": {
        "main_fails_to_save": main_fails_to_save,
        "state_dict_fails_on_one_process": state_dict_fails_on_one_process,
        "different_checkpoints": different_checkpoints,
        "one_process_fails_to_verify": one_process_fails_to_verify,
    },
    "background": {
        "background_keep_only": background_keep_only,
        "background_modes_differ": background_modes_differ,
        "background_commit_fails_at_wait": background_commit_fails_at_wait,
        "background_commit_fails_at_next_save": background_commit_fails_at_next_save,
    },
}


def main(argv: Sequence[str]) -> int:
    """Run the scenarios of a group in this process (see the module's docstring)."""
    group, scratch, results, pg_timeout = argv
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(pg_timeout)))
    try:
        rank = dist.get_rank()
        for name, scenario in GROUPS[group].items():
            folder = Path(scratch) / name
            if rank == 0:
                folder.mkdir(parents=True)
            dist.barrier()
            observed = scenario(folder)
            path = Path(results) / f"{name}.rank{rank}.json"
            path.write_text(json.dumps(observed), encoding="utf-8")
    finally:
        # Every process waits for the others before the group goes, on failure too: a
        # process that tore its connections down first could make gloo abort a peer.
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

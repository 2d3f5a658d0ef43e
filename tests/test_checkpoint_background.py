"""Checkpointer(commit_in_background=True): a save returns before its commit, which follows.

The background thread is held back by an ``os.fsync`` that waits for the test (never by
timing): while it waits, the save has returned and its checkpoint is not committed yet.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from typedbrain import _checkpoint, _manifest
from typedbrain._checkpoint import Checkpoint, Checkpointer
from typedbrain._epochs import EpochCounter
from typedbrain._errors import CheckpointError, CheckpointWarning, ConfigurationError
from typedbrain._folder_lock import LOCK_NAME
from typedbrain._manifest import DIGEST_KEY, MANIFEST_NAME

# The repository holding this file: the scripts run there import the same typedbrain.
ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30  # how long a held fsync waits at most, so that a bug cannot hang the suite
BACKGROUND_NOTE = "in the background, after the save returned"


def entries(folder: Path) -> list[str]:
    """The names in ``folder``, sorted, but the writer lock file."""
    return sorted(entry.name for entry in folder.iterdir() if entry.name != LOCK_NAME)


def fd_path(descriptor: int) -> str:
    """The path of the open file ``descriptor`` (Linux)."""
    return os.readlink(f"/proc/self/fd/{descriptor}")


class HeldFsync:
    """``os.fsync`` held until :meth:`release` (or ``WAIT_S``), then the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.released = threading.Event()
        self.reached = threading.Event()  # some fsync is waiting
        self.synced: list[str] = []
        real = os.fsync

        def held(descriptor: int) -> None:
            self.reached.set()
            self.released.wait(WAIT_S)
            self.synced.append(fd_path(descriptor))
            real(descriptor)

        monkeypatch.setattr(os, "fsync", held)

    def release(self) -> None:
        """Let every fsync, waiting or to come, through."""
        self.released.set()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldFsync]:
    """``os.fsync`` held back; let through at the end of the test whatever happened."""
    gate = HeldFsync(monkeypatch)
    try:
        yield gate
    finally:
        gate.release()


def linear(value: float, size: int = 3) -> torch.nn.Linear:
    """A linear layer whose weights and bias are all ``value``."""
    model = torch.nn.Linear(size, size)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def filled_with(model: torch.nn.Linear, value: float) -> bool:
    """Whether every parameter of ``model`` is ``value``."""
    return all(bool((tensor == value).all()) for tensor in model.state_dict().values())


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Start ``call`` in a thread; the list gets its result (or the exception it raised)."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as error:  # handed to the test, which asserts on it
            result.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def waits_for_the_commit(call: Callable[[], object], held: HeldFsync) -> list[object]:
    """Run ``call`` in a thread, check it still waits while the commit is held, release it.

    Returns what ``call`` returned (or raised), in a list.
    """
    thread, result = in_thread(call)
    thread.join(timeout=0.3)
    assert thread.is_alive()  # still waiting for the commit
    held.release()
    thread.join(WAIT_S)
    return result


def run_script(script: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new Python process, from the repository, with ``folder`` as argument."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def save_json(obj: dict[str, int], path: Path) -> None:
    """A save hook: ``obj`` as JSON."""
    path.write_text(json.dumps(obj))


def load_json(obj: dict[str, int], path: Path, end_of_epoch: bool) -> None:
    """The load hook of :func:`save_json`."""
    obj.update(json.loads(path.read_text()))


# ------------------------------------------------------------------------------- the mode


def test_a_save_returns_before_its_files_are_synced_and_commits_once_released(
    tmp_path: Path, held: HeldFsync
) -> None:
    model = linear(1.0)
    checkpointer = Checkpointer(tmp_path, {"model": model}, commit_in_background=True)
    saved = checkpointer.save_checkpoint(meta={"epoch": 1})
    assert held.reached.wait(WAIT_S)  # the background thread is at its first fsync
    # Returned while no file is synced: the files are written, the manifest is not.
    assert entries(saved.path) == ["model.ckpt"]
    assert (saved.path / "model.ckpt").stat().st_size > 0
    assert held.synced == []
    with torch.no_grad():
        model.weight.fill_(5.0)  # training goes on; the checkpoint holds what was saved
    held.release()
    checkpointer.wait()
    assert (saved.path / MANIFEST_NAME).is_file()
    assert checkpointer.list_checkpoints() == [saved]
    fresh = linear(0.0)
    assert Checkpointer(tmp_path, {"model": fresh}).recover_if_possible() == saved
    assert filled_with(fresh, 1.0)


def test_every_file_is_synced_in_the_background_before_the_manifest_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str, str]] = []  # (what, path, thread)
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        calls.append(("fsync", fd_path(descriptor), threading.current_thread().name))
        real_fsync(descriptor)

    def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        calls.append(("replace", os.fspath(target), threading.current_thread().name))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    checkpointer.add_recoverable(
        "notes", {"a": 1}, custom_save_hook=save_json, custom_load_hook=load_json
    )
    saved = checkpointer.save_checkpoint()
    checkpointer.wait()
    order = [(what, path) for what, path, _ in calls]
    commit = order.index(("replace", str(saved.path / MANIFEST_NAME)))
    for path in saved.paramfiles.values():
        assert order.index(("fsync", str(path))) < commit, path
    assert order.index(("fsync", str(saved.path / ".MANIFEST.json.tmp"))) < commit
    # Then the rename is made durable: the checkpoint's folder, then the checkpoints folder.
    folder_synced = order.index(("fsync", str(saved.path)), commit)
    assert order.index(("fsync", str(tmp_path)), folder_synced) > folder_synced
    threads = {thread for _, _, thread in calls}
    assert len(threads) == 1
    assert threads.pop().startswith("typedbrain-commit")


def test_a_listing_started_during_the_commit_waits_for_it_and_sees_the_checkpoint(
    tmp_path: Path, held: HeldFsync
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    saved = checkpointer.save_checkpoint()
    assert waits_for_the_commit(checkpointer.list_checkpoints, held) == [[saved]]


def test_waits_in_two_threads_both_wait_for_the_commit_and_its_failure_is_raised_once(
    tmp_path: Path, held: HeldFsync, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    held_fsync = os.fsync

    def full_disk(descriptor: int) -> None:
        held_fsync(descriptor)  # waits for the release first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    checkpointer.save_checkpoint()
    first, first_result = in_thread(checkpointer.wait)
    first.join(timeout=0.3)  # the first is waiting by now
    second, second_result = in_thread(checkpointer.wait)
    second.join(timeout=0.3)
    assert first.is_alive()
    assert second.is_alive()
    held.release()
    first.join(WAIT_S)
    second.join(WAIT_S)
    outcomes = first_result + second_result
    failures = [outcome for outcome in outcomes if isinstance(outcome, OSError)]
    assert len(failures) == 1
    assert outcomes.count(None) == 1
    assert failures[0].errno == errno.ENOSPC
    assert sum(BACKGROUND_NOTE in note for note in failures[0].__notes__) == 1


def test_a_recovery_started_during_the_commit_waits_for_it_and_loads_the_checkpoint(
    tmp_path: Path, held: HeldFsync
) -> None:
    model = linear(1.0)
    checkpointer = Checkpointer(tmp_path, {"model": model}, commit_in_background=True)
    saved = checkpointer.save_checkpoint()
    with torch.no_grad():
        model.weight.fill_(5.0)
        model.bias.fill_(5.0)
    recovering, recovered = in_thread(checkpointer.recover_if_possible)
    recovering.join(timeout=0.3)
    assert recovering.is_alive()  # still waiting for the commit
    assert filled_with(model, 5.0)
    held.release()
    recovering.join(WAIT_S)
    assert recovered == [saved]
    assert filled_with(model, 1.0)


def test_the_files_of_a_returned_checkpoint_are_read_once_committed_and_its_repr_never_waits(
    tmp_path: Path, held: HeldFsync
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    saved = checkpointer.save_checkpoint()
    assert held.reached.wait(WAIT_S)
    assert str(saved.path) in repr(saved)  # does not wait for the commit
    reading, read = in_thread(lambda: dict(saved.files))
    reading.join(timeout=0.3)
    assert reading.is_alive()  # still waiting for the commit
    held.release()
    reading.join(WAIT_S)
    [committed] = checkpointer.list_checkpoints()
    assert read == [dict(committed.files)]
    assert saved == committed
    assert saved.paramfiles == {"model": saved.path / "model.ckpt"}


# ------------------------------------------------------------------------- failures


def _one_full_disk(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The next ``os.fsync`` raises ENOSPC (no file named), the later ones sync; the list gets
    the path of the file whose sync failed."""
    real = os.fsync
    failed: list[str] = []

    def fsync(descriptor: int) -> None:
        if not failed:
            failed.append(fd_path(descriptor))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def test_a_full_disk_in_the_background_is_raised_by_wait_once_and_its_folder_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    first = checkpointer.save_checkpoint()
    checkpointer.wait()
    failed = _one_full_disk(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="typedbrain._background"):
        lost = checkpointer.save_checkpoint()  # returns normally
        with pytest.raises(OSError, match="No space left on device") as caught:
            checkpointer.wait()
    error = caught.value
    assert error.errno == errno.ENOSPC
    assert failed == [str(lost.path / "model.ckpt")]
    assert error.filename == str(lost.path / "model.ckpt")
    assert any(str(lost.path) in note and BACKGROUND_NOTE in note for note in error.__notes__), (
        error.__notes__
    )
    assert not lost.path.exists()
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(lost.path))} was not"):
        lost.files["model"]  # reading the records of a checkpoint never committed
    logged = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(logged) == 1
    assert logged[0].name == "typedbrain._background"
    assert str(lost.path) in logged[0].getMessage()
    assert "No space left on device" in logged[0].getMessage()
    checkpointer.wait()  # raised once
    assert checkpointer.list_checkpoints() == [first]
    following = checkpointer.save_checkpoint()
    checkpointer.wait()
    assert following.sequence == first.sequence + 1
    assert checkpointer.list_checkpoints() == [first, following]


def test_a_full_disk_in_the_background_is_raised_by_the_next_save_which_saves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    first = checkpointer.save_checkpoint()
    checkpointer.wait()
    _one_full_disk(monkeypatch)
    lost = checkpointer.save_checkpoint()
    with pytest.raises(OSError, match="No space left on device") as caught:
        checkpointer.save_checkpoint(meta={"epoch": 3})
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(lost.path / "model.ckpt")
    assert any(BACKGROUND_NOTE in note for note in caught.value.__notes__)
    assert entries(tmp_path) == [first.path.name]  # the failed save's, and no new folder
    checkpointer.wait()  # the failure was raised already
    assert checkpointer.list_checkpoints() == [first]


def test_listing_does_not_raise_a_failure_of_the_background_which_wait_raises_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    _one_full_disk(monkeypatch)
    checkpointer.save_checkpoint()
    assert checkpointer.list_checkpoints() == []
    with pytest.raises(OSError, match="No space left on device"):
        checkpointer.wait()


def test_a_commit_whose_folder_sync_fails_after_the_rename_stands_and_wait_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync

    def fsync(descriptor: int) -> None:
        path = fd_path(descriptor)
        if os.path.dirname(path) == str(tmp_path) and os.path.isdir(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # the new checkpoint's folder
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    model = linear(1.0)
    checkpointer = Checkpointer(tmp_path, {"model": model}, commit_in_background=True)
    saved = checkpointer.save_checkpoint()
    with pytest.raises(OSError, match="is committed, but syncing the folder") as caught:
        checkpointer.wait()
    assert caught.value.errno == errno.EIO
    monkeypatch.undo()
    assert (saved.path / MANIFEST_NAME).is_file()  # it stands
    [committed] = checkpointer.list_checkpoints()
    assert dict(saved.files) == dict(committed.files)  # its records are readable
    with torch.no_grad():
        model.weight.fill_(5.0)
    assert checkpointer.recover_if_possible() == saved
    assert bool((model.weight == 1.0).all())


# ------------------------------------------------------------------------ keep policies


def test_save_and_keep_only_deletes_the_old_checkpoint_only_once_the_new_one_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    old = checkpointer.save_and_keep_only(num_to_keep=1)
    checkpointer.wait()
    held = HeldFsync(monkeypatch)
    try:
        new = checkpointer.save_and_keep_only(num_to_keep=1)
        assert held.reached.wait(WAIT_S)
        assert (old.path / MANIFEST_NAME).is_file()  # still there, still committed
        assert not (new.path / MANIFEST_NAME).exists()
    finally:
        held.release()
    checkpointer.wait()
    assert entries(tmp_path) == [new.path.name]
    assert checkpointer.list_checkpoints() == [new]


def test_an_importance_key_returning_a_non_number_is_raised_by_wait_and_deletes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    old = checkpointer.save_checkpoint()

    def level(checkpoint: Checkpoint) -> float:
        return "high"  # type: ignore[return-value]  # not a number: the case

    with caplog.at_level(logging.ERROR, logger="typedbrain._background"):
        new = checkpointer.save_and_keep_only(
            num_to_keep=1, keep_recent=False, importance_keys=[level]
        )
        with pytest.raises(
            ConfigurationError, match=r"importance key .*level' returned 'high'"
        ) as caught:
            checkpointer.wait()
    notes = caught.value.__notes__
    assert f"(checkpoint {new.path} was saved; none was deleted)" in notes
    assert any(BACKGROUND_NOTE in note for note in notes)
    assert any(str(new.path) in record.getMessage() for record in caplog.records)
    assert checkpointer.list_checkpoints() == [old, new]  # committed; nothing deleted
    checkpointer.wait()


def _deletions_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keep policy can delete no checkpoint: each one it tries is warned about and kept."""

    def refused(checkpoint: Checkpoint) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(checkpoint.path))

    monkeypatch.setattr(_checkpoint, "_delete_folder", refused)


def test_a_warning_of_the_commit_is_logged_there_and_issued_once_by_wait_in_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    old = checkpointer.save_checkpoint()
    _deletions_refused(monkeypatch)
    with (
        caplog.at_level(logging.WARNING, logger="typedbrain._background"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        new = checkpointer.save_and_keep_only(num_to_keep=1)
        assert checkpointer.list_checkpoints() == [old, new]  # waited for the commit
        assert caught == []  # issued neither in the commit's thread nor by the listing
        checkpointer.wait()
        checkpointer.wait()  # issued once
    [warned] = caught
    assert warned.category is CheckpointWarning
    assert f"could not delete checkpoint {old.path}" in str(warned.message)
    assert warned.filename == __file__  # attributed to the call of wait() above
    [logged] = caplog.records
    assert logged.levelno == logging.WARNING
    assert str(logged.threadName).startswith("typedbrain-commit")
    assert f"could not delete checkpoint {old.path}" in logged.getMessage()


def test_a_warning_of_the_commit_that_a_filter_makes_an_error_is_raised_by_wait_not_as_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    old = checkpointer.save_checkpoint()
    _deletions_refused(monkeypatch)
    with (
        caplog.at_level(logging.WARNING, logger="typedbrain._background"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error", CheckpointWarning)
        new = checkpointer.save_and_keep_only(num_to_keep=1)
        with pytest.raises(CheckpointWarning, match=re.escape(str(old.path))) as raised:
            checkpointer.wait()
        checkpointer.wait()
    assert not any(BACKGROUND_NOTE in note for note in getattr(raised.value, "__notes__", []))
    assert [record.levelno for record in caplog.records] == [logging.WARNING]  # no failure
    assert checkpointer.list_checkpoints() == [old, new]  # committed; nothing deleted


# ------------------------------------------------------------------- what is committed


def test_a_save_hooks_file_is_committed_with_the_records_of_the_default_mode_and_loads_back(
    tmp_path: Path, held: HeldFsync
) -> None:
    def checkpointer(folder: Path, state: dict[str, int], background: bool) -> Checkpointer:
        made = Checkpointer(folder, commit_in_background=background)
        made.add_recoverable("state", state, custom_save_hook=save_json, custom_load_hook=load_json)
        return made

    state = {"a": 1, "b": 2}
    background = checkpointer(tmp_path / "background", state, background=True)
    saved = background.save_checkpoint()
    # Hashed before the save returned, while its sync waits in the background.
    assert held.reached.wait(WAIT_S)
    assert not (saved.path / MANIFEST_NAME).exists()
    held.release()
    default = checkpointer(tmp_path / "default", dict(state), background=False).save_checkpoint()
    assert saved.files == default.files
    background.wait()
    assert background.list_checkpoints() == [saved]
    state.update(a=7, b=8)
    assert background.recover_if_possible() == saved
    assert state == {"a": 1, "b": 2}


def test_a_background_save_writes_the_files_and_records_of_a_default_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_manifest, "PIECE_BYTES", 256)  # several pieces per file
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    saved = {}
    for background in (True, False):
        checkpointer = Checkpointer(
            tmp_path / str(background),
            {"model": model, "counter": EpochCounter(4)},
            commit_in_background=background,
        )
        saved[background] = checkpointer.save_checkpoint(meta={"loss": 0.5}, name="same")
        checkpointer.wait()
    assert len(saved[True].files["model"].sha256) > 1
    assert saved[True].files == saved[False].files
    for name, path in saved[True].paramfiles.items():
        assert path.read_bytes() == saved[False].paramfiles[name].read_bytes(), name

    def manifest(checkpoint: Checkpoint) -> dict[str, object]:
        data = json.loads((checkpoint.path / MANIFEST_NAME).read_text())
        assert isinstance(data, dict)
        return {k: v for k, v in data.items() if k not in ("unixtime", DIGEST_KEY)}

    assert manifest(saved[True]) == manifest(saved[False])


def test_the_default_mode_returns_only_once_every_file_is_synced_and_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    returned = threading.Event()
    real = os.fsync

    def fsync(descriptor: int) -> None:
        if threading.current_thread().name.startswith("typedbrain-commit"):
            # A commit thread, which this mode must not start, would sync after the return.
            returned.wait(WAIT_S)
        synced.append(fd_path(descriptor))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpointer = Checkpointer(tmp_path, {"model": linear(1.0), "counter": EpochCounter(3)})
    assert checkpointer.commit_in_background is False
    try:
        saved = checkpointer.save_checkpoint()
        assert (saved.path / MANIFEST_NAME).is_file()
    finally:
        returned.set()
    during = list(synced)
    for path in (*saved.paramfiles.values(), saved.path, tmp_path):
        assert str(path) in during, path
    checkpointer.wait()
    checkpointer.list_checkpoints()
    assert synced == during  # nothing was left to a background thread


def test_commit_in_background_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="commit_in_background"):
        Checkpointer(tmp_path, commit_in_background="yes")  # type: ignore[arg-type]  # the check


# ------------------------------------------------------------------- the process ending

# Saves in the background, and ends at once: off the main thread, os.stat and os.fsync (the
# first reading and syncing of a file) are held until the main thread has left this script,
# so that the commit (hashing, syncing, renaming) runs while the interpreter shuts down.
_ENDS_AT_ONCE = """
import os, sys, threading, time
import torch
from typedbrain import Checkpointer

def in_script():
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_filename == "<string>":
            return True
        frame = frame.f_back
    return False

def after_main(real):
    def held(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            for _ in range(3000):
                if not in_script():
                    break
                time.sleep(0.01)
        return real(*args, **kwargs)
    return held

os.stat, os.fsync = after_main(os.stat), after_main(os.fsync)
checkpointer = Checkpointer(sys.argv[1], {"model": torch.nn.Linear(2, 2)},
                            commit_in_background=True)
print(checkpointer.save_checkpoint().path, flush=True)
"""


@pytest.mark.slow
def test_a_process_that_ends_right_after_a_save_commits_it_first(tmp_path: Path) -> None:
    ended = run_script(_ENDS_AT_ONCE, tmp_path)
    assert ended.returncode == 0, ended.stderr
    [saved] = Checkpointer(tmp_path).list_checkpoints()
    assert str(saved.path) == ended.stdout.strip()


# Saves a committed checkpoint (weights 1), then one (weights 2) whose commit is held: it says
# so once the save returned, and waits to be killed.
_KILLED_DURING_COMMIT = """
import os, sys, threading
import torch
from typedbrain import Checkpointer

model = torch.nn.Linear(2, 2)
checkpointer = Checkpointer(sys.argv[1], {"model": model}, commit_in_background=True)
with torch.no_grad():
    model.weight.fill_(1.0)
    model.bias.fill_(1.0)
checkpointer.save_checkpoint()
checkpointer.wait()
real, never = os.fsync, threading.Event()

def held(descriptor):
    never.wait(60)
    real(descriptor)

os.fsync = held
with torch.no_grad():
    model.weight.fill_(2.0)
    model.bias.fill_(2.0)
print("returned", checkpointer.save_checkpoint().path, flush=True)
never.wait(60)
"""


@pytest.mark.slow
def test_a_process_killed_during_its_commit_leaves_an_uncommitted_folder_skipped_at_the_next_start(
    tmp_path: Path,
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_DURING_COMMIT), str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        said, _, path = process.stdout.readline().strip().partition(" ")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert said == "returned"
    uncommitted = Path(path)
    assert uncommitted.is_dir()
    assert not (uncommitted / MANIFEST_NAME).exists()
    model = torch.nn.Linear(2, 2)
    with pytest.warns(
        CheckpointWarning, match="the save was interrupted before its commit"
    ) as warned:
        recovered = Checkpointer(tmp_path, {"model": model}).recover_if_possible()
    assert any(str(uncommitted) in str(warning.message) for warning in warned)
    assert recovered is not None
    assert recovered.path != uncommitted
    assert filled_with(model, 1.0)


def test_another_checkpointer_of_the_folder_waits_for_the_commit_and_recovers_it(
    tmp_path: Path, held: HeldFsync
) -> None:
    first = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    saved = first.save_checkpoint()
    model = linear(0.0)
    second = Checkpointer(tmp_path, {"model": model})  # a fresh one, in the same process
    assert waits_for_the_commit(second.recover_if_possible, held) == [saved]
    assert filled_with(model, 1.0)


def test_two_checkpointers_saving_in_turn_into_one_folder_number_their_checkpoints_apart(
    tmp_path: Path, held: HeldFsync
) -> None:
    first = Checkpointer(tmp_path, {"model": linear(1.0)}, commit_in_background=True)
    second = Checkpointer(tmp_path, {"model": linear(2.0)}, commit_in_background=True)
    first.save_checkpoint()
    waits_for_the_commit(second.save_checkpoint, held)  # for the first one's commit
    second.wait()
    assert [c.sequence for c in Checkpointer(tmp_path).list_checkpoints()] == [1, 2]


def test_a_save_failing_in_the_foreground_closes_its_files_unhashed_and_removes_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real_hash = _manifest.hash_pieces

    def spy(path: Path, hasher: object) -> object:
        hashed.append(path)
        return real_hash(path, hasher)  # type: ignore[arg-type]  # the hasher it was given

    monkeypatch.setattr(_manifest, "hash_pieces", spy)

    class Broken(torch.nn.Module):
        def state_dict(self, *args: object, **kwargs: object) -> dict[str, object]:  # type: ignore[override]  # a failing state_dict
            raise RuntimeError("no state today")

    checkpointer = Checkpointer(
        tmp_path, {"model": linear(1.0), "broken": Broken()}, commit_in_background=True
    )
    with pytest.raises(RuntimeError, match="no state today"):
        checkpointer.save_checkpoint()
    assert hashed == []  # the model's file, written first, was closed, not hashed and synced
    assert entries(tmp_path) == []
    open_files = []
    for descriptor in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, closed
            open_files.append(os.readlink(f"/proc/self/fd/{descriptor}"))
    held_lock = str(tmp_path / LOCK_NAME)
    assert [t for t in open_files if str(tmp_path) in t and t != held_lock] == []


_FORKED_DURING_COMMIT = """
import os, sys, threading, time
import torch
from typedbrain import Checkpointer, CheckpointError

model = torch.nn.Linear(2, 2)
checkpointer = Checkpointer(sys.argv[1], {"model": model}, commit_in_background=True)
real, release = os.fsync, threading.Event()

def held(descriptor):
    release.wait(60)
    real(descriptor)

os.fsync = held
saved = checkpointer.save_checkpoint()
child = os.fork()
if child == 0:
    checkpointer.list_checkpoints()  # nothing of the parent's commit runs here to wait for
    try:
        len(saved.files)  # the records come to the parent only
    except CheckpointError as error:
        os._exit(3 if "forked from it before the commit was done" in str(error) else 4)
    os._exit(0)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    done, status = os.waitpid(child, os.WNOHANG)
    if done:
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        break
    time.sleep(0.05)
else:
    os.kill(child, 9)
    print("child hung", flush=True)
release.set()
checkpointer.wait()
print("parent", len(checkpointer.list_checkpoints()), flush=True)
"""


@pytest.mark.slow
def test_a_child_forked_during_a_commit_waits_for_nothing_and_cannot_read_the_records(
    tmp_path: Path,
) -> None:
    done = run_script(_FORKED_DURING_COMMIT, tmp_path)
    assert done.stdout.split("\n")[:2] == ["child 3", "parent 1"], done.stderr

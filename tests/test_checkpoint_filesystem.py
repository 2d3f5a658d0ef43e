"""Checkpoints on a misbehaving filesystem: unreadable files, full disks, two runs, bad links."""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from tests.helpers import refuse_opening
from typedbrain import _checkpoint, _cli, _manifest
from typedbrain._checkpoint import Checkpoint, Checkpointer, verify_checkpoint
from typedbrain._epochs import EpochCounter
from typedbrain._errors import (
    CheckpointError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
)
from typedbrain._folder_lock import LOCK_NAME


@contextmanager
def _no_warnings() -> Iterator[None]:
    """Fail if a warning is issued inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------------ unreadable is not damage

UNREADABLE = [
    (errno.EACCES, "Permission denied"),
    (errno.EIO, "Input/output error"),
    (errno.ESTALE, "Stale file handle"),
]


def _two_checkpoints(folder: Path) -> tuple[Checkpoint, Checkpoint]:
    checkpointer = Checkpointer(folder, {"model": torch.nn.Linear(2, 2)})
    return checkpointer.save_checkpoint(meta={"epoch": 1}), checkpointer.save_checkpoint(
        meta={"epoch": 2}
    )


def _failing_open(monkeypatch: pytest.MonkeyPatch, target: Path, code: int, text: str) -> None:
    """Opening ``target`` fails with the OS error ``code``; every other file opens."""
    refuse_opening(monkeypatch, target, OSError(code, text, str(target)))


@pytest.mark.parametrize(("code", "text"), UNREADABLE)
def test_an_unreadable_file_stops_recovery_instead_of_falling_back_and_nothing_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, text: str
) -> None:
    older, newest = _two_checkpoints(tmp_path)
    model = torch.nn.Linear(2, 2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    _failing_open(monkeypatch, newest.paramfiles["model"], code, text)
    fresh = Checkpointer(tmp_path, {"model": model})
    with pytest.raises(CheckpointError) as caught:
        fresh.recover_if_possible()
    # Not damage: the skip-and-fall-back path (and a later keep policy deleting the newest,
    # intact checkpoint) is for CorruptCheckpointError only.
    assert not isinstance(caught.value, CorruptCheckpointError)
    message = str(caught.value)
    assert str(newest.paramfiles["model"]) in message
    assert text in message
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == code
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert fresh.list_checkpoints() == [older, newest]


def test_an_unreadable_file_is_not_damage_for_verify_checkpoint_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, newest = _two_checkpoints(tmp_path)
    _failing_open(monkeypatch, newest.paramfiles["model"], errno.EIO, "Input/output error")
    with pytest.raises(CheckpointError, match="Input/output error") as caught:
        verify_checkpoint(newest.path)
    assert not isinstance(caught.value, CorruptCheckpointError)


def test_a_missing_file_is_still_damage_and_skipped_for_the_older_checkpoint(
    tmp_path: Path,
) -> None:
    # The negative control of the tests above: damage goes on being skipped.
    older, newest = _two_checkpoints(tmp_path)
    newest.paramfiles["model"].unlink()
    with pytest.warns(CheckpointWarning, match="is missing"):
        assert Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)}).recover_if_possible() == (
            older
        )


def _checkpoint_folders(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name != LOCK_NAME)


def _failing_manifest(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    manifest = folder / "MANIFEST.json"
    refuse_opening(
        monkeypatch, manifest, PermissionError(errno.EACCES, "Permission denied", str(manifest))
    )


def test_an_unreadable_manifest_is_an_error_not_an_uncommitted_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, newest = _two_checkpoints(tmp_path)
    _failing_manifest(monkeypatch, newest.path)
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    manifest = str(newest.path / "MANIFEST.json")
    for action in (checkpointer.list_checkpoints, checkpointer.recover_if_possible):
        with pytest.raises(CheckpointError, match="Permission denied") as caught:
            action()
        assert not isinstance(caught.value, CorruptCheckpointError)
        assert manifest in str(caught.value)
    # Its sequence number is unknown: a new checkpoint is not numbered without it.
    before = _checkpoint_folders(tmp_path)
    with pytest.raises(CheckpointError, match="Permission denied"):
        checkpointer.save_and_keep_only(num_to_keep=0)
    assert _checkpoint_folders(tmp_path) == before  # nothing written, nothing deleted
    monkeypatch.undo()
    assert len(checkpointer.list_checkpoints()) == 2


def test_a_folder_this_process_cannot_look_into_is_skipped_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk's ``lost+found`` (root's, mode 700) in the checkpoints folder, say."""
    _, newest = _two_checkpoints(tmp_path)
    private = tmp_path / "lost+found"
    private.mkdir()
    _failing_manifest(monkeypatch, private)
    real_lstat = os.lstat

    def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(path) == private / "MANIFEST.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr("typedbrain._manifest.os.lstat", lstat)
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    with pytest.warns(CheckpointWarning, match="lost\\+found.*cannot look into the folder"):
        assert [c.path for c in checkpointer.list_checkpoints()][-1] == newest.path
    assert checkpointer.recover_if_possible() == newest


def test_the_command_line_lists_an_unreadable_checkpoint_as_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    oldest, newest = _two_checkpoints(tmp_path)
    _failing_manifest(monkeypatch, newest.path)
    assert _cli.main(["checkpoints", str(tmp_path)]) == 1
    output = capsys.readouterr().out
    assert f"{newest.path.name}: UNREADABLE: cannot read {newest.path / 'MANIFEST.json'}" in output
    assert oldest.path.name in output


def _refuse_folder_renames(monkeypatch: pytest.MonkeyPatch, refusal: OSError) -> None:
    """Make the checkpointer's renames of a folder fail with ``refusal`` (files still rename)."""
    real_rename = os.rename

    def rename(source: Any, destination: Any) -> None:
        if Path(source).is_dir():
            raise type(refusal)(refusal.errno, refusal.strerror, str(source))
        real_rename(source, destination)

    monkeypatch.setattr("typedbrain._checkpoint.os.rename", rename)


def test_where_folders_cannot_be_renamed_a_keep_policy_deletes_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a gcsfuse mount, which refuses to rename a folder."""
    _refuse_folder_renames(monkeypatch, OSError(errno.ENOTSUP, "Operation not supported"))
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    saved = [checkpointer.save_and_keep_only(num_to_keep=1) for _ in range(3)]
    newest = saved[-1]
    assert [c.path for c in checkpointer.list_checkpoints()] == [newest.path]
    assert _checkpoint_folders(tmp_path) == [newest.path.name]


def test_an_io_error_on_a_manifest_is_raised_even_when_its_folder_cannot_be_stat_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dying disk or a stale NFS handle fails both: not a folder to skip, nor damage."""
    _, newest = _two_checkpoints(tmp_path)
    real_lstat = os.lstat
    manifest = newest.path / "MANIFEST.json"

    def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(path) == manifest:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_lstat(path, *args, **kwargs)

    refuse_opening(monkeypatch, manifest, OSError(errno.EIO, "Input/output error", str(manifest)))
    monkeypatch.setattr("typedbrain._manifest.os.lstat", lstat)
    with pytest.raises(CheckpointError, match="Input/output error") as caught:
        Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)}).recover_if_possible()
    assert not isinstance(caught.value, CorruptCheckpointError)


def test_the_command_line_lists_a_folder_it_cannot_look_into_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _two_checkpoints(tmp_path)
    private = tmp_path / "lost+found"
    private.mkdir()
    manifest = private / "MANIFEST.json"
    real_lstat, real_stat, real_exists = os.lstat, os.stat, Path.exists

    def refused(path: object) -> PermissionError:
        return PermissionError(errno.EACCES, "Permission denied", str(path))

    def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(path) == manifest:
            raise refused(path)
        return real_lstat(path, *args, **kwargs)

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(path) == manifest:
            raise refused(path)
        return real_stat(path, *args, **kwargs)

    def exists(self: Path, *args: Any, **kwargs: Any) -> bool:
        # As Path.exists answers from Python 3.13 on (3.11 raises): the listing must not
        # take the folder for an uncommitted one.
        return False if self == manifest else real_exists(self, *args, **kwargs)

    refuse_opening(monkeypatch, manifest, refused(manifest))
    monkeypatch.setattr("typedbrain._manifest.os.lstat", lstat)
    monkeypatch.setattr("typedbrain._cli.os.stat", stat)
    monkeypatch.setattr(Path, "exists", exists)
    assert _cli.main(["checkpoints", str(tmp_path)]) == 1
    assert "lost+found: UNREADABLE: cannot look into the folder" in capsys.readouterr().out


def test_the_command_line_says_so_when_it_cannot_list_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_iterdir = Path.iterdir

    def iterdir(self: Path) -> Any:
        if self == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert _cli.main(["checkpoints", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error == f"typedbrain: error: {tmp_path}: cannot list the folder: Permission denied\n"


# ---------------------------------------------------------------------------- full disks


def _full_at_fsync(monkeypatch: pytest.MonkeyPatch, failing_call: int) -> None:
    """The ``failing_call``-th ``os.fsync`` (from 1) reports a full disk, as NFS does."""
    real_fsync = os.fsync
    calls = 0

    def fsync(descriptor: int) -> None:
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr("typedbrain._manifest.os.fsync", fsync)


def _one_recoverable(folder: Path) -> tuple[Checkpointer, Checkpoint]:
    checkpointer = Checkpointer(folder, {"model": torch.nn.Linear(2, 2)})
    return checkpointer, checkpointer.save_checkpoint()


@pytest.mark.parametrize(
    ("failing_call", "named"),
    [(1, "model.ckpt"), (2, ".MANIFEST.json.tmp")],
    ids=["syncing a file", "syncing the manifest"],
)
def test_a_full_disk_at_fsync_before_the_commit_names_the_file_and_removes_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int, named: str
) -> None:
    checkpointer, good = _one_recoverable(tmp_path)
    _full_at_fsync(monkeypatch, failing_call)
    with pytest.raises(OSError, match="No space left on device") as caught:
        checkpointer.save_checkpoint()
    monkeypatch.undo()
    assert type(caught.value) is OSError
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename is not None
    assert Path(caught.value.filename).name == named
    assert Path(caught.value.filename).parent.parent == tmp_path
    assert "No space left on device" in str(caught.value)
    assert checkpointer.list_checkpoints() == [good]
    assert [path for path in tmp_path.iterdir() if path.name != LOCK_NAME] == [good.path]


@pytest.mark.parametrize("failing_call", [3, 4], ids=["its own folder", "the checkpoints folder"])
def test_a_failed_folder_sync_after_the_commit_says_the_checkpoint_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    checkpointer, good = _one_recoverable(tmp_path)
    _full_at_fsync(monkeypatch, failing_call)
    with pytest.raises(OSError, match="is committed, but syncing the folder") as caught:
        checkpointer.save_checkpoint()
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    # The manifest was renamed into place: the checkpoint exists, and was not removed.
    listed = checkpointer.list_checkpoints()
    assert len(listed) == 2
    assert listed[0] == good
    assert str(listed[1].path) in str(caught.value)


def test_a_full_disk_writing_the_manifest_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer, good = _one_recoverable(tmp_path)

    def full(folder: Path, text: str) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")  # as the buffered close does

    monkeypatch.setattr(_manifest, "write_temp_manifest", full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        checkpointer.save_checkpoint()
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert Path(caught.value.filename).name == ".MANIFEST.json.tmp"
    assert Path(caught.value.filename).parent.parent == tmp_path
    assert checkpointer.list_checkpoints() == [good]


class _FullAtFlush:
    """A file whose buffered flush (and close) reports a full disk."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self) -> int:
        return self._stream.fileno()

    def close(self) -> None:
        self._stream.close()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_buffered_flush_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer, good = _one_recoverable(tmp_path)
    real_open = Path.open

    def opening(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> object:
        stream = real_open(self, mode, *args, **kwargs)
        return _FullAtFlush(stream) if mode == "wb" else stream

    monkeypatch.setattr(Path, "open", opening)
    with pytest.raises(OSError, match=r"No space left on device \(recoverable 'model'\)") as caught:
        checkpointer.save_checkpoint()
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert Path(caught.value.filename).name == "model.ckpt"
    assert checkpointer.list_checkpoints() == [good]


# ---------------------------------------------------------------------------- one run per folder


@pytest.fixture
def other_run(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``'s writer lock, held as another run holds it (its own open file, recorded).

    ``flock`` locks belong to an open file, so a second open file in this process conflicts
    with the checkpointer's as another process's would.
    """
    descriptor = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    record = {"pid": 4242, "host": "node-7", "since": "2026-01-02 03:04:05 +0000"}
    os.write(descriptor, json.dumps(record).encode())
    yield tmp_path
    os.close(descriptor)


def test_a_second_run_cannot_write_to_a_folder_another_run_writes_to(other_run: Path) -> None:
    checkpointer = Checkpointer(other_run, {"counter": EpochCounter(3)})
    expected = (
        rf"checkpoints folder {re.escape(str(other_run))}: it is in use by process 4242 on host "
        "node-7 since "
        "2026-01-02 03:04:05 \\+0000: two runs must not write to one checkpoint folder"
    )
    for write in (
        checkpointer.save_checkpoint,
        checkpointer.save_and_keep_only,
        checkpointer.delete_checkpoints,
    ):
        with pytest.raises(CheckpointError, match=expected):
            write()
    assert [path.name for path in other_run.iterdir()] == [LOCK_NAME]


def _refused_lock_open(monkeypatch: pytest.MonkeyPatch, flag: int, code: int) -> None:
    """Opening the lock file with ``flag`` fails with ``code`` (as for another user, or RO)."""
    real_open = os.open

    def opening(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path).name == LOCK_NAME and flags & flag:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("typedbrain._folder_lock.os.open", opening)


def test_the_lock_file_is_made_as_the_umask_says_so_a_group_shares_the_folder(
    tmp_path: Path,
) -> None:
    previous = os.umask(0o002)
    try:
        Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)}).save_checkpoint()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / LOCK_NAME).stat().st_mode) == 0o664


def test_a_lock_file_this_user_cannot_write_is_locked_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made by another member of the group whose umask kept it from the group."""
    (tmp_path / LOCK_NAME).write_text('{"pid": 1, "host": "elsewhere", "since": "then"}\n')
    _refused_lock_open(monkeypatch, os.O_RDWR, errno.EACCES)
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    checkpointer.save_checkpoint()
    monkeypatch.undo()
    # Held all the same: another process is refused.
    descriptor = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(descriptor)
    assert "elsewhere" in (tmp_path / LOCK_NAME).read_text()  # no record written over it
    del checkpointer


def test_reading_takes_no_lock(other_run: Path) -> None:
    assert Checkpointer(other_run).recover_if_possible() is None
    assert Checkpointer(other_run).list_checkpoints() == []


def test_recovering_says_so_when_a_live_process_of_this_host_holds_the_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Said at INFO, not warned: an evaluation next to the training is legitimate."""
    descriptor = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The parent of this process: alive, on this host, and not this process.
        record = {"pid": os.getppid(), "host": socket.gethostname(), "since": "earlier"}
        os.write(descriptor, json.dumps(record).encode())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with caplog.at_level(logging.INFO, logger="typedbrain"):
                Checkpointer(tmp_path).recover_if_possible()
        assert f"while process {os.getppid()} on host" in caplog.text
    finally:
        os.close(descriptor)


def test_checkpointers_of_one_process_share_the_lock_until_the_last_is_collected(
    tmp_path: Path,
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    first = Checkpointer(tmp_path / "real", {"counter": EpochCounter(3)})
    first.save_checkpoint()
    # Another spelling of the same folder, in the same process: it shares the lock.
    second = Checkpointer(tmp_path / "link", {"counter": EpochCounter(3)})
    second.save_and_keep_only(num_to_keep=1)

    def free() -> bool:
        descriptor = os.open(tmp_path / "real" / LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(descriptor)
        return True

    assert not free()
    del first
    gc.collect()
    assert not free()  # the second checkpointer still holds it
    del second
    gc.collect()
    assert free()


def test_the_lock_file_is_never_listed_ranked_or_deleted(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    checkpointer.save_checkpoint()
    with _no_warnings():
        assert checkpointer.delete_checkpoints(num_to_keep=0) != []
        assert checkpointer.list_checkpoints() == []
    assert [path.name for path in tmp_path.iterdir()] == [LOCK_NAME]


@pytest.fixture
def _no_lock_here(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("typedbrain._folder_lock.fcntl.flock", unsupported)


@pytest.mark.usefixtures("_no_lock_here")
def test_where_the_filesystem_cannot_lock_a_warning_is_logged_once_and_saving_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="typedbrain._folder_lock"):
        checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
        checkpointer.save_checkpoint()
        Checkpointer(tmp_path, {"counter": EpochCounter(3)}).save_and_keep_only()
    warned = [record for record in caplog.records if "writing goes on without" in record.message]
    assert len(warned) == 1
    assert "No locks available" in warned[0].message
    assert len(checkpointer.list_checkpoints()) == 1


def test_a_folder_on_a_read_only_mount_is_read_and_deletes_nothing_without_a_lock_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, newest = _two_checkpoints(tmp_path)
    (tmp_path / LOCK_NAME).unlink(missing_ok=True)
    _refused_lock_open(monkeypatch, os.O_CREAT, errno.EROFS)
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    assert checkpointer.recover_if_possible() == newest
    with caplog.at_level(logging.WARNING, logger="typedbrain._folder_lock"):
        assert checkpointer.delete_checkpoints(num_to_keep=5) == []
    assert "the lock file cannot be made: Read-only file system" in caplog.text


@pytest.mark.slow
def test_a_refusal_does_not_name_a_holder_that_has_ended(tmp_path: Path) -> None:
    """The record of a killed run, left in a lock file the next holder could not write."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    record = {"pid": finished.pid, "host": socket.gethostname(), "since": "then"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    descriptor = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the holder, without a record
        result = _second_run(tmp_path, "stay")
    finally:
        os.close(descriptor)
    assert result.returncode == 3
    assert f"the lock file still names process {finished.pid}, which has ended" in result.stdout


_SECOND_RUN = """
import os, signal, sys
import torch
from typedbrain import Checkpointer
from typedbrain._errors import CheckpointError
checkpointer = Checkpointer(sys.argv[1], {"model": torch.nn.Linear(2, 2)})
try:
    checkpointer.save_checkpoint()
except CheckpointError as error:
    print(error)
    sys.exit(3)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _second_run(folder: Path, then: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SECOND_RUN), str(folder), then],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_another_process_is_refused_while_this_one_writes_and_a_killed_run_blocks_nothing(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    checkpointer.save_checkpoint()
    refused = _second_run(tmp_path, "exit")
    assert refused.returncode == 3, refused.stderr
    assert f"in use by process {os.getpid()} on host {socket.gethostname()}" in refused.stdout
    del checkpointer
    gc.collect()
    # This process let go: a second run may write now, and one killed while holding the lock
    # leaves nothing that blocks the next.
    killed = _second_run(tmp_path, "die")
    assert killed.returncode == -9, killed.stderr
    assert len(Checkpointer(tmp_path).list_checkpoints()) == 2
    Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)}).save_checkpoint()


@pytest.mark.slow
def test_release_lock_lets_another_process_write_and_the_next_write_takes_it_again(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    sharing = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    checkpointer.save_checkpoint()
    sharing.save_checkpoint()
    checkpointer.release_lock()
    assert _second_run(tmp_path, "exit").returncode == 3  # the other checkpointer still holds it
    sharing.release_lock()
    sharing.release_lock()  # a second call does nothing
    written = _second_run(tmp_path, "exit")
    assert written.returncode == 0, written.stdout + written.stderr
    # Still usable: its next write takes the lock again, and holds it.
    checkpointer.save_checkpoint()
    assert len(checkpointer.list_checkpoints()) == 4
    refused = _second_run(tmp_path, "exit")
    assert refused.returncode == 3
    assert f"in use by process {os.getpid()}" in refused.stdout


# ---------------------------------------------------------------------------- safe deletion


def test_a_keep_policy_never_deletes_a_folder_replaced_since_it_ranked_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two checkpointers saving within one second: the name of a folder one deletes is free
    # again, and the other's next save takes it.
    monkeypatch.setattr("typedbrain._checkpoint.time.strftime", lambda *_: "2026-01-01+00-00-00")
    run_a = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    run_b = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    old = run_b.save_and_keep_only()
    real_delete = _checkpoint._delete_folder
    saved_by_a: list[Checkpoint] = []

    def interleaved(checkpoint: Checkpoint) -> None:
        monkeypatch.setattr(_checkpoint, "_delete_folder", real_delete)
        real_delete(checkpoint)  # A's keep policy deletes the same old folder first
        saved_by_a.append(run_a.save_checkpoint())  # and A's next save reuses its name
        real_delete(checkpoint)  # B's deletion of what it ranked goes on

    monkeypatch.setattr(_checkpoint, "_delete_folder", interleaved)
    with pytest.warns(CheckpointWarning, match="no longer holds the checkpoint that was ranked"):
        newest_b = run_b.save_and_keep_only()
    assert saved_by_a[0].path == old.path  # the name was reused
    assert run_b.list_checkpoints() == [newest_b, saved_by_a[0]]


def test_a_folder_rename_refused_for_permissions_deletes_nothing_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EPERM is a sticky folder or an immutable flag: reported, not worked around."""
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    first = checkpointer.save_checkpoint()
    _refuse_folder_renames(monkeypatch, PermissionError(errno.EPERM, "Operation not permitted"))
    with pytest.warns(CheckpointWarning, match="could not delete checkpoint .*Operation not perm"):
        checkpointer.save_and_keep_only(num_to_keep=1)
    assert (first.path / "MANIFEST.json").exists()  # still whole, still committed


def test_a_deletion_cut_short_is_no_checkpoint_and_the_next_keep_policy_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    first = checkpointer.save_checkpoint()

    def fail(path: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("typedbrain._checkpoint.shutil.rmtree", fail)
    with pytest.warns(CheckpointWarning, match="could not finish deleting") as caught:
        second = checkpointer.save_and_keep_only(num_to_keep=1)
    assert "the next keep policy removes" in str(caught[0].message)
    monkeypatch.undo()
    left = [path for path in tmp_path.iterdir() if path.name.startswith(".deleting-")]
    assert len(left) == 1
    assert left[0].name.endswith(first.path.name)
    with _no_warnings():  # not reported as an interrupted save
        assert checkpointer.list_checkpoints() == [second]
        third = checkpointer.save_and_keep_only(num_to_keep=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOCK_NAME, third.path.name]


# ---------------------------------------------------------------------------- a dangling link


@pytest.mark.parametrize("under", ["", "checkpoints"])
def test_a_link_to_a_missing_folder_is_refused_when_the_checkpointer_is_built(
    tmp_path: Path, under: str
) -> None:
    (tmp_path / "save").symlink_to(tmp_path / "scratch" / "run")  # scratch not mounted
    folder = tmp_path / "save" / under if under else tmp_path / "save"
    with pytest.raises(ConfigurationError, match=r"symbolic link to .*scratch/run, which does not"):
        Checkpointer(folder)
    (tmp_path / "scratch" / "run").mkdir(parents=True)
    Checkpointer(folder, {"counter": EpochCounter(3)}).save_checkpoint()

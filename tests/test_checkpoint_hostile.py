"""A checkpoints folder is data: what is planted in it is refused, not written through or waited on.

Someone can hand a user a checkpoints folder (a shared experiment, an unpacked archive, which
keeps links and FIFOs). A link planted as the writer's lock file must not make a save
overwrite the file it points to; a FIFO or a device planted as a manifest or a checkpoint file
must not make listing or recovery block forever or read without end.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from tests.helpers import rewrite_manifest
from typedbrain import _manifest
from typedbrain._checkpoint import Checkpoint, Checkpointer
from typedbrain._errors import CheckpointError, CheckpointWarning
from typedbrain._folder_lock import LOCK_NAME
from typedbrain._manifest import MANIFEST_NAME

T = TypeVar("T")

_PATIENCE = 60.0
"""How long an action may take before it counts as blocked (far more than it needs)."""


def _two_checkpoints(folder: Path) -> tuple[Checkpoint, Checkpoint]:
    """Two checkpoints of a model saved by a process that then lets go of the folder."""
    checkpointer = Checkpointer(folder, {"model": torch.nn.Linear(2, 2)})
    older = checkpointer.save_checkpoint(meta={"epoch": 1})
    newest = checkpointer.save_checkpoint(meta={"epoch": 2})
    checkpointer.release_lock()
    return older, newest


def _not_blocked_on(fifo: Path, action: Callable[[], T]) -> T:
    """``action()``'s result; the test fails if it is still waiting on ``fifo`` after a while.

    A reader blocked on opening or reading the FIFO is let go (a writer opens it and closes it
    at once) before the failure, so a failing test ends.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(action())
        except BaseException as error:  # handed to the test's thread
            failure.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(_PATIENCE)
    if thread.is_alive():
        descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(descriptor)
        thread.join(_PATIENCE)
        pytest.fail(f"still waiting on the FIFO {fifo} after {_PATIENCE} s")
    if failure:
        raise failure[0]
    return outcome[0]


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


# ---------------------------------------------------------------------- the writer's lock file


def test_a_lock_file_linked_to_another_file_is_refused_and_that_file_is_untouched(
    tmp_path: Path,
) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's own file\n")
    folder = tmp_path / "save"
    folder.mkdir()
    (folder / LOCK_NAME).symlink_to(precious)
    checkpointer = Checkpointer(folder, {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(CheckpointError, match=r"lock file .* is a symbolic link") as caught:
        checkpointer.save_checkpoint()
    assert str(folder / LOCK_NAME) in str(caught.value)
    checkpointer.release_lock()
    assert precious.read_text() == "the user's own file\n"
    assert checkpointer.list_checkpoints() == []  # nothing was written either


def test_a_lock_file_that_is_a_fifo_is_refused_by_a_save_and_not_waited_on_by_a_reader(
    tmp_path: Path,
) -> None:
    _, newest = _two_checkpoints(tmp_path)
    lock = tmp_path / LOCK_NAME
    _replace_with_fifo(lock)
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    # Reading looks for another writer's record in the lock file: none in a FIFO.
    assert _not_blocked_on(lock, checkpointer.recover_if_possible) == newest
    with pytest.raises(CheckpointError, match=r"lock file .* is not a regular file"):
        _not_blocked_on(lock, checkpointer.save_checkpoint)


# --------------------------------------------------------------- manifests and checkpoint files


def test_a_manifest_that_is_a_fifo_is_skipped_as_damage_not_waited_on(tmp_path: Path) -> None:
    older, newest = _two_checkpoints(tmp_path)
    manifest = newest.path / MANIFEST_NAME
    _replace_with_fifo(manifest)
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    with pytest.warns(CheckpointWarning, match=f"{MANIFEST_NAME} is a FIFO, not a regular file"):
        assert _not_blocked_on(manifest, checkpointer.recover_if_possible) == older


def test_a_checkpoint_file_that_is_a_fifo_is_skipped_as_damage_not_waited_on(
    tmp_path: Path,
) -> None:
    older, newest = _two_checkpoints(tmp_path)
    file = newest.paramfiles["model"]
    _replace_with_fifo(file)
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)})
    with pytest.warns(CheckpointWarning, match=r"model.ckpt \(recoverable 'model'\) is a FIFO"):
        assert _not_blocked_on(file, checkpointer.recover_if_possible) == older


def test_a_manifest_linked_to_an_endless_device_is_skipped_unread(tmp_path: Path) -> None:
    older, newest = _two_checkpoints(tmp_path)
    manifest = newest.path / MANIFEST_NAME
    manifest.unlink()
    manifest.symlink_to("/dev/zero")
    with pytest.warns(CheckpointWarning, match="is a character device, not a regular file"):
        assert Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)}).recover_if_possible() == (
            older
        )


def test_a_manifest_larger_than_any_manifest_is_skipped_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    older, newest = _two_checkpoints(tmp_path)
    rewrite_manifest(newest.path, lambda data: data.update(meta={"padding": "x" * 1000}))
    limit = (older.path / MANIFEST_NAME).stat().st_size + 100  # the older one is read
    monkeypatch.setattr(_manifest, "MAX_MANIFEST_BYTES", limit)
    with pytest.warns(CheckpointWarning, match=f"{MANIFEST_NAME} is larger than {limit} bytes"):
        assert Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)}).recover_if_possible() == (
            older
        )


def test_a_manifest_naming_a_file_longer_than_a_file_name_can_be_is_damage(
    tmp_path: Path,
) -> None:
    """Not an OS error to stop at (the open fails with ENAMETOOLONG): the manifest is wrong."""
    older, newest = _two_checkpoints(tmp_path)

    def lengthen(data: dict[str, object]) -> None:
        files = data["files"]
        assert isinstance(files, dict)
        files["model"]["file"] = "m" * 300

    rewrite_manifest(newest.path, lengthen)
    with pytest.warns(CheckpointWarning, match=r"'files\.model\.file' is 'm+\.\.\."):
        assert Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)}).recover_if_possible() == (
            older
        )

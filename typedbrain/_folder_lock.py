"""One run per checkpoints folder: the writer lock a process takes on its first write.

Two runs writing into one checkpoints folder (a job submitted twice, a requeued job overlapping
its dying predecessor) delete each other's checkpoints: each one's keep policy sees the other's
checkpoints as its own old ones. So the first write of a process into a folder (a save or a
deletion) takes an exclusive advisory lock (``flock``) on the file :data:`LOCK_NAME` in it,
records there which process holds it, and keeps it; a write from another process then raises
:class:`CheckpointError` naming the holder instead of going on.

Every :class:`~typedbrain.Checkpointer` of one process shares the lock of a folder (keyed by the
folder's real path): a fresh checkpointer that resumes in the same process writes on. The lock
is let go when the last checkpointer that took it is garbage-collected (or lets go of it with
``Checkpointer.release_lock``), and by the operating system when the process ends, however it
ends (a run killed with SIGKILL does not block its restart). The lock file itself is never
deleted: deleting it would let two processes lock two different files of one name.

Reading takes no lock: evaluating the checkpoints of a run that is still training is
legitimate.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Final, final

from typedbrain._errors import CheckpointError
from typedbrain._files import NotAFileError, open_file, open_regular

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock
    _flock_available = False
else:
    _flock_available = True

__all__ = ["LOCK_NAME", "claim", "other_writer"]

logger = logging.getLogger(__name__)

LOCK_NAME: Final = ".typedbrain-writer.lock"
"""The lock file in a checkpoints folder. Its name starts with a dot, so listing skips it."""
_RECORD_BYTES: Final = 4096
"""A holder's record is read up to this many bytes."""
_UNSUPPORTED: Final = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
"""``flock`` errors that mean the filesystem cannot lock (some network filesystems)."""


@final
class _Held:
    """This process's lock of one folder: the open lock file, or None where none can be taken."""

    def __init__(self, descriptor: int | None) -> None:
        self.descriptor = descriptor
        self.owners = 0


_held: dict[str, _Held] = {}
"""The folders whose lock this process holds, by real path."""


def _forget_in_child() -> None:
    """After a fork: the child holds no lock of its own (the parent's stays the parent's).

    Closing the inherited descriptors does not unlock them: a ``flock`` lock goes only once
    every descriptor of it is closed, and the parent keeps its own. It keeps a child that
    outlives its parent (a stray data loader worker) from holding the lock meanwhile.
    """
    for held in _held.values():
        if held.descriptor is not None:
            with contextlib.suppress(OSError):
                os.close(held.descriptor)
    _held.clear()


_fork_handler_registered = False
"""Whether :func:`_forget_in_child` is registered (on the first claim: not at import)."""


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def claim(folder: Path, owner: object) -> Callable[[], object]:
    """Hold the writer lock of ``folder`` (which exists) for ``owner`` from now on.

    The first claim of a folder in this process takes the lock; later claims (by other
    checkpointers of the process) share it. The lock is let go once every owner that claimed
    it has been garbage-collected or has called the function returned (call this once per
    owner and folder, and that function at most once: later calls do nothing).

    Where the filesystem cannot lock (``flock`` fails with ENOLCK, as on some network
    filesystems, or there is no ``flock``), a warning is logged once per folder and writing
    goes on without the lock.

    Raises:
        CheckpointError: another process holds the lock; the message names the folder and
            the process (its pid, host and since when), as it recorded itself.
        OSError: the lock file cannot be created or written (it names the file).
    """
    global _fork_handler_registered  # noqa: PLW0603  (registered once per process, lazily)
    if not _fork_handler_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_in_child)
        _fork_handler_registered = True
    key = _key(folder)
    held = _held.get(key)
    if held is None:
        held = _Held(_take(folder))
        _held[key] = held
    held.owners += 1
    return weakref.finalize(owner, _release, key, held, os.getpid())


def _release(key: str, held: _Held, pid: int) -> None:
    """One owner of ``held`` is gone; the last one lets the lock go (in the process that took it).

    Called by ``weakref.finalize`` (when the owner is collected, or early when it lets go), in
    the process that claimed (not in a forked child).
    """
    if pid != os.getpid() or _held.get(key) is not held:
        return
    held.owners -= 1
    if held.owners > 0:
        return
    del _held[key]
    if held.descriptor is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(held.descriptor, 0)  # no holder now (still locked while it is cut)
        os.close(held.descriptor)


def _take(folder: Path) -> int | None:
    """Lock ``folder``'s lock file and record this process in it; its descriptor, or None."""
    path = folder / LOCK_NAME
    if not _flock_available:  # pragma: no cover - Windows
        _unlocked(folder, "this platform has no flock")
        return None
    # A lock file created by a user whose umask kept it from the others is still locked
    # through a read-only descriptor (flock needs none other), without a record.
    recording = True
    try:
        descriptor = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        try:
            descriptor = _open_lock_file(path, os.O_RDONLY)
        except FileNotFoundError:
            # A folder this process cannot write (a read-only mount): what it would write
            # fails by itself, with its own error; there is nothing to lock.
            _unlocked(folder, f"the lock file cannot be made: {error.strerror}")
            return None
        recording = False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_record(descriptor)
        os.close(descriptor)
        raise CheckpointError(
            f"cannot write to the checkpoints folder {folder}: it is in use by "
            f"{_describe(holder)}: two runs must not write to one checkpoint folder (each "
            "one's keep policy would delete the other's checkpoints). Stop the other run, or "
            f"give this one a folder of its own; {path} names the holder, and its lock goes "
            "when that process ends, however it ends (or when it calls "
            "checkpointer.release_lock(): an idle notebook kernel, say)"
        ) from None
    except OSError as error:
        os.close(descriptor)
        if error.errno in _UNSUPPORTED:
            _unlocked(folder, f"flock failed: {error}")
            return None
        raise OSError(
            error.errno, f"{error.strerror} (while locking the checkpoints folder)", str(path)
        ) from error
    try:
        if recording:
            _write_record(descriptor)
    except OSError as error:
        os.close(descriptor)
        raise OSError(
            error.errno,
            f"{error.strerror} (while writing the checkpoints folder's lock)",
            str(path),
        ) from error
    return descriptor


def _open_lock_file(path: Path, flags: int) -> int:
    """Open the lock file ``path`` with ``flags``: a regular file, never through a link.

    The lock file is written (its holder's record, and cut to nothing when the lock goes), so a
    link planted in its place (in a shared or unpacked folder) would have this process
    overwrite the file it points to; a FIFO or a device would block or never end.

    Raises:
        CheckpointError: ``path`` is a symbolic link, or not a regular file.
        OSError: it cannot be opened (created) for another reason.
    """
    try:
        # The umask decides the permissions, so a group-shared folder's lock file is writable
        # by the group.
        return open_file(path, flags, follow_links=False)
    except NotAFileError:
        raise _not_a_lock_file(path, "not a regular file") from None
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise _not_a_lock_file(path, "a symbolic link") from None


def _not_a_lock_file(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"the checkpoints folder's lock file {path} is {what}: typedbrain writes its lock "
        "only into a regular file of its own, never through a link (it would overwrite the "
        "file linked to); remove it and start again"
    )


def _unlocked(folder: Path, why: str) -> None:
    logger.warning(
        "cannot lock the checkpoints folder %s (%s): writing goes on without the lock, so "
        "nothing stops a second run from writing into the same folder; make sure only one does",
        folder,
        why,
    )


def _write_record(descriptor: int) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(record) + "\n").encode("utf-8"), 0)


def _read_record(descriptor: int) -> dict[str, object]:
    """The holder's record in the lock file, or ``{}`` if it is empty or not one."""
    try:
        data: object = json.loads(os.pread(descriptor, _RECORD_BYTES, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(record: dict[str, object]) -> str:
    if not record:
        return "another process (it has not recorded itself in the lock file yet)"
    pid = record.get("pid")
    if (
        record.get("host") == socket.gethostname()
        and isinstance(pid, int)
        and pid > 0
        and not _alive(pid)
    ):
        # The record of a run that ended, left by a holder that could not write its own
        # (it locked a lock file another user made, through a read-only descriptor).
        return (
            f"another process, which could not record itself (the lock file still names "
            f"process {pid}, which has ended)"
        )
    return (
        f"process {record.get('pid', '?')} on host {record.get('host', '?')} since "
        f"{record.get('since', '?')}"
    )


def other_writer(folder: Path) -> str | None:
    """Who else writes to ``folder``, when it is a live process of this machine; else None.

    Reads the lock file's record only (it takes no lock, not even for a moment, so that it
    never makes a writer fail): a record of this host whose process is alive and is not this
    one is described. A writer on another host is not seen (its liveness cannot be checked
    from here), nor one that recorded nothing.
    """
    if not _flock_available or _key(folder) in _held:  # (os.kill(pid, 0) kills on Windows)
        return None
    try:
        with open_regular(folder / LOCK_NAME, follow_links=False) as stream:
            data: object = json.loads(stream.read(_RECORD_BYTES).decode("utf-8"))
    except (OSError, ValueError):  # a link or a FIFO planted there included: no writer named
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    if data.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    if pid == os.getpid() or not _alive(pid):
        return None
    return _describe(data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True

"""Opening and replacing the files typedbrain keeps in folders it may be handed.

- :func:`open_file` and :func:`open_regular` open a path only if it is a regular file
  (checked on the opened descriptor; a FIFO, a device or a socket raises
  :class:`NotAFileError`), without blocking on a FIFO, and through a symbolic link only when
  the caller says so (``follow_links`` has no default);
- :func:`replace_file` replaces a file whole, through a temporary file renamed over it, so a
  failure (a full disk) leaves its previous content;
- :func:`naming` and :func:`naming_file` make an ``OSError`` name its file: a write, a flush
  at close and ``os.fsync`` report a full disk (ENOSPC) or an I/O error without one. The
  error keeps its type and errno.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

__all__ = [
    "NotAFileError",
    "file_kind",
    "naming",
    "naming_file",
    "open_file",
    "open_regular",
    "replace_file",
]


class NotAFileError(OSError):
    """A path names something other than a regular file or a folder: a FIFO, a device, a socket.

    Reading such a thing may block forever (a FIFO nobody writes to) or never end (``/dev/zero``).
    """


_KINDS: Final = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_file(path: Path, flags: int, *, follow_links: bool) -> int:
    """``os.open(path, flags)``, if ``path`` is a regular file: its descriptor.

    For the files typedbrain reads or writes in folders it may be handed (checkpoints, logs,
    locks): it is opened without blocking (a FIFO nobody writes to would block an ordinary
    open; the descriptor blocks again once checked), checked with ``fstat`` on the opened
    descriptor (so what is used is what was checked), and, unless ``follow_links``, never
    through a symbolic link. A file ``flags`` create gets the permissions the umask allows.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        NotAFileError: ``path`` is a FIFO, a device or a socket (the message says which),
            including a FIFO opened for writing that nobody reads, which ``os.open`` refuses
            with ``ENXIO`` before it can be checked.
        OSError: ``path`` cannot be opened: missing, or (``ELOOP``) a symbolic link while
            ``follow_links`` is false.
    """
    flags |= os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as error:
        if error.errno == errno.ENXIO:
            _refuse_other_kind(path, follow_links)
        raise
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise _not_a_file(path, mode)
        os.set_blocking(descriptor, True)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def open_regular(path: Path, *, follow_links: bool) -> io.FileIO:
    """Open ``path`` for reading, unbuffered, if it is a regular file (see :func:`open_file`)."""
    return io.FileIO(open_file(path, os.O_RDONLY, follow_links=follow_links), "rb", closefd=True)


def file_kind(mode: int) -> str:
    """What a file whose ``st_mode`` is ``mode`` is, in words: ``"a FIFO"``, ``"a folder"``..."""
    return next((name for test, name in _KINDS if test(mode)), "a file of another kind")


def _not_a_file(path: Path, mode: int) -> NotAFileError:
    """The error refusing ``path``, whose ``st_mode`` is ``mode``: not a regular file."""
    return NotAFileError(errno.EINVAL, f"{file_kind(mode)}, not a regular file", os.fspath(path))


def _refuse_other_kind(path: Path, follow_links: bool) -> None:
    """Raise :class:`NotAFileError` if ``path`` is a FIFO, a device or a socket.

    For an open that failed with ``ENXIO`` (a FIFO opened for writing without a reader, a
    device without its driver): the error then says what ``path`` is. Returns when ``path``
    cannot be examined or is not such a thing.
    """
    try:
        mode = (os.stat(path) if follow_links else os.lstat(path)).st_mode
    except OSError:
        return
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        raise _not_a_file(path, mode)


@contextlib.contextmanager
def naming(path: Path, doing: str) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file as one naming ``path`` (same type and errno).

    ``os.fsync``, a buffered stream's flush and close, and a write report a full disk (ENOSPC)
    or an I/O error without a file name: the error raised names ``path`` and says what was
    being done (``doing``), and has the original as its ``__cause__``. An error that already
    names a file is re-raised as it is; one without an errno (raised by hand) gets a note.
    """
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        if error.errno is None:
            error.add_note(f"({doing}: {path})")
            raise
        raise naming_file(error, path, doing) from error


def replace_file(
    path: Path,
    fill: Callable[[BinaryIO], object],
    *,
    sync: bool = False,
    stat_from: Path | None = None,
) -> None:
    """Replace the file ``path`` by the bytes ``fill`` writes, through a temporary file.

    ``fill`` writes to a new file in the folder of ``path``, which is then renamed over it
    (:func:`os.replace`). Whatever fails in between, ``path`` holds either its previous content
    or the whole new one, and two processes replacing it at once leave one of their files, not a
    mix. A symbolic link at ``path`` is replaced itself, never written through (the rename does
    not follow it, so there is no check-then-write race): its target is left as it is.

    Args:
        path: the file to replace (or create).
        fill: writes the new content to the binary stream it is given.
        sync: whether to sync the new content to disk before the rename.
        stat_from: a file whose permission bits and times the new file takes (as
            :func:`shutil.copy2` copies them); by default it keeps the permission bits of
            ``path``, or gets those of a new file where ``path`` does not exist (or is a link).

    Raises:
        OSError: creating, writing, closing or renaming the file failed; the same type and
            errno, naming ``path`` (see :func:`naming_file`). The temporary file is removed.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        try:
            status = path.lstat()
        except FileNotFoundError:
            mode: int | None = None
        else:
            mode = None if stat.S_ISLNK(status.st_mode) else stat.S_IMODE(status.st_mode)
        # 0o666 as open() uses: a new file gets the permissions the umask allows.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(descriptor, "wb") as stream:
            fill(stream)
            if sync:
                stream.flush()
                os.fsync(stream.fileno())
        if stat_from is not None:
            shutil.copystat(stat_from, temp)
        elif mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(error, OSError):
            raise naming_file(error, path) from error
        raise


def naming_file(error: OSError, path: Path, doing: str | None = None) -> OSError:
    """``error`` as an error of the same type and errno whose filename is ``path``.

    The errors of a write and of the flush at close (``ENOSPC``, ``EIO``) name no file; an
    error about a temporary file names a file the caller never asked for. The message reads
    ``[Errno 28] No space left on device: '<path>'``, or with ``doing`` (what was being done)
    ``[Errno 28] No space left on device (<doing>): '<path>'``.
    """
    if error.errno is None:
        return OSError(f"{path}: {error}")
    strerror = error.strerror if doing is None else f"{error.strerror} ({doing})"
    try:
        return type(error)(error.errno, strerror, os.fspath(path))
    except TypeError:  # a subclass whose constructor takes other arguments
        return OSError(error.errno, strerror, os.fspath(path))

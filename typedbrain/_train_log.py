"""Training loggers: one entry per ``log_stats`` call, written by the main process only.

Three loggers share one interface (:class:`TrainLogger`): :class:`FileTrainLogger` writes the
text lines SpeechBrain's logger of that name writes, :class:`JsonlTrainLogger` writes one JSON
object per line (read back by :func:`read_jsonl_log`), and :class:`TensorboardTrainLogger`
writes TensorBoard scalars. Each one is ``Stateful``: registered with a checkpointer, it
records how much of its log a checkpoint covers, so a resumed run continues its log without
duplicated or missing entries.

All three read the values they are given the same way, before writing anything: a string, a
bool, an int or a float is logged as it is; any other real number (NumPy's ``float32`` or
``int64``, a ``Fraction``) as an int if its type is an integer type, else as a float; a tensor or
a NumPy array of one element (``loss.detach()``, a 0-d array) as the number it holds. Anything
else (a list, ``None``, a tensor of several elements, a complex number) is written as its text
by :class:`FileTrainLogger`, as SpeechBrain's does, and refused by the other two with a
:class:`~typedbrain.ConfigurationError` naming the log, the stage, the key and the type.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import math
import numbers
import os
import reprlib
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, TypeAlias, final

import attrs
import numpy as np
import torch

from typedbrain._checks import check_path
from typedbrain._distributed import if_main_process
from typedbrain._errors import ConfigurationError, ResumeWarning, TrainLogError
from typedbrain._files import naming_file, open_file, replace_file
from typedbrain._state import structure_state
from typedbrain._warn import warn

__all__ = [
    "FileTrainLogger",
    "JsonlTrainLogger",
    "LogEntry",
    "ScalarWriter",
    "StatValue",
    "TensorboardTrainLogger",
    "TrainLogger",
    "format_stat",
    "read_jsonl_log",
]

logger = logging.getLogger(__name__)

StatValue: TypeAlias = float | int | str
"""One logged value: a loss, a metric, a learning rate, an epoch number, a label."""

_STAGES: Final = ("train", "valid", "test")
_EPOCH_KEY: Final = "epoch"

_SHORT_REPR: Final = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80  # enough to name a key; a bad value is cut


class TrainLogger(Protocol):
    """What a recipe calls to log a stage's statistics; every logger here is one."""

    def log_stats(
        self,
        stats_meta: Mapping[str, StatValue],
        train_stats: Mapping[str, StatValue] | None = None,
        valid_stats: Mapping[str, StatValue] | None = None,
        test_stats: Mapping[str, StatValue] | None = None,
        verbose: bool = False,
    ) -> None:
        """Log one entry: ``stats_meta`` (epoch, learning rate...) and each stage's stats."""
        ...


def format_stat(value: StatValue, precision: int = 2) -> str:
    """Render one value as :class:`FileTrainLogger` writes it.

    A float strictly between 1 and 100 is written with ``precision`` decimals (``1.23``); any
    other float, zero, negative numbers and NaN included, in scientific notation with
    ``precision`` decimals (``1.00e-01``, ``0.00e+00``, ``nan``). Integers and strings are
    written as they are (``str(value)``). This is the rule SpeechBrain's file logger follows.

    Args:
        value: the value.
        precision: digits after the decimal point for floats.
    """
    if isinstance(value, float):
        if 1.0 < value < 100.0:
            return f"{value:.{precision}f}"
        return f"{value:.{precision}e}"
    return str(value)


def _plain_stat(value: object) -> StatValue:
    """``value`` as the plain Python number or string every logger writes (see the module doc).

    A string is kept; a bool, an int and a float are kept as such (a subclass, such as NumPy's
    ``float64``, becomes the plain type); any other real number becomes an int if its type is
    an integer type (NumPy's ``int64``), else a float (NumPy's ``float32``, a ``Fraction``, a
    ``Decimal``); a tensor or a NumPy array holding exactly one bool or real number becomes
    that number (``torch.tensor(0.5)`` gives ``0.5``; a tensor on a GPU is read from there).

    Raises:
        TypeError: anything else (a list, ``None``, a tensor of several elements, a complex
            number); the message shows a shortened ``repr`` of the value and names its type.
    """
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) or (
        isinstance(value, numbers.Number) and not isinstance(value, numbers.Complex)
    ):  # the second: a Decimal, which is not registered as Real
        return float(value)  # type: ignore[arg-type]  # Real and Decimal convert; mypy can't tell
    kind = type(value)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    if isinstance(value, torch.Tensor | np.ndarray):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        if size == 1:
            item: object = value.item()
            if isinstance(item, bool | int | float):
                return _plain_stat(item)
        else:
            name += f" of {size} elements"
    raise TypeError(
        f"{_SHORT_REPR.repr(value)} (a {name}), not a real number or a string (log a number, a "
        "string, or a tensor or NumPy value holding one number)"
    )


def _plain_stats(name: str, value: object, *, as_text: bool = False) -> dict[str, StatValue] | None:
    """``value`` (None or a mapping of strings to values) with :func:`_plain_stat` values.

    With ``as_text`` (a text log), a value :func:`_plain_stat` refuses is kept as its ``str``.

    Raises:
        TypeError: ``value`` is not such a mapping; the message names ``name`` and the key.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name!r} is a {type(value).__name__}, not an object")
    plain: dict[str, StatValue] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(
                f"{name!r}: the key {_SHORT_REPR.repr(key)} is not a string ({type(key).__name__})"
            )
        try:
            plain[key] = _plain_stat(item)
        except TypeError as error:
            if as_text:
                plain[key] = str(item)
                continue
            raise TypeError(f"{name!r}: {_SHORT_REPR.repr(key)} is {error}") from None
    return plain


_Entry: TypeAlias = tuple[
    dict[str, StatValue],
    dict[str, StatValue] | None,
    dict[str, StatValue] | None,
    dict[str, StatValue] | None,
]
"""``stats_meta`` and the train, valid and test stats, with plain values."""


def _plain_entry(
    destination: Path,
    stats_meta: Mapping[str, StatValue],
    train_stats: Mapping[str, StatValue] | None,
    valid_stats: Mapping[str, StatValue] | None,
    test_stats: Mapping[str, StatValue] | None,
    *,
    as_text: bool = False,
) -> _Entry:
    """What every logger does first: the entry with :func:`_plain_stat` values.

    With ``as_text`` (a text log), a value that is not a number or a string is kept as its
    ``str``, as SpeechBrain's file logger writes it.

    Raises:
        ConfigurationError: a key is not a string or a value cannot be read as a number or a
            string; the message names ``destination``, the stage, the key and the value's type.
    """
    try:
        meta = _plain_stats("stats_meta", stats_meta, as_text=as_text)
        if meta is None:
            raise TypeError("'stats_meta' is None, not a mapping")
        train, valid, test = (
            _plain_stats(stage, stats, as_text=as_text)
            for stage, stats in zip(_STAGES, (train_stats, valid_stats, test_stats), strict=True)
        )
    except TypeError as error:
        raise ConfigurationError(f"cannot log to {destination}: {error}") from error
    return meta, train, valid, test


def _epoch_of(stats_meta: Mapping[str, StatValue]) -> int | None:
    epoch = stats_meta.get(_EPOCH_KEY)
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        return epoch
    return None


def _is_training(
    train_stats: Mapping[str, StatValue] | None, valid_stats: Mapping[str, StatValue] | None
) -> bool:
    return train_stats is not None or valid_stats is not None


# ----------------------------------------------------------------------------- resumable files


@final
@attrs.frozen(kw_only=True)
class _Committed:
    """How much of a log a checkpoint covers: its first ``position`` bytes, ``entries`` lines."""

    position: int = attrs.field(validator=attrs.validators.ge(0))
    entries: int = attrs.field(validator=attrs.validators.ge(0))


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as stream:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _encoded(line: str) -> bytes:
    r"""``line`` and its newline in UTF-8, a character UTF-8 cannot encode as a backslash escape.

    Such a character comes from a path that is not valid UTF-8 (decoded with surrogate escapes);
    in a JSON line its escape (``\udcff``) is the JSON escape that reads it back.
    """
    return line.encode("utf-8", errors="backslashreplace") + b"\n"


def _byte_before(path: Path, position: int) -> bytes:
    with path.open("rb") as stream:
        stream.seek(position - 1)
        return stream.read(1)


def _entries(count: int, kind: str = "") -> str:
    """``count`` entries, in words: "1 entry", "3 other entries"."""
    return f"{count} {kind}{'entry' if count == 1 else 'entries'}"


def _linked_log(path: Path) -> ConfigurationError:
    try:
        target = f" (to {os.readlink(path)!r})"
    except OSError:
        target = ""
    return ConfigurationError(
        f"the training log {path} is a symbolic link{target}: a training logger does not write "
        "through a link, whose target may be a file outside the experiment folder that a "
        "resume would cut or replace; name the file itself as save_file, or remove the link"
    )


def _refuse_link(path: Path) -> None:
    """Raise if ``path`` is a symbolic link (a dangling one included), a FIFO or a device.

    Raises:
        ConfigurationError: it is one; the message names it (and a link's target).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise _linked_log(path)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder has its own error
        raise ConfigurationError(
            f"the training log {path} is not a regular file (a FIFO, a device or a socket): "
            "reading it could wait forever; name a file as save_file, or remove it"
        )


def _open_unlinked(path: Path, flags: int) -> int:
    """``os.open(path, flags)`` of a regular file, refusing a symbolic link as it is opened.

    Raises:
        ConfigurationError: ``path`` is a symbolic link.
        OSError: it cannot be opened, or is not a regular file (see
            :func:`~typedbrain._files.open_file`).
    """
    try:
        return open_file(path, flags, follow_links=False)
    except OSError as error:
        if error.errno == errno.ELOOP and path.is_symlink():
            raise _linked_log(path) from error
        raise


_KeepLine: TypeAlias = Callable[[str, int], str | None]
"""Given an entry's line cut off at a resume and the index it would take, the line to keep."""


class _LineLog:
    """An append-only file of newline-terminated entries that resumes at a committed position.

    After :meth:`load_state_dict` nothing changes on disk until the next entry. If that entry
    is a training entry (train or valid stats), the training entries after the committed
    position were written by a run that did not reach the next checkpoint: they are cut off and
    logged again by the resumed run. The other entries there (test entries, which no resumed
    run logs again) are kept, moved up to the cut (``keep`` says which lines those are, and
    renumbers them). Any other entry (a test entry, after ``evaluate`` loaded the best and not
    the newest checkpoint) is appended after everything already in the file, unless it repeats
    the next test entry an earlier process wrote after the committed position: a restarted
    script running its ``evaluate`` again, which logs what the stopped one logged (that entry
    is then left where it is, and not written twice). The cut writes a new file that replaces
    the log (:func:`~typedbrain._files.replace_file`), so a failure in the middle leaves the
    log as it was.

    A log path that is a symbolic link is refused (a :class:`ConfigurationError`) before
    anything is read or written, at each entry and each :meth:`state_dict`: nothing is
    appended to, cut from or replaced through a link, whose target may lie outside the
    experiment folder (a link planted in a folder someone else handed over).

    The entries are counted once, then kept count of; when the file's size is not the size
    this log last left (another logger, or another program, wrote to it), they are counted
    again.
    """

    def __init__(self, path: Path, keep: _KeepLine) -> None:
        self.path = path
        self._keep = keep
        self._entries: int | None = None
        self._size_left: int | None = None  # the file's size after this log's last change
        self._pending: _Committed | None = None
        # The bytes earlier processes wrote, until this log writes: entries there that a
        # restarted script logs again are recognised (see append), once each.
        self._inherited = _size(path)
        self._repeated: set[int] = set()  # offsets of inherited entries logged again
        self._replayable: list[tuple[int, int, str]] = []  # (offset, index, line), in order

    def append(self, line_at: Callable[[int], str], *, training: bool) -> str:
        """Log an entry whose line, as entry number ``index``, is ``line_at(index)``; return it.

        A test entry after a resume that is the next one an earlier process wrote after the
        committed position (the same line at that entry's number) is not written again.

        Raises:
            OSError: the file cannot be written (see :meth:`write`).
        """
        index = self.next_index(training=training)
        if not training and self._replayable:
            offset, number, line = self._replayable.pop(0)
            if line_at(number) == line:
                self._repeated.add(offset)
                return line
        # From here on nothing is taken for an earlier process's entry: this log writes (and a
        # training entry's settling may have moved the entries kept).
        self._replayable = []
        self._inherited = 0
        line = line_at(index)
        self.write(line)
        return line

    def next_index(self, *, training: bool) -> int:
        """Settle a pending resume for an entry of the given kind; return its 1-based index.

        Raises:
            ConfigurationError: the log is a symbolic link; nothing was changed.
        """
        _refuse_link(self.path)
        if self._pending is not None:
            # Cleared once settled: after a failure (a full disk) the next entry tries again.
            self._entries = self._settle(self._pending, training=training)
            self._pending = None
            self._size_left = _size(self.path)
        return self._counted() + 1

    def write(self, line: str) -> None:
        """Append ``line`` and a newline (call :meth:`next_index` first).

        Raises:
            ConfigurationError: the log is a symbolic link; nothing is written.
            OSError: the file cannot be written (a full disk, also found by the flush at
                close); the same type and errno, naming the log.
        """
        assert self._entries is not None, "next_index() comes first"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = _open_unlinked(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            with open(descriptor, "ab") as stream:
                stream.write(_encoded(line))
                size = stream.tell()
        except OSError as error:
            # Part of the line may be on disk: the entries are counted again at the next one,
            # which first removes a line left without its newline.
            self._size_left = None
            raise naming_file(error, self.path) from error
        self._size_left = size
        self._entries += 1

    def _counted(self) -> int:
        """The number of entries in the file, counted again if someone else changed it."""
        if self._entries is None or _size(self.path) != self._size_left:
            self._entries = self._open_existing()
            self._size_left = _size(self.path)
        return self._entries

    def _open_existing(self) -> int:
        size = _size(self.path)
        if size and _byte_before(self.path, size) != b"\n":
            # Only an interrupted write leaves a line without its newline.
            with self.path.open("rb") as stream:
                data = stream.read()
            keep = data.rfind(b"\n") + 1
            descriptor = _open_unlinked(self.path, os.O_WRONLY)
            try:
                os.ftruncate(descriptor, keep)
            except OSError as error:
                raise naming_file(error, self.path) from error
            finally:
                os.close(descriptor)
            logger.warning(
                "removed an incomplete last line (%d bytes) from %s", size - keep, self.path
            )
        return _count_lines(self.path)

    def _settle(self, committed: _Committed, *, training: bool) -> int:
        self._replayable = []
        size = _size(self.path)
        if size < committed.position or (
            committed.position > 0 and _byte_before(self.path, committed.position) != b"\n"
        ):
            warn(
                f"the training log {self.path} does not match the checkpoint just loaded (it "
                f"has {size} bytes, the checkpoint covers {committed.position}); new entries "
                "are appended and earlier ones may be missing",
                ResumeWarning,
            )
            return self._open_existing()
        if not training:
            entries = self._open_existing()
            self._replayable = self._inherited_tests(committed)
            return entries
        if size <= committed.position:
            return committed.entries
        with self.path.open("rb") as stream:
            stream.seek(committed.position)
            tail = stream.read()
        kept: list[str] = []
        lines = tail.split(b"\n")[:-1]  # a last line without its newline is not an entry
        for raw in lines:
            index = committed.entries + len(kept) + 1
            line = self._keep(raw.decode("utf-8", errors="replace"), index)
            if line is not None:
                kept.append(line)
        new_tail = b"".join(_encoded(line) for line in kept)
        if new_tail == tail:  # every entry after the checkpoint stays as it is
            return committed.entries + len(kept)
        prefix = committed.position

        def rewrite(stream: BinaryIO) -> None:
            with self.path.open("rb") as old:
                copied = 0
                while copied < prefix:
                    chunk = old.read(min(1 << 20, prefix - copied))
                    if not chunk:
                        raise OSError(errno.EIO, "the file shrank while it was copied")
                    stream.write(chunk)
                    copied += len(chunk)
            stream.write(new_tail)

        # The kept entries and the file's first bytes go to a new file that replaces the old
        # one: a crash in between leaves the old file, which the next resume cuts again (the
        # synced copy keeps the entries the checkpoint covers on disk through a power loss).
        # Checked again for the message; a link planted after the check is replaced itself,
        # never its target.
        _refuse_link(self.path)
        replace_file(self.path, rewrite, sync=True)
        removed = len(lines) - len(kept)
        logger.info(
            "removed %s logged after the checkpoint from %s (%d bytes; %s logged again)%s",
            _entries(removed),
            self.path,
            len(tail) - len(new_tail),
            "it is" if removed == 1 else "they are",
            f" and kept the {_entries(len(kept), 'other ')} there" if kept else "",
        )
        return committed.entries + len(kept)

    def _inherited_tests(self, committed: _Committed) -> list[tuple[int, int, str]]:
        """The test entries earlier processes wrote after ``committed``: (offset, index, line).

        Only those not logged again already, in the file's order.
        """
        end = min(self._inherited, _size(self.path))
        if end <= committed.position:
            return []
        with self.path.open("rb") as stream:
            stream.seek(committed.position)
            tail = stream.read(end - committed.position)
        found: list[tuple[int, int, str]] = []
        offset = committed.position
        for number, raw in enumerate(tail.split(b"\n")[:-1], start=committed.entries + 1):
            line = raw.decode("utf-8", errors="replace")
            if offset not in self._repeated and self._keep(line, number) is not None:
                found.append((offset, number, line))
            offset += len(raw) + 1
        return found

    def state_dict(self) -> dict[str, int]:
        """The committed position: the file's size and entry count, synced to disk.

        Raises:
            ConfigurationError: the log is a symbolic link (see the class doc).
        """
        if self._pending is not None:
            return {"position": self._pending.position, "entries": self._pending.entries}
        _refuse_link(self.path)
        entries = self._counted()
        if not self.path.exists():
            return {"position": 0, "entries": 0}
        with self.path.open("rb") as stream:
            try:
                os.fsync(stream.fileno())
            except OSError as error:  # as a write's, the error of fsync names no file
                raise naming_file(error, self.path) from error
        return {"position": _size(self.path), "entries": entries}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Remember the committed position; the next entry settles it (see the class doc)."""
        self._pending = structure_state(
            dict(state), _Committed, source=f"the state of the training log {self.path}"
        )


class _FileLoggerBase:
    """The resume and main-process logic the file and JSONL loggers share."""

    _usual_name: str  # the log's usual file name, suggested when a folder is given

    def __init__(self, save_file: str | os.PathLike[str]) -> None:
        # Checked here, not at the first entry, which comes an epoch later.
        self.save_file = check_path(
            "save_file", save_file, empty=f"name the log file, such as {self._usual_name!r}"
        )
        _refuse_link(self.save_file)
        if self.save_file.is_dir():
            raise ConfigurationError(
                f"save_file {self.save_file} is a folder, not a file; name the log file in it, "
                f"such as {self.save_file / self._usual_name}"
            )
        self._log = _LineLog(self.save_file, self._kept_at_resume)

    def _kept_at_resume(self, line: str, index: int) -> str | None:
        """The line to keep for an entry a resume cuts off, renumbered as entry ``index``.

        ``None`` for a training entry, which the resumed run logs again.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        """How much of the log exists now: ``{"position": bytes, "entries": lines}``.

        A checkpoint saves it; the file is synced to disk first, so the recorded position
        survives a crash. Processes other than the main one return zeros.

        Raises:
            ConfigurationError: the log is a symbolic link (nothing is read through it).
        """
        if not if_main_process():
            return {"position": 0, "entries": 0}
        return self._log.state_dict()

    # ``Any``: the Stateful protocol (and torch) pass ``dict[str, Any]``.
    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Resume the log at the position a checkpoint recorded.

        Nothing changes on disk until the next entry: a training entry (with train or valid
        stats) first cuts the file back to the recorded position, removing what a stopped run
        logged after that checkpoint; any other entry is appended at the end of the file,
        unless it repeats the next test entry an earlier process wrote after that position (a
        restarted script evaluating again), which is left where it is.

        Raises:
            ConfigurationError: ``state_dict`` is not a state this logger saved.
        """
        if if_main_process():
            self._log.load_state_dict(state_dict)


@final
class FileTrainLogger(_FileLoggerBase):
    """Writes one human-readable line per entry, in the format of SpeechBrain's FileTrainLogger.

    A line is ``stats_meta``'s items, then, for each stage given, `` - `` and that stage's items
    prefixed by the stage's name::

        epoch: 1, lr: 1.00e-01 - train loss: 1.23 - valid loss: 1.10, valid error: 2.50e-01

    Items are ``key: value`` joined by ``", "``; values are rendered by :func:`format_stat`.
    The file is appended to (created with its folder if needed) by the main process only.

    Args:
        save_file: the log file, ``train_log.txt`` by convention.
        precision: digits after the decimal point for floats.

    Raises:
        ConfigurationError: ``save_file`` is not a path, is empty, is an existing folder or
            is a symbolic link, or ``precision`` is not an integer >= 0.
    """

    _usual_name = "train_log.txt"

    def __init__(self, save_file: str | os.PathLike[str], precision: int = 2) -> None:
        super().__init__(save_file)
        value: object = precision  # checked at run time too: YAML recipes are not type-checked
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(f"precision must be an integer >= 0, got {precision!r}")
        self.precision = precision

    def format_line(
        self,
        stats_meta: Mapping[str, StatValue],
        train_stats: Mapping[str, StatValue] | None = None,
        valid_stats: Mapping[str, StatValue] | None = None,
        test_stats: Mapping[str, StatValue] | None = None,
    ) -> str:
        """The line :meth:`log_stats` writes for these stats (without its newline).

        Raises:
            ConfigurationError: a key is not a string; the message names the file, the stage
                and the key. (A value that is not a number or a string is written as its text.)
        """
        meta, train, valid, test = _plain_entry(
            self.save_file, stats_meta, train_stats, valid_stats, test_stats, as_text=True
        )
        parts = [self._items(meta, "")]
        for stage, stats in zip(_STAGES, (train, valid, test), strict=True):
            if stats is not None:
                parts.append(self._items(stats, f"{stage} "))
        return " - ".join(parts)

    def _kept_at_resume(self, line: str, index: int) -> str | None:
        # A test entry's line is its meta, then " - test ..." and nothing else. A line that
        # cannot be read so (a key holding " - ", stats given as {}) is cut, as a training
        # entry is: keeping a training entry would log it twice.
        stages = {part.split(" ", 1)[0] for part in line.split(" - ")[1:]}
        return line if stages == {"test"} else None

    def _items(self, stats: Mapping[str, StatValue], prefix: str) -> str:
        return ", ".join(
            f"{prefix}{key}: {format_stat(value, self.precision)}" for key, value in stats.items()
        )

    def log_stats(
        self,
        stats_meta: Mapping[str, StatValue],
        train_stats: Mapping[str, StatValue] | None = None,
        valid_stats: Mapping[str, StatValue] | None = None,
        test_stats: Mapping[str, StatValue] | None = None,
        verbose: bool = False,
    ) -> None:
        """Append one line (main process only); with ``verbose`` also log it at INFO level.

        Raises:
            ConfigurationError: a key is not a string, or the log is a symbolic link; nothing
                is written. (A value that is not a number or a string is written as its text:
                see the module doc.)
            OSError: the log cannot be written (a full disk); the same type and errno, naming
                the log. Part of the line may be written: the next entry removes it.
        """
        if not if_main_process():
            return
        line = self.format_line(stats_meta, train_stats, valid_stats, test_stats)
        self._log.append(lambda index: line, training=_is_training(train_stats, valid_stats))
        if verbose:
            logger.info("%s", line)


# ----------------------------------------------------------------------------- JSON lines


def _copy_meta(value: Mapping[str, StatValue]) -> dict[str, StatValue]:
    return dict(value)


def _copy_stats(value: Mapping[str, StatValue] | None) -> dict[str, StatValue] | None:
    return None if value is None else dict(value)


@final
@attrs.frozen(kw_only=True)
class LogEntry:
    """One entry of a JSON-lines training log, as :func:`read_jsonl_log` returns it.

    Attributes:
        step: the entry's position in the log: 1 for the first, one more for each next.
        epoch: ``stats_meta["epoch"]`` when that is an integer, else ``None``.
        stats_meta: the meta information logged (epoch, learning rate...).
        train: the training stats, or ``None`` when none were logged.
        valid: the validation stats, or ``None``.
        test: the test stats, or ``None``.
    """

    step: int
    epoch: int | None
    stats_meta: Mapping[str, StatValue] = attrs.field(converter=_copy_meta, hash=False)
    train: Mapping[str, StatValue] | None = attrs.field(
        default=None, converter=_copy_stats, hash=False
    )
    valid: Mapping[str, StatValue] | None = attrs.field(
        default=None, converter=_copy_stats, hash=False
    )
    test: Mapping[str, StatValue] | None = attrs.field(
        default=None, converter=_copy_stats, hash=False
    )

    def to_json(self) -> str:
        """The entry as the one line of JSON :class:`JsonlTrainLogger` writes."""
        return json.dumps(
            {
                "step": self.step,
                "epoch": self.epoch,
                "stats_meta": dict(self.stats_meta),
                "train": None if self.train is None else dict(self.train),
                "valid": None if self.valid is None else dict(self.valid),
                "test": None if self.test is None else dict(self.test),
            },
            ensure_ascii=False,
        )


_ENTRY_KEYS: Final = ("step", "epoch", "stats_meta", "train", "valid", "test")


@final
class JsonlTrainLogger(_FileLoggerBase):
    """Writes one JSON object per entry (JSON lines), for programs to read back.

    Each line is an object with exactly these keys, in this order::

        {"step": 1, "epoch": 1, "stats_meta": {"epoch": 1, "lr": 0.1},
         "train": {"loss": 1.23}, "valid": {"loss": 1.1}, "test": null}

    (on one line). ``step`` numbers the entries from 1; ``epoch`` repeats
    ``stats_meta["epoch"]`` when that is an integer and is ``null`` otherwise; a stage not
    logged is ``null``. Floats are written exactly (``repr``), NaN and infinities as Python's
    ``json`` writes them (``NaN``, ``Infinity``). Read the file with :func:`read_jsonl_log`.

    Args:
        save_file: the log file, ``train_log.jsonl`` by convention.

    Raises:
        ConfigurationError: ``save_file`` is not a path, is empty, is an existing folder or is
            a symbolic link.
    """

    _usual_name = "train_log.jsonl"

    def _kept_at_resume(self, line: str, index: int) -> str | None:
        try:
            entry = _parse_entry(self.save_file, index, line)
        except TrainLogError:
            return None  # not an entry this logger wrote: the cut removes it
        if _is_training(entry.train, entry.valid):
            return None
        return attrs.evolve(entry, step=index).to_json()

    def log_stats(
        self,
        stats_meta: Mapping[str, StatValue],
        train_stats: Mapping[str, StatValue] | None = None,
        valid_stats: Mapping[str, StatValue] | None = None,
        test_stats: Mapping[str, StatValue] | None = None,
        verbose: bool = False,
    ) -> None:
        """Append one JSON line (main process only); with ``verbose`` also log it at INFO.

        Raises:
            ConfigurationError: a key is not a string or a value is not a number or a string
                (see the module doc), or the log is a symbolic link; nothing is written.
            OSError: the log cannot be written (a full disk); the same type and errno, naming
                the log. Part of the line may be written: the next entry removes it.
        """
        if not if_main_process():
            return
        meta, train, valid, test = _plain_entry(
            self.save_file, stats_meta, train_stats, valid_stats, test_stats
        )
        entry = LogEntry(
            step=0, epoch=_epoch_of(meta), stats_meta=meta, train=train, valid=valid, test=test
        )

        def line_at(index: int) -> str:
            return attrs.evolve(entry, step=index).to_json()

        line = self._log.append(line_at, training=_is_training(train, valid))
        if verbose:
            logger.info("%s", line)


def read_jsonl_log(path: str | os.PathLike[str]) -> list[LogEntry]:
    """Read a log written by :class:`JsonlTrainLogger`, one :class:`LogEntry` per line.

    Blank lines are skipped. A last line without its newline (the run died while writing it)
    is skipped with a warning: the logger removes it before its next entry.

    Raises:
        FileNotFoundError: there is no such file (other ``OSError`` s propagate too).
        TrainLogError: a line is not UTF-8 JSON (or nests too deeply, or holds an integer
            of more digits than Python reads), not an object with the logger's keys, or holds
            values of the wrong type; the error names the file and the line.
    """
    file = Path(path)
    entries: list[LogEntry] = []
    with file.open("rb") as stream:
        data = stream.read()
    lines = data.split(b"\n")
    if lines[-1].strip():
        warn(
            f"skipped line {len(lines)} of {file}: it has no newline, so its write was "
            "interrupted (the logger removes it before its next entry)",
            UserWarning,
        )
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:  # the logger writes UTF-8 only
            raise TrainLogError(
                file, number, f"not UTF-8 text (byte {error.start + 1} of the line)"
            ) from error
        if line.strip():
            entries.append(_parse_entry(file, number, line))
    return entries


def _parse_entry(file: Path, number: int, line: str) -> LogEntry:
    try:
        data: object = json.loads(line)
    except json.JSONDecodeError as error:
        raise TrainLogError(file, number, f"not JSON: {error.msg}") from error
    except RecursionError as error:  # arrays or objects nested deeper than Python's stack
        raise TrainLogError(
            file, number, "not a log entry: JSON nested too deeply to read"
        ) from error
    except ValueError as error:  # an integer of more digits than Python converts
        raise TrainLogError(
            file,
            number,
            f"not a log entry: an integer of more than {sys.get_int_max_str_digits()} digits, "
            "more than Python reads",
        ) from error
    if not isinstance(data, dict):
        raise TrainLogError(file, number, f"a JSON {type(data).__name__}, not an object")
    if tuple(sorted(data)) != tuple(sorted(_ENTRY_KEYS)):
        raise TrainLogError(
            file,
            number,
            f"the keys are {sorted(data)}, expected {sorted(_ENTRY_KEYS)}",
        )
    step, epoch = data["step"], data["epoch"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise TrainLogError(file, number, f"'step' is {step!r}, not an integer >= 1")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise TrainLogError(file, number, f"'epoch' is {epoch!r}, not an integer or null")
    try:
        stats_meta = _plain_stats("stats_meta", data["stats_meta"])
        train, valid, test = (_plain_stats(stage, data[stage]) for stage in _STAGES)
    except TypeError as error:
        raise TrainLogError(file, number, str(error)) from error
    if stats_meta is None:
        raise TrainLogError(file, number, "'stats_meta' is null, not an object")
    return LogEntry(
        step=step, epoch=epoch, stats_meta=stats_meta, train=train, valid=valid, test=test
    )


# ----------------------------------------------------------------------------- TensorBoard


def _scalar(value: float) -> float:
    """``value`` as a float; an int too large for one is an infinity of its sign."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


class ScalarWriter(Protocol):
    """What :class:`TensorboardTrainLogger` writes to: a TensorBoard ``SummaryWriter`` is one."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> object:
        """Record ``scalar_value`` under ``tag`` at ``global_step``."""
        ...

    def flush(self) -> object:
        """Write what is buffered to disk."""
        ...

    def close(self) -> object:
        """Flush and release the event file."""
        ...


WriterFactory: TypeAlias = Callable[[Path, "int | None"], ScalarWriter]
"""Builds a writer for a log folder; the second argument is TensorBoard's ``purge_step``."""


_NO_TENSORBOARD: Final = (
    "TensorboardTrainLogger needs the tensorboard package: install the "
    "'typedbrain[tensorboard]' extra (pip install 'typedbrain[tensorboard]')"
)


def _summary_writer(log_dir: Path, purge_step: int | None) -> ScalarWriter:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigurationError(_NO_TENSORBOARD) from error
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


@final
class TensorboardTrainLogger:
    """Writes each entry's numbers as TensorBoard scalars (needs ``typedbrain[tensorboard]``).

    Each stage's stats go under ``<stage>/<name>`` (``train/loss``, ``valid/error``) and the
    numeric items of ``stats_meta`` other than ``epoch`` under ``meta/<name>`` (``meta/lr``);
    strings are not written. The global step is ``stats_meta["epoch"]`` when that is an integer,
    else the step of the previous entry (so a test entry is drawn at the epoch last logged).

    On resume (see :meth:`load_state_dict`) the writer is opened with TensorBoard's
    ``purge_step``, which hides the events a stopped run wrote after its last checkpoint.

    Args:
        save_dir: the folder of the event files.
        writer_factory: builds the writer, called as ``factory(save_dir, purge_step)`` when the
            first entry is logged; by default torch's ``SummaryWriter``. Pass your own to write
            elsewhere (or, in tests, to record the calls).

    Raises:
        ConfigurationError: when the first entry is logged, with the default factory, if
            tensorboard is not installed; the message names the ``typedbrain[tensorboard]``
            extra. Making the logger then warns already (a ``UserWarning``), so that this is
            known before an epoch of training, while a recipe that names the logger still
            loads where nothing is logged.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        writer_factory: WriterFactory | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        if writer_factory is None and importlib.util.find_spec("tensorboard") is None:
            # Said now, not an epoch later; raised only where an entry is logged, so that a
            # recipe naming this logger still loads where nothing is logged (an evaluation).
            warn(f"{_NO_TENSORBOARD}; logging an entry will fail", UserWarning)
        self._factory: WriterFactory = (
            writer_factory if writer_factory is not None else _summary_writer
        )
        self._writer: ScalarWriter | None = None
        self._step = 0
        self._resumed_at: int | None = None

    def log_stats(
        self,
        stats_meta: Mapping[str, StatValue],
        train_stats: Mapping[str, StatValue] | None = None,
        valid_stats: Mapping[str, StatValue] | None = None,
        test_stats: Mapping[str, StatValue] | None = None,
        verbose: bool = False,
    ) -> None:
        """Write the entry's numbers as scalars (main process only); ``verbose`` logs them.

        Raises:
            ConfigurationError: a key is not a string or a value is not a number or a string
                (see the module doc), and nothing is written; or, with the default factory, the
                first entry finds tensorboard missing.
        """
        if not if_main_process():
            return
        meta, train, valid, test = _plain_entry(
            self.save_dir, stats_meta, train_stats, valid_stats, test_stats
        )
        writer = self._writer_for(training=_is_training(train, valid))
        epoch = _epoch_of(meta)
        step = self._step if epoch is None else epoch
        scalars = [(f"meta/{key}", value) for key, value in meta.items() if key != _EPOCH_KEY]
        for stage, stats in zip(_STAGES, (train, valid, test), strict=True):
            if stats is not None:
                scalars += [(f"{stage}/{key}", value) for key, value in stats.items()]
        for tag, value in scalars:
            if isinstance(value, str):
                continue  # a label, not a scalar
            writer.add_scalar(tag, _scalar(value), step)
            if verbose:
                logger.info("%s at step %d: %s", tag, step, value)
        writer.flush()
        self._step = step

    def _writer_for(self, *, training: bool) -> ScalarWriter:
        resumed_at = self._resumed_at
        purge = resumed_at + 1 if resumed_at is not None and training else None
        if self._writer is not None and purge is not None:
            self._writer.close()
            self._writer = None
        if self._writer is None:
            self._writer = self._factory(self.save_dir, purge)
        self._resumed_at = None  # only once the writer exists: a failed start purges later
        return self._writer

    def close(self) -> None:
        """Close the writer (a later entry opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def state_dict(self) -> dict[str, int]:
        """``{"step": the global step of the last entry}`` (0 before any); flushes the writer."""
        if self._writer is not None:
            self._writer.flush()
        return {"step": self._step}

    # ``Any``: the Stateful protocol (and torch) pass ``dict[str, Any]``.
    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Resume after the step a checkpoint recorded.

        If the next entry is a training entry (train or valid stats), the writer is reopened
        with ``purge_step`` = that step + 1, so TensorBoard hides what a stopped run wrote after
        the checkpoint; any other entry (a test one) purges nothing.

        Raises:
            ConfigurationError: ``state_dict`` is not a state this logger saved.
        """
        state: object = state_dict  # checked: a checkpoint file may hold anything
        step = state.get("step") if isinstance(state, Mapping) else None
        if (
            not isinstance(state, Mapping)
            or set(state) != {"step"}
            or isinstance(step, bool)
            or not isinstance(step, int)
            or step < 0
        ):
            raise ConfigurationError(
                f"invalid state for the TensorBoard logger of {self.save_dir}: {state_dict!r} "
                "(expected {'step': <integer >= 0>})"
            )
        if if_main_process():
            self._step = step
            self._resumed_at = step

"""The ``typedbrain`` console script: inspect checkpoint folders, plot training logs.

Run ``typedbrain --help`` (or ``python -m typedbrain --help``). Exit statuses: 0 success, 1 a
problem found in the data (a corrupt or uncommitted checkpoint, an unreadable log), 2 a usage
error or a path that does not exist, 3 an optional dependency is missing, 141 the reader of the
output went away (``typedbrain checkpoints save --json | head -1``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import reprlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO, final

import attrs

from typedbrain._checkpoint import _rank
from typedbrain._checks import real_number
from typedbrain._errors import CheckpointError, CorruptCheckpointError, TrainLogError
from typedbrain._experiment import json_safe
from typedbrain._manifest import MANIFEST_NAME, Checkpoint, read_manifest, verify_checkpoint
from typedbrain._train_log import LogEntry, StatValue, read_jsonl_log
from typedbrain._version import __version__

__all__ = [
    "EXIT_BAD_DATA",
    "EXIT_BROKEN_PIPE",
    "EXIT_MISSING_EXTRA",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

EXIT_OK: Final = 0
"""Everything listed is fine, or the plot was written."""
EXIT_BAD_DATA: Final = 1
"""A checkpoint is corrupt or uncommitted, or a log cannot be read or has nothing to plot."""
EXIT_USAGE: Final = 2
"""Bad arguments, or a path that does not exist (or is not of the right kind)."""
EXIT_MISSING_EXTRA: Final = 3
"""An optional dependency (matplotlib for ``plot``) is not installed."""
EXIT_BROKEN_PIPE: Final = 141
"""Standard output was closed before everything was written (``| head``): 128 + ``SIGPIPE``
(13), the status a shell reports for a program that signal stopped."""

_PROG: Final = "typedbrain"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script with ``argv`` (by default ``sys.argv[1:]``); return the exit status.

    ``typedbrain checkpoints FOLDER`` lists the checkpoint folders in FOLDER;
    ``typedbrain plot LOG --out PNG`` plots a JSON-lines training log. See ``docs/cli.md``.

    When standard output is closed before everything is written (the output piped to
    ``head``), the rest is dropped silently and the status is :data:`EXIT_BROKEN_PIPE`.
    """
    try:
        status = _run(argv)
        sys.stdout.flush()  # here, where a closed pipe can be caught, not at exit
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    return status


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.command == "checkpoints":
        for option, key in (("--min-key", args.min_key), ("--max-key", args.max_key)):
            if key is not None and not key:
                _error(f"{option} needs the name of a meta key, got an empty string")
                return EXIT_USAGE
        return _checkpoints(
            Path(args.folder),
            verify=args.verify,
            min_key=args.min_key,
            max_key=args.max_key,
            as_json=args.json,
            out=sys.stdout,
        )
    return _plot(Path(args.log), Path(args.out))


def _discard_stdout() -> None:
    """Point standard output at the null device, so the flush at exit cannot fail again."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture, say)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, descriptor)
    finally:
        os.close(null)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Inspect typedbrain checkpoint folders and plot training logs.",
        epilog="Exit status: 0 fine, 1 a problem in the data (corrupt or uncommitted "
        "checkpoint, unreadable log), 2 usage error or missing path, 3 missing optional "
        "dependency, 141 output closed before the end (| head).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser(
        "checkpoints",
        help="list the checkpoint folders in a folder, with their status",
        description="List every checkpoint folder in FOLDER: committed or not, sequence, "
        "time, end of epoch, phase and meta; mark the newest and the best.",
    )
    listing.add_argument("folder", metavar="FOLDER", help="the checkpoints folder")
    listing.add_argument(
        "--verify",
        action="store_true",
        help="check every file's size and SHA-256 against its manifest",
    )
    keys = listing.add_mutually_exclusive_group()
    keys.add_argument("--min-key", metavar="K", help="mark as best the lowest meta value of K")
    keys.add_argument("--max-key", metavar="K", help="mark as best the highest meta value of K")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plot = commands.add_parser(
        "plot",
        help="plot a JSON-lines training log to a PNG",
        description="Plot the loss and every metric of a JsonlTrainLogger log per epoch, "
        "train against valid, one panel per metric (needs typedbrain[plot]).",
    )
    plot.add_argument("log", metavar="LOG", help="the JSON-lines log (train_log.jsonl)")
    plot.add_argument("--out", required=True, metavar="PNG", help="the PNG file to write")
    return parser


def _error(message: str) -> None:
    print(f"{_PROG}: error: {_shown(message)}", file=sys.stderr)


def _shown(text: str) -> str:
    r"""``text`` fit for a terminal: each character that is not printable as its Python escape.

    Control characters (an escape sequence's ``\x1b``, a ``\r`` that would overwrite the
    line), format characters (a right-to-left override) and lone surrogates (a name that is
    not valid UTF-8, which standard output cannot encode) come from manifests and folder names
    anyone may write; they are shown as ``repr`` shows them (``\x1b``, ``\r``, ``\u202e``,
    ``\udcff``). Other characters, accented letters included, are kept.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


_SHORT_REPR: Final = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80  # names a value; a long or deep one is cut

_MAX_META_DEPTH: Final = 100
"""How deeply a meta value may nest lists and objects and still be printed."""
_TOO_DEEP: Final = f"<nested more than {_MAX_META_DEPTH} levels deep: not shown>"
"""What is printed instead of such a value (``json.dumps`` and Python's stack run out)."""


def _nests_too_deeply(value: object) -> bool:
    """Whether ``value`` nests lists and dicts more than :data:`_MAX_META_DEPTH` levels deep."""
    pending: list[tuple[object, int]] = [(value, 0)]  # a loop, not a recursion: any depth
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list | tuple):
            if depth >= _MAX_META_DEPTH:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return False


def _shown_meta(checkpoint: Checkpoint) -> dict[str, object]:
    """The checkpoint's meta, each value nested too deeply to print replaced by a placeholder."""
    return {
        key: _TOO_DEEP if _nests_too_deeply(value) else value
        for key, value in checkpoint.meta.items()
    }


# ----------------------------------------------------------------------------- checkpoints


@final
@attrs.frozen
class _Row:
    name: str
    status: str  # OK, COMMITTED (not verified), UNCOMMITTED, CORRUPT or UNREADABLE
    reason: str | None
    checkpoint: Checkpoint | None  # None when there is no readable manifest
    newest: bool = False
    best: bool = False
    # UNREADABLE with a manifest or file that exists but cannot be read: recover_if_possible
    # raises there rather than skip it (a folder it cannot look into is skipped: False).
    stops_recovery: bool = False

    @property
    def usable(self) -> bool:
        return self.status in {"OK", "COMMITTED"}


def _inspect(folder: Path, *, verify: bool) -> _Row:
    """Read (and with ``verify``, check) one folder; a corrupt one keeps its manifest's data."""
    try:
        checkpoint = verify_checkpoint(folder) if verify else read_manifest(folder)
    except CorruptCheckpointError as error:
        try:
            # Not Path.exists: from Python 3.13 it says False where it cannot look.
            os.stat(folder / MANIFEST_NAME)
        except FileNotFoundError:
            committed = False
        except OSError:  # a folder this process cannot look into
            return _Row(folder.name, "UNREADABLE", error.reason, None)
        else:
            committed = True
        if not committed:
            reason = error.reason
            if _holds_checkpoints(folder):
                reason = (
                    f"no {MANIFEST_NAME}, but it holds checkpoint folders: it is a checkpoints "
                    f"folder, not a checkpoint; did you mean typedbrain checkpoints {folder}?"
                )
            return _Row(folder.name, "UNCOMMITTED", reason, None)
        try:
            described: Checkpoint | None = read_manifest(folder)
        except CorruptCheckpointError:
            described = None
        return _Row(folder.name, "CORRUPT", error.reason, described)
    except CheckpointError as error:  # it exists but cannot be read: not known to be damaged
        try:  # with --verify, a file may be what cannot be read: the manifest still ranks it
            readable: Checkpoint | None = read_manifest(folder) if verify else None
        except CheckpointError:
            readable = None
        return _Row(folder.name, "UNREADABLE", str(error), readable, stops_recovery=True)
    return _Row(folder.name, "OK" if verify else "COMMITTED", None, checkpoint)


def _holds_checkpoints(folder: Path) -> bool:
    """Whether a folder of ``folder`` (not a link) has a manifest: a checkpoint folder."""
    try:
        return any(
            entry.is_dir() and not entry.is_symlink() and (entry / MANIFEST_NAME).is_file()
            for entry in folder.iterdir()
        )
    except OSError:  # unreadable: its own row says what can be said
        return False


def _checkpoints(
    folder: Path,
    *,
    verify: bool,
    min_key: str | None,
    max_key: str | None,
    as_json: bool,
    out: TextIO,
) -> int:
    if not folder.exists():
        _error(f"{folder}: no such folder")
        return EXIT_USAGE
    if not folder.is_dir():
        _error(f"{folder}: not a folder")
        return EXIT_USAGE
    try:
        visible = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    except OSError as error:
        _error(f"{folder}: cannot list the folder: {error.strerror or error}")
        return EXIT_USAGE
    # A link to a checkpoint folder is not a checkpoint: the checkpointer ignores it too.
    links = [entry.name for entry in visible if entry.is_symlink()]
    entries = [entry for entry in visible if entry.is_dir() and not entry.is_symlink()]
    rows = [_inspect(entry, verify=verify) for entry in entries]
    usable = [row.checkpoint for row in rows if row.usable and row.checkpoint is not None]
    # Recovery tries these too, and raises at them: a usable one ranked below is not loaded.
    stopping = [row for row in rows if row.stops_recovery]
    blocking = [row.checkpoint for row in stopping if row.checkpoint is not None]
    contenders = [*usable, *blocking]
    newest = _rank(contenders)
    key = min_key if min_key is not None else max_key
    unranked = [] if key is None else _not_numbers(contenders, key)
    # argparse refuses both keys at once, and the values that cannot rank are left out: this
    # ranking has nothing left to refuse.
    rankable = [checkpoint for checkpoint in contenders if checkpoint not in unranked]
    best = [] if key is None else _rank(rankable, min_key=min_key, max_key=max_key)
    notes = [f"{name}: a symbolic link, not a checkpoint folder; not listed" for name in links]
    unlisted = [row.name for row in stopping if row.checkpoint is None]
    if unlisted:
        # Every scan reads every manifest, so recovery raises before it ranks anything.
        newest = best = []
        notes += [
            f"{name}: its {MANIFEST_NAME} cannot be read, so recover_if_possible stops with an "
            "error at it (as listing and keep policies do), whatever the other folders hold: "
            "no folder is marked [newest] or [best]"
            for name in unlisted
        ]
    argument = "min_key" if min_key is not None else "max_key"
    for mark, ranking, call in (
        ("newest", newest, "recover_if_possible()"),
        ("best", best, f"recover_if_possible({argument}={key!r})"),
    ):
        if ranking and any(ranking[0] is checkpoint for checkpoint in blocking):
            notes.append(
                f"{ranking[0].path.name}: UNREADABLE, and it ranks above every usable "
                f"checkpoint, so {call} stops with an error at it rather than load an older "
                f"one: no folder is marked [{mark}]"
            )
    rows = [
        attrs.evolve(
            row,
            newest=bool(newest) and row.usable and row.checkpoint is newest[0],
            best=bool(best) and row.usable and row.checkpoint is best[0],
        )
        for row in rows
    ]
    if key is not None:
        notes += [
            f"{checkpoint.path.name}: meta {key!r} is {_SHORT_REPR.repr(checkpoint.meta[key])}, "
            f"not a number; not ranked by {key!r}"
            for checkpoint in unranked
        ]
    if key is not None and not best and not unlisted:
        if unranked:
            notes.append(f"no usable checkpoint has a number as its meta {key!r}")
        else:
            notes.append(f"no usable checkpoint has the meta key {key!r}")
    notes += [
        f"{row.name}: meta {key!r} nests lists or objects more than {_MAX_META_DEPTH} levels "
        f"deep; shown as {_TOO_DEEP!r}"
        for row in rows
        if row.checkpoint is not None
        for key, value in row.checkpoint.meta.items()
        if _nests_too_deeply(value)
    ]
    if as_json:
        _print_json(folder, rows, notes, out)
    else:
        _print_table(folder, rows, notes, verify=verify, out=out)
    return EXIT_OK if all(row.usable for row in rows) else EXIT_BAD_DATA


def _not_numbers(checkpoints: Sequence[Checkpoint], key: str) -> list[Checkpoint]:
    """The checkpoints whose meta value of ``key`` cannot rank them (not a real number).

    ``recover_if_possible`` leaves these out of its ranking with a warning; the listing says
    so instead of refusing to list the folder.
    """
    return [
        checkpoint
        for checkpoint in checkpoints
        if key in checkpoint.meta and real_number(checkpoint.meta[key]) is None
    ]


def _print_json(folder: Path, rows: Sequence[_Row], notes: Sequence[str], out: TextIO) -> None:
    listed = []
    for row in rows:
        checkpoint = row.checkpoint
        listed.append(
            {
                "name": row.name,
                "status": row.status,
                "reason": row.reason,
                "sequence": None if checkpoint is None else checkpoint.sequence,
                "unixtime": None if checkpoint is None else checkpoint.unixtime,
                "end_of_epoch": None if checkpoint is None else checkpoint.end_of_epoch,
                "phase": None if checkpoint is None else checkpoint.phase,
                "meta": None if checkpoint is None else _shown_meta(checkpoint),
                "newest": row.newest,
                "best": row.best,
            }
        )
    document = {
        "folder": str(folder),
        "ok": all(row.usable for row in rows),
        "checkpoints": listed,
        "notes": list(notes),
    }
    print(json.dumps(json_safe(document), indent=2, allow_nan=False), file=out)


def _saved_at(unixtime: float) -> str:
    """The local time ``unixtime`` stands for, or the number itself when it is out of range."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unixtime))
    except (OverflowError, OSError, ValueError):
        return str(unixtime)


def _print_table(
    folder: Path,
    rows: Sequence[_Row],
    notes: Sequence[str],
    *,
    verify: bool,
    out: TextIO,
) -> None:
    checked = "files verified" if verify else "manifests read, files not verified"
    print(f"{_shown(str(folder))}: {len(rows)} checkpoint folder(s), {checked}", file=out)
    if rows:
        _print_rows(rows, out)
    for note in notes:
        print(_shown(note), file=out)


def _print_rows(rows: Sequence[_Row], out: TextIO) -> None:
    table = [["STATUS", "SEQ", "SAVED", "END", "PHASE", "FOLDER", "META"]]
    for row in rows:
        checkpoint = row.checkpoint
        if checkpoint is None:
            table.append([row.status, "-", "-", "-", "-", _shown(row.name), "-"])
            continue
        saved = _saved_at(checkpoint.unixtime)
        marks = [mark for mark, on in (("newest", row.newest), ("best", row.best)) if on]
        name = _shown(row.name) + (f" [{', '.join(marks)}]" if marks else "")
        table.append(
            [
                row.status,
                str(checkpoint.sequence),
                saved,
                "epoch" if checkpoint.end_of_epoch else "mid",
                _shown(checkpoint.phase or "-"),
                name,
                json.dumps(_shown_meta(checkpoint), sort_keys=True),  # ASCII: escapes all
            ]
        )
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip(), file=out)
    for row in rows:
        if row.reason is not None:
            print(_shown(f"{row.name}: {row.status}: {row.reason}"), file=out)


# ----------------------------------------------------------------------------- plot


def _plot_value(value: StatValue | None) -> float:
    """``value`` as a float to plot; NaN (a gap) for strings, missing and infinite values."""
    if value is None or isinstance(value, str):
        return math.nan
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        return math.nan
    return number if math.isfinite(number) else math.nan


def _metrics(entries: Sequence[LogEntry]) -> list[str]:
    """The names of the train and valid stats with a value to draw (a finite number), in order."""
    names: dict[str, None] = {}
    for entry in entries:
        for stats in (entry.train, entry.valid):
            if stats is not None:
                for name, value in stats.items():
                    if not math.isnan(_plot_value(value)):
                        names.setdefault(name)
    return list(names)


def _plot(log: Path, out: Path) -> int:
    if out.is_dir():
        _error(f"{out}: is a folder, not a PNG file")
        return EXIT_USAGE
    blocking = next((parent for parent in out.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        _error(f"{out}: {blocking} is not a folder")
        return EXIT_USAGE
    if not log.is_file():
        _error(f"{log}: no such file" if not log.exists() else f"{log}: not a file")
        return EXIT_USAGE
    try:
        entries = read_jsonl_log(log)
    except TrainLogError as error:
        _error(str(error))
        return EXIT_BAD_DATA
    except (OSError, UnicodeDecodeError) as error:
        _error(f"cannot read {log}: {error}")
        return EXIT_BAD_DATA
    training = [entry for entry in entries if entry.train is not None or entry.valid is not None]
    metrics = _metrics(training)
    if not metrics:
        _error(f"{log}: no train or valid numbers to plot")
        return EXIT_BAD_DATA
    try:
        from matplotlib.figure import Figure
    except ImportError:
        _error(
            "plotting needs matplotlib: install the 'typedbrain[plot]' extra "
            "(pip install 'typedbrain[plot]')"
        )
        return EXIT_MISSING_EXTRA
    by_epoch = all(entry.epoch is not None for entry in training)
    xs = [entry.epoch if by_epoch else entry.step for entry in training]
    figure = Figure(figsize=(7.0, 2.6 * len(metrics)), layout="constrained")
    axes = figure.subplots(len(metrics), 1, squeeze=False)
    for row, metric in enumerate(metrics):
        ax = axes[row][0]
        for stage in ("train", "valid"):
            ys = [_plot_value(_stage_value(entry, stage, metric)) for entry in training]
            if any(not math.isnan(y) for y in ys):
                ax.plot(xs, ys, marker="o", label=stage)
        ax.set_title(metric)
        ax.set_xlabel("epoch" if by_epoch else "log entry")
        ax.legend()
        ax.grid(visible=True, alpha=0.3)
    figure.suptitle(log.name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, format="png")
    except OSError as error:
        _error(f"cannot write {out}: {error}")
        return EXIT_BAD_DATA
    print(f"wrote {out} ({len(metrics)} panel(s), {len(training)} entries)")
    return EXIT_OK


def _stage_value(entry: LogEntry, stage: str, metric: str) -> StatValue | None:
    stats = entry.train if stage == "train" else entry.valid
    return None if stats is None else stats.get(metric)

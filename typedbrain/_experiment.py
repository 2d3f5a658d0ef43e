"""The experiment folder: resolved hyperparameters, the script, a log file, the environment."""

from __future__ import annotations

import contextlib
import datetime
import errno
import inspect
import json
import logging
import logging.config
import math
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping
from io import TextIOWrapper
from pathlib import Path
from types import FrameType
from typing import Final, TextIO

import torch

from typedbrain._checks import check_bool, check_makeable_folder, check_path
from typedbrain._distributed import if_main_process
from typedbrain._errors import ConfigurationError
from typedbrain._files import file_kind, open_file, replace_file
from typedbrain._hyperparams_file import save_hyperparams
from typedbrain._version import __version__

__all__ = ["LOG_FORMAT", "create_experiment_directory"]

logger = logging.getLogger(__name__)

LOG_FORMAT: Final = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
"""The format of the records ``log.txt`` receives."""

_GIT_TIMEOUT_S: Final = 10.0
_NAME_IT: Final = "name a file or folder"
_PACKAGE_DIR: Final = Path(__file__).resolve().parent
_LOG_NAME: Final = "log.txt"
_HYPERPARAMS_NAME: Final = "hyperparams.yaml"
_HEADER_START: Final = "# Resolved from "
_HEADER_END: Final = " by typedbrain.create_experiment_directory."
# The header an earlier create_experiment_directory wrote (a file resolved from a saved
# hyperparams.yaml starts with it): its first line, then the overrides it lists, if any.
_EARLIER_HEADER: Final = re.compile(
    re.escape(_HEADER_START) + r".*" + re.escape(_HEADER_END) + r"\n"
    r"(?:# Overrides applied:\n(?:#   .*\n)*)?"
)


class _ExperimentLogHandler(logging.FileHandler):
    """The handler that feeds an experiment's ``log.txt``; recognised when called again.

    The file is opened with ``O_NOFOLLOW``: a symbolic link at its name, even one made after
    :func:`create_experiment_directory` checked the folder, makes the open fail, so no record
    is appended to the file the link points to (a check followed by an ordinary open would
    leave that window open). ``O_NONBLOCK`` keeps a FIFO at its name from blocking the open;
    anything but a regular file is refused.
    """

    def _open(self) -> TextIOWrapper:
        path = Path(self.baseFilename)
        try:
            descriptor = open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, follow_links=False)
        except OSError as error:
            if error.errno == errno.ELOOP and path.is_symlink():
                raise _planted_link(path) from error
            raise
        try:
            return open(descriptor, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(descriptor)
            raise


class _ConsoleHandler(logging.StreamHandler[TextIO]):
    """Warnings and errors on standard error, as Python shows them while logging is unset.

    Added with the log file when the root logger had no handler: Python's last-resort handler,
    which printed them until then, is used only while the root logger has none.
    """


def create_experiment_directory(
    experiment_directory: str | os.PathLike[str],
    hyperparams_to_save: str | os.PathLike[str] | None = None,
    overrides: str | Mapping[str, object] | None = None,
    log_config: Mapping[str, object] | None = None,
    save_env_desc: bool = True,
    *,
    run_opts: Mapping[str, object] | None = None,
    script_file: str | os.PathLike[str] | None = None,
) -> Path:
    """Create the experiment folder and record in it what is needed to reproduce the run.

    On the main process it creates ``experiment_directory`` (with its parents) and writes:

    - ``hyperparams.yaml``: the file ``hyperparams_to_save`` with ``overrides`` applied as
      :func:`~typedbrain.load_hparams` applies them, ``!ref``/``!copy`` references resolved and
      ``!include:`` files (relative to the file's folder) inlined (HyperPyYAML's
      ``resolve_references``), after a comment header naming the source file and the
      overrides. Tags such as ``!new:`` are kept, and build nothing; ``!applyref:`` is the
      exception: resolving calls its function (a second time, if the recipe was loaded) and
      writes the result;
    - a copy of the calling script (``script_file``, by default the file of the first caller
      outside typedbrain), under its own name;
    - ``log.txt``: a :class:`logging.FileHandler` (format :data:`LOG_FORMAT`, level INFO) is
      added to the **root** logger, so the records of typedbrain and of your own loggers land
      there; if the root logger's level is above INFO it is lowered to INFO. With
      ``log_config`` the handler is not added: ``logging.config.dictConfig(log_config)`` is
      called instead;
    - ``env.json`` (when ``save_env_desc``): the Python, torch, NumPy and typedbrain versions,
      the platform, the command line, ``run_opts`` and the git commit of the script's
      repository (``null`` outside a git repository or without git). It is standard JSON: a
      non-finite number (``--max_grad_norm inf``) is written as the string ``"Infinity"``,
      ``"-Infinity"`` or ``"NaN"`` (see :func:`json_safe`).

    Calling it again (a resumed run) adds no second handler: ``log.txt`` is appended to, and
    the other files are replaced for this start, each written to a temporary file in the
    folder that is then renamed over it (:func:`replace_file`): a write that fails (a full
    disk) leaves the previous file whole. A handler that an earlier call added for another
    folder is removed. On other processes nothing is written and no handler is added;
    run it with :func:`~typedbrain.run_on_main` if they must wait for the folder.

    A ``hyperparams.yaml`` an earlier start wrote whose values differ from the new one's (or
    cannot be compared) is kept, under the next free name ``hyperparams.<n>.yaml`` (1, 2...;
    never overwritten), before the new one is written, and a
    :class:`~typedbrain.ResumeWarning` names the keys changed (``lr``, ``model.hidden_size``)
    and says that a run resumed from a checkpoint keeps the checkpoint's optimizer, scheduler
    and other saved state. A file that differs only in its comments (the header) or layout is
    replaced with no copy and no warning. ``hyperparams_to_save`` may be such a saved file: the
    header an earlier call wrote at its top is replaced by the new one, not kept under it.

    typedbrain never writes through a symbolic link at the names of its own files in the
    folder (``log.txt``, ``hyperparams.yaml``, ``env.json``, the script's copy): a link there,
    which typedbrain does not make, is refused before anything is written, as is anything else
    there that is not a regular file (a folder, a FIFO).

    Args:
        experiment_directory: the folder (``results/<experiment>/<seed>`` by convention).
        hyperparams_to_save: the recipe's HyperPyYAML file, if it should be saved.
        overrides: the overrides applied to it, as YAML text or a mapping.
        log_config: a :func:`logging.config.dictConfig` configuration that replaces the
            default ``log.txt`` handler.
        save_env_desc: whether to write ``env.json``.
        run_opts: the run options, recorded in ``env.json`` (values that are not JSON data are
            recorded as their ``str``, non-finite numbers as :func:`json_safe` writes them).
        script_file: the script to copy; by default the caller's file (nothing is copied when
            that is not a file, as in an interactive session).

    Returns:
        The experiment folder.

    Raises:
        OverrideError: an override names a key ``hyperparams_to_save`` does not have (as
            :func:`~typedbrain.load_hparams` refuses it); nothing is written.
        ConfigurationError: ``hyperparams_to_save`` cannot be read, or it (or ``overrides``)
            is not valid HyperPyYAML; the message names the file, and nothing is written. Or
            an argument has the wrong type (a path that is not one or is empty, ``run_opts``
            or ``log_config`` not a mapping, ``save_env_desc`` not a bool), ``log_config``'s
            ``version`` is not 1, or ``experiment_directory`` is a file or lies under one: the
            message names it, and nothing is written. Or one of the files it writes is a
            symbolic link in the folder (the message names the link and its target) or
            something else that is not a regular file (the message names it and says what it
            is); nothing is written. Or ``logging.config.dictConfig`` refuses ``log_config``; the
            folders made are removed.
        OSError: a file cannot be written (a full disk), or the earlier ``hyperparams.yaml``
            cannot be read; the error names it, and the file's previous content, if any, is
            kept. A FIFO made at ``log.txt`` after the check is a
            :class:`~typedbrain._files.NotAFileError`, and logging is left as it was.

    Warns:
        ResumeWarning: the earlier ``hyperparams.yaml`` holds other values than the new one.
    """
    # Every argument is checked first, on every process: a wrong one leaves nothing behind.
    folder = check_path("experiment_directory", experiment_directory, empty=_NAME_IT)
    if hyperparams_to_save is not None:
        check_path("hyperparams_to_save", hyperparams_to_save, empty=_NAME_IT)
    if script_file is not None:
        check_path("script_file", script_file, empty=_NAME_IT)
    if overrides is not None and not isinstance(overrides, str | Mapping):
        raise ConfigurationError(
            "overrides must be a mapping or a YAML string holding one, got "
            f"{type(overrides).__name__} {overrides!r}"
        )
    _check_log_config(log_config)
    check_bool("save_env_desc", save_env_desc)
    if run_opts is not None and not isinstance(run_opts, Mapping):
        raise ConfigurationError(
            "run_opts must be a mapping of run option names to values (attrs.asdict(options) "
            f"for a RunOptions), got {type(run_opts).__name__} {run_opts!r}"
        )
    check_makeable_folder("experiment_directory", folder)
    if not if_main_process():
        return folder
    script = Path(script_file) if script_file is not None else _calling_script()
    # Resolved first: hyperparameters or overrides that do not fit leave nothing behind.
    hyperparams = (
        None
        if hyperparams_to_save is None
        else _resolved_hyperparams(Path(hyperparams_to_save), overrides)
    )
    written = [
        *([_LOG_NAME] if log_config is None else []),
        *([_HYPERPARAMS_NAME] if hyperparams is not None else []),
        *([script.name] if script is not None and _copied(script, folder) else []),
        *(["env.json"] if save_env_desc else []),
    ]
    _check_own_files(folder, written)
    made = _make_folder(folder)
    if log_config is not None:
        try:
            logging.config.dictConfig(dict(log_config))
        except (ValueError, TypeError, AttributeError, ImportError, KeyError) as error:
            for path in made:  # the folders made for it, while they are empty
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise ConfigurationError(f"log_config: logging cannot use it: {error}") from error
    else:
        _attach_log_file(folder / _LOG_NAME)
    if hyperparams is not None:
        target = folder / _HYPERPARAMS_NAME
        try:
            save_hyperparams(target, hyperparams)
        except OSError as error:  # the earlier one is read without following a link
            if error.errno == errno.ELOOP and target.is_symlink():
                raise _planted_link(target) from error
            raise
    if script is not None and _copied(script, folder):
        _copy_script(script, folder / script.name)
    if save_env_desc:
        environment = describe_environment(script, run_opts)
        document = json_safe(environment)
        text = json.dumps(document, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
        replace_file(folder / "env.json", lambda stream: stream.write(text.encode("utf-8")))
        logger.info(
            "experiment %s: typedbrain %s, torch %s, Python %s, git commit %s",
            folder,
            environment["typedbrain"],
            environment["torch"],
            environment["python"],
            environment["git_commit"],
        )
    else:
        logger.info("experiment %s", folder)
    return folder


def _check_log_config(log_config: object) -> None:
    """Refuse a ``log_config`` that :func:`logging.config.dictConfig` would refuse outright."""
    if log_config is None:
        return
    if not isinstance(log_config, Mapping):
        raise ConfigurationError(
            "log_config must be a logging.config.dictConfig mapping or None, got "
            f"{type(log_config).__name__} {log_config!r}"
        )
    version = log_config.get("version")
    if isinstance(version, bool) or version != 1:
        raise ConfigurationError(
            f"log_config: 'version' must be 1 (the only dictConfig schema), got {version!r}"
        )


def _copied(script: Path, folder: Path) -> bool:
    """Whether ``script`` is copied into ``folder``: it is a file, and not that copy itself."""
    return script.is_file() and (folder / script.name).resolve() != script.resolve()


def _planted_link(path: Path) -> ConfigurationError:
    """The error refusing the symbolic link ``path`` at the name of a file typedbrain writes."""
    try:
        target = os.readlink(path)
    except OSError:  # removed since
        target = "?"
    return ConfigurationError(
        f"{path} is a symbolic link (to {target}): create_experiment_directory writes its own "
        "files in the experiment folder and never through a link, which it does not make "
        "itself (one there may mean the folder is not what it seems). Remove the link; "
        "nothing was written through it"
    )


def _check_own_files(folder: Path, names: list[str]) -> None:
    """Refuse anything but a regular file at any of ``names`` in ``folder`` (missing is fine).

    A symbolic link (see :func:`_planted_link`), a folder, a FIFO, a device or a socket at the
    name of a file typedbrain writes is refused before anything is written or configured.

    Raises:
        ConfigurationError: one is, naming it and what it is.
    """
    for name in names:
        path = folder / name
        try:
            mode = path.lstat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISLNK(mode):
            raise _planted_link(path)
        if not stat.S_ISREG(mode):
            raise ConfigurationError(
                f"{path} is {file_kind(mode)}, not a regular file: create_experiment_directory "
                "writes its own file at that name. Remove it or choose another folder; nothing "
                "was written"
            )


def _make_folder(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the ones made, innermost first."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _copy_script(script: Path, destination: Path) -> None:
    """Copy ``script`` to ``destination`` with its permission bits and times (as ``copy2``)."""
    if destination.resolve() == script.resolve():
        return
    # Opened first: a script that cannot be read is named as itself, not as the copy.
    with script.open("rb") as source:
        replace_file(
            destination,
            lambda stream: shutil.copyfileobj(source, stream),
            stat_from=script,
        )


def json_safe(value: object) -> object:
    """``value`` with every non-finite float written as a string: JSON has no NaN or infinity.

    NaN becomes ``"NaN"``, infinities ``"Infinity"`` and ``"-Infinity"`` (the words Python's
    ``float()`` reads back); the items of dicts, lists and tuples are converted the same way
    (a tuple becomes a list, as JSON writes it); anything else is returned as it is. The result
    goes to ``json.dumps(..., allow_nan=False)``, which then writes standard JSON.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _calling_script() -> Path | None:
    """The file of the innermost caller outside the typedbrain package, if it is a file.

    ``None`` when that caller has no file (``python -c``, an interactive session, a notebook).
    """
    frame: FrameType | None = inspect.currentframe()
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith("<"):
            return None
        path = Path(filename)
        if _PACKAGE_DIR not in path.resolve().parents:
            return path
        frame = frame.f_back
    return None


def _attach_log_file(log_file: Path) -> None:
    root = logging.getLogger()
    # Added once the log file is open: a log file that cannot be opened leaves logging as it was.
    add_console = not root.handlers
    # The folder's links are followed (the user chose the path), the file's name is not.
    target = os.path.join(log_file.parent.resolve(), log_file.name)
    present = False
    for handler in list(root.handlers):
        if isinstance(handler, _ExperimentLogHandler):
            if handler.baseFilename == target:
                present = True
            else:
                root.removeHandler(handler)
                handler.close()
    if not present:
        # A character UTF-8 cannot encode (a path that is not valid UTF-8, decoded with
        # surrogate escapes) is written as a backslash escape: a strict handler drops the record.
        handler = _ExperimentLogHandler(
            target, mode="a", encoding="utf-8", errors="backslashreplace"
        )
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    if add_console:
        console = _ConsoleHandler()  # standard error, as the last-resort handler writes
        console.setLevel(logging.WARNING)
        root.addHandler(console)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)


def _resolved_hyperparams(source: Path, overrides: str | Mapping[str, object] | None) -> str:
    """The text of ``hyperparams.yaml``: ``source`` with ``overrides``, references resolved."""
    # Imported here: importing ruamel.yaml (which both use) adds warning filters, and importing
    # typedbrain must change nothing global.
    from hyperpyyaml import resolve_references

    from typedbrain._yaml_tree import NamedStringIO, apply_overrides, checked_document

    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"cannot read the hyperparameters {source}: {error}") from error
    # As load_hparams does: an override may change only keys the file has (an OverrideError
    # naming the key otherwise), where hyperpyyaml would add the key silently.
    checked_document(text, overrides, str(source), source.resolve().parent)
    try:
        # The overrides are applied as load_hparams applies them, and the stream carries the
        # file's name so that !include: paths are relative to its folder.
        applied = apply_overrides(text, overrides)
        resolved = resolve_references(NamedStringIO(applied, str(source))).getvalue()
    except Exception as error:
        # ruamel and HyperPyYAML raise many unrelated types for bad YAML and overrides.
        raise ConfigurationError(
            f"cannot resolve the hyperparameters {source} with the overrides given: {error}"
        ) from error
    # A file an earlier start resolved (a saved hyperparams.yaml run again) starts with the
    # header written then, which the YAML round trip keeps: the new header replaces it.
    while match := _EARLIER_HEADER.match(resolved):
        resolved = resolved[match.end() :]
    header = [f"{_HEADER_START}{source}{_HEADER_END}"]
    if overrides:
        header.append("# Overrides applied:")
        if isinstance(overrides, str):
            override_lines = overrides.strip().splitlines()
        else:
            override_lines = json.dumps(dict(overrides), default=str, sort_keys=True).splitlines()
        header += [f"#   {line}" for line in override_lines]
    return "\n".join(header) + "\n" + resolved


def describe_environment(
    script: Path | None = None, run_opts: Mapping[str, object] | None = None
) -> dict[str, object]:
    """What ``env.json`` holds: versions, platform, command line, run options, git commit."""
    import numpy

    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "python_full": sys.version,
        "platform": platform.platform(),
        "typedbrain": __version__,
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "argv": list(sys.argv),
        "script": None if script is None else str(script),
        "run_opts": None if run_opts is None else {str(k): v for k, v in run_opts.items()},
        "git_commit": None if script is None else git_commit(script.resolve().parent),
    }


def git_commit(folder: Path) -> str | None:
    """The commit checked out in the git repository holding ``folder``, or ``None``.

    ``None`` when git is not installed, ``folder`` is in no repository (or one without
    commits), or git does not answer within 10 seconds.
    """
    try:
        completed = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = completed.stdout.strip()
    return commit if completed.returncode == 0 and commit else None

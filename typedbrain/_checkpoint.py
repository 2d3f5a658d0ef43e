"""Checkpointer: saves and restores named objects in committed, verified checkpoint folders.

Each checkpoint is a folder ``<checkpoints_dir>/CKPT+YYYY-MM-DD+HH-MM-SS+NN`` with one
``<name>.ckpt`` per recoverable and a ``MANIFEST.json`` written last and renamed into place
atomically (see :mod:`typedbrain._manifest`). Loading checks sizes and SHA-256 checksums first
and never unpickles anything but plain data and tensors (``torch.load(weights_only=True)``).

Under ``torch.distributed`` every method of a :class:`Checkpointer` is collective: the main
process (rank 0) alone scans, writes, commits and deletes, the others learn its decisions by
broadcast, and every process loads the checkpoint the main process chose (see "Several
processes" in docs/checkpoints.md).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import itertools
import logging
import math
import os
import pickle
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, TypeAlias, TypeVar, cast, final

import attrs
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.serialization import default_restore_location

from typedbrain._background import PendingRecords, work_for
from typedbrain._checks import check_bool, check_makeable_folder, check_path, real_number
from typedbrain._ckpt_hooks import (
    LoadHook,
    SaveHook,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
    resolve_hooks,
)
from typedbrain._devices import missing_device
from typedbrain._distributed import is_distributed
from typedbrain._errors import (
    CheckpointError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    ResumeWarning,
    UnsafeCheckpointError,
)
from typedbrain._files import naming
from typedbrain._folder_lock import claim, other_writer
from typedbrain._loadable import refusal, weights_only_reason
from typedbrain._manifest import (
    FILE_SUFFIX,
    INTRA_EPOCH_CKPT_FLAG,
    MANIFEST_NAME,
    MAX_FILE_NAME_BYTES,
    MAX_SEQUENCE,
    WRITE_BUFFER,
    Checkpoint,
    CheckpointFile,
    HashingWriter,
    JsonValue,
    check_present,
    commit_manifest,
    committed_already,
    describe_entries,
    hash_file,
    hash_pieces,
    hash_sync_and_close,
    hash_workers,
    is_plain_name,
    is_save_file,
    name_bytes,
    open_present,
    piece_tasks,
    read_manifest,
    sync_and_close,
    sync_directory,
    sync_file,
    to_json_meta,
    unexpected_entries,
    verify_checkpoint,
    verify_piece,
)
from typedbrain._own_memory import copy_kept_out_of_file, file_storages
from typedbrain._protocols import Stateful
from typedbrain._version import __version__
from typedbrain._warn import warn

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION
    from torch.types import Storage

__all__ = [
    "Checkpoint",
    "CheckpointFile",
    "CheckpointPredicate",
    "Checkpointer",
    "ImportanceKey",
    "JsonValue",
    "LoadHook",
    "SaveHook",
    "average_checkpoints",
    "ckpt_recency",
    "mark_as_loader",
    "mark_as_saver",
    "register_checkpoint_hooks",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

ImportanceKey: TypeAlias = Callable[[Checkpoint], float]
"""Ranks checkpoints: the higher the value, the more important the checkpoint."""

CheckpointPredicate: TypeAlias = Callable[[Checkpoint], bool]
"""Selects the checkpoints a search (or a deletion) considers."""

Device: TypeAlias = torch.device | str | None


def ckpt_recency(checkpoint: Checkpoint) -> float:
    """The importance key that ranks checkpoints by recency (their commit sequence number)."""
    return float(checkpoint.sequence)


@final
@attrs.frozen
class _Recoverable:
    obj: object
    # None means the Stateful default: torch.save(state_dict()) / load_state_dict(torch.load()).
    saver: Callable[[Any, Path], None] | None
    loader: Callable[[Any, Path, bool], None] | None
    optional_load: bool
    # Set when only one of saver / loader is custom: why a failed load may come from that.
    one_sided: str | None = None


@final
@attrs.frozen
class _Prepared:
    """A checkpoint checked and decoded, not yet handed to its recoverables."""

    present: dict[str, _Recoverable]
    states: dict[str, dict[str, Any]]
    # Modules whose states were left in the mapped files: their load_state_dict copies.
    mapped: frozenset[str] = frozenset()


class Checkpointer:
    """Saves named objects (recoverables) together as checkpoints, and restores them.

    Anything ``Stateful`` (modules, optimizers, LR schedulers, grad scalers, epoch counters, your
    own objects with ``state_dict`` / ``load_state_dict``) needs no more than a name; other
    objects need save and load hooks (per object, or per class with
    :func:`register_checkpoint_hooks`).

    Example::

        checkpointer = Checkpointer("results/save", {"model": model, "counter": counter})
        checkpointer.recover_if_possible()
        for epoch in counter:
            ...
            checkpointer.save_and_keep_only(meta={"loss": valid_loss}, min_keys=["loss"])

    Args:
        checkpoints_dir: the folder holding the checkpoint folders (created when needed).
        recoverables: name -> object (a mapping, or a ``torch.nn.ModuleDict``), registered as
            by :meth:`add_recoverable`.
        allow_partial_load: load checkpoints that lack some registered recoverables (those keep
            their current state) instead of raising.
        commit_in_background: a save returns once the files are written; hashing them,
            syncing them to disk, committing the manifest and the keep policy's deletions then
            run in a background thread, while training goes on (see "Committing in the
            background" in docs/checkpoints.md and :meth:`wait`).

    Attributes:
        checkpoints_dir: the folder holding the checkpoint folders.
        allow_partial_load: see Args.
        commit_in_background: see Args.

    Only one run may write to a checkpoints folder: the first save or deletion of a process
    takes the folder's writer lock (see "One run per checkpoint folder" in
    docs/checkpoints.md), which every checkpointer of that process shares.

    Raises:
        ConfigurationError: ``checkpoints_dir`` is not a path, is empty, is a file or lies
            under one, or is (or lies under) a symbolic link whose target does not exist (a
            filesystem that is not mounted, say), ``recoverables`` is not a mapping, or
            ``allow_partial_load`` or ``commit_in_background`` is not a bool; see also
            :meth:`add_recoverable`.
    """

    def __init__(
        self,
        checkpoints_dir: str | os.PathLike[str],
        recoverables: Mapping[str, object] | torch.nn.ModuleDict | None = None,
        *,
        allow_partial_load: bool = False,
        commit_in_background: bool = False,
    ) -> None:
        folder = check_path(
            "checkpoints_dir",
            checkpoints_dir,
            empty="name the folder, such as 'save' ('.' for the working folder)",
        )
        check_bool("allow_partial_load", allow_partial_load)
        check_bool("commit_in_background", commit_in_background)
        self.checkpoints_dir = folder
        self._check_folder()
        self.allow_partial_load = allow_partial_load
        self.commit_in_background = commit_in_background
        self._recoverables: dict[str, _Recoverable] = {}
        self._phase_source: Callable[[], str | None] | None = None
        self._reported: set[Path] = set()
        self._last_stamp = ("", -1)  # the time stamp and index of the last folder made
        # The real paths of the folders whose lock it shares, each with its way to let go.
        self._claimed: dict[str, Callable[[], object]] = {}
        # The checkpoint loaded last, and the recoverables registered since whose state it
        # holds: they were not loaded (see added_after_load).
        self._loaded: Checkpoint | None = None
        self._added_after_load: dict[str, None] = {}
        if recoverables is not None:
            self.add_recoverables(recoverables)

    # ------------------------------------------------------------------ registration

    @property
    def recoverables(self) -> Mapping[str, object]:
        """Name -> object of everything saved with each checkpoint (a read-only view)."""
        return {name: entry.obj for name, entry in self._recoverables.items()}

    def add_recoverable(
        self,
        name: str,
        obj: _T,
        *,
        custom_save_hook: SaveHook[_T] | None = None,
        custom_load_hook: LoadHook[_T] | None = None,
        optional_load: bool = False,
    ) -> None:
        """Save and restore ``obj`` under ``name`` with every checkpoint.

        Registering a name again replaces the object (and its hooks). How ``obj`` is saved:
        the custom hooks given here, else the hooks of the first class in its MRO decorated
        with :func:`register_checkpoint_hooks`, else ``torch.save(obj.state_dict())``.

        Args:
            name: the recoverable's name; its file is ``<name>.ckpt``, so it must be a plain
                file name (no path separator, not starting with a dot) of at most 255 bytes
                with that suffix, in UTF-8.
            obj: the object.
            custom_save_hook: called as ``hook(obj, path)`` to write ``obj`` to ``path``.
            custom_load_hook: called as ``hook(obj, path, end_of_epoch)`` to restore it.
            optional_load: a checkpoint without this recoverable still loads (``obj`` keeps its
                state) instead of raising.

        Raises:
            ConfigurationError: ``name`` is not a usable file name (or one too long for the
                filesystem), ``obj`` is a class (not an
                object of it) or can be neither saved nor loaded (not ``Stateful`` and no
                hooks), or ``optional_load`` is not a bool; the message names it.
            HookContractError: a custom hook is not callable or has the wrong signature (the
                check the class decorators make); the message names the recoverable.
        """
        if not is_plain_name(name) or not is_plain_name(f"{name}{FILE_SUFFIX}"):
            raise ConfigurationError(
                f"recoverable name {name!r} must be a non-empty plain file name (no path "
                "separator or colon, not starting with a dot)"
            )
        _check_name_length("recoverable name", name, FILE_SUFFIX)
        if isinstance(obj, type):
            raise ConfigurationError(
                f"recoverable {name!r} is the class {obj.__qualname__}, not an object of it; "
                "register the object whose state is saved"
            )
        check_bool("optional_load", optional_load)
        hooks = resolve_hooks(name, obj, custom_save_hook, custom_load_hook)
        previous = self._recoverables.get(name)
        loaded = self._loaded
        if (
            loaded is not None
            and name in loaded.files
            and (previous is None or previous.obj is not obj)
        ):
            self._added_after_load[name] = None
        self._recoverables[name] = _Recoverable(
            obj=obj,
            saver=hooks.saver,
            loader=hooks.loader,
            optional_load=optional_load,
            one_sided=hooks.one_sided,
        )

    def add_recoverables(self, recoverables: Mapping[str, object] | torch.nn.ModuleDict) -> None:
        """Register every ``name -> object`` of ``recoverables`` (see :meth:`add_recoverable`).

        ``recoverables`` is a mapping, or a ``torch.nn.ModuleDict`` (each module by its name).
        """
        if not isinstance(recoverables, Mapping | torch.nn.ModuleDict):
            raise ConfigurationError(
                "recoverables must be a mapping of name -> object, got "
                f"{type(recoverables).__qualname__} {recoverables!r}"
            )
        for name, obj in recoverables.items():
            self.add_recoverable(name, obj)

    def watch_phase(self, source: Callable[[], str | None]) -> None:
        """Record ``source()`` (the current phase's name, say) in each checkpoint's manifest."""
        self._phase_source = source

    # ------------------------------------------------------------------ saving

    def save_checkpoint(
        self,
        meta: Mapping[str, object] | None = None,
        end_of_epoch: bool = True,
        name: str | None = None,
    ) -> Checkpoint:
        """Save every recoverable as a new, committed checkpoint.

        The files are written and synced first; the checkpoint exists only once its manifest
        has been renamed into place. If saving fails before that, the partial folder is removed
        and the error propagates, with a note naming the recoverable when it came from its
        ``state_dict`` or save hook. An ``OSError`` of writing, syncing or committing (a full
        disk, an I/O error) is raised with its type and errno, naming the file; if syncing the
        folder fails after the rename, the message says that the checkpoint is committed.

        With ``commit_in_background`` it returns once the files are written: hashing and
        syncing them and the commit run in a background thread, whose failure the next save
        or :meth:`wait` raises. Reading the returned checkpoint's ``files`` waits for the
        commit.

        Under ``torch.distributed`` every process must call it (it is collective): each one
        calls every ``state_dict`` (in registration order, so a ``state_dict`` may run
        collectives), then the main process alone runs the custom save hooks, writes the files
        and commits, with its own ``meta`` and ``name``. It returns on any process only once the
        checkpoint is committed (with ``commit_in_background``, once the files are hashed: the
        commit follows on the main process), and the same :class:`Checkpoint` on every process.

        Args:
            meta: JSON data stored with the checkpoint (validation metrics, say); 0-d tensors
                and NumPy scalars are stored as Python numbers.
            end_of_epoch: whether this checkpoint is saved at the end of an epoch.
            name: the folder's name; by default ``CKPT+<date>+<time>+<NN>``.

        Returns:
            The new checkpoint.

        Raises:
            ConfigurationError: ``meta`` is not JSON data (the message names the key),
                ``end_of_epoch`` is not a bool, or ``name`` is not a plain folder name (or is
                longer than 255 bytes in UTF-8).
            CheckpointError: another process writes to this checkpoints folder (see
                "One run per checkpoint folder" in docs/checkpoints.md; the message names it),
                a committed checkpoint named ``name`` already exists, a save hook
                wrote no file, or a ``state_dict`` returned something loading would refuse (not
                a mapping, or holding more than plain data and tensors: the message says where);
                under ``torch.distributed``, on the other processes, when
                one process failed (the main process to write, say): the message says which
                and why.
        """
        return self._save(meta, end_of_epoch, name, ranking_keys=())

    def _save(
        self,
        meta: Mapping[str, object] | None,
        end_of_epoch: object,
        name: str | None,
        ranking_keys: Sequence[tuple[str, str]],
        after: Callable[[Checkpoint], object] | None = None,
    ) -> Checkpoint:
        """Save a checkpoint; ``ranking_keys``: (argument, meta key) pairs whose values rank.

        ``after`` runs (on the main process) once the checkpoint is committed in the
        background; it is for a checkpointer that commits there only.
        """
        if _collective():
            return self._save_collectively(meta, end_of_epoch, name, ranking_keys, after)
        clean_meta, phase, flag = self._checked_inputs(meta, end_of_epoch, name, ranking_keys)
        return self._write(clean_meta, phase, flag, name, states=None, after=after)

    def _checked_inputs(
        self,
        meta: Mapping[str, object] | None,
        end_of_epoch: object,
        name: str | None,
        ranking_keys: Sequence[tuple[str, str]],
    ) -> tuple[dict[str, JsonValue], str | None, bool]:
        """``meta`` as JSON data, the watched phase and ``end_of_epoch``, once all are valid.

        Every meta value that a key of ``ranking_keys`` names must be a number: a checkpoint
        whose ranking value is not one cannot be ranked, so it is refused before it is written.
        """
        if not isinstance(end_of_epoch, bool | np.bool_):
            raise ConfigurationError(
                f"end_of_epoch must be a bool, got {end_of_epoch!r} "
                f"({type(end_of_epoch).__qualname__})"
            )
        clean_meta = to_json_meta(meta)
        for argument, key in ranking_keys:
            if key in clean_meta and real_number(clean_meta[key]) is None:
                raise ConfigurationError(
                    f"checkpoint meta {key!r} is {clean_meta[key]!r}, not a number, but "
                    f"{argument} ranks checkpoints by it; leave the key out of meta when there "
                    "is no value (such a checkpoint is not ranked by it)"
                )
        phase = self._phase_source() if self._phase_source is not None else None
        if phase is not None and not isinstance(phase, str):
            raise ConfigurationError(
                f"the watched phase source returned {phase!r}, not a string or None"
            )
        if name is not None and not is_plain_name(name):
            raise ConfigurationError(
                f"checkpoint name {name!r} must be a plain folder name (no path separator "
                "or colon, not starting with a dot)"
            )
        if name is not None:
            _check_name_length("checkpoint name", name, "")
        return clean_meta, phase, bool(end_of_epoch)

    def _save_collectively(
        self,
        meta: Mapping[str, object] | None,
        end_of_epoch: object,
        name: str | None,
        ranking_keys: Sequence[tuple[str, str]],
        after: Callable[[Checkpoint], object] | None,
    ) -> Checkpoint:
        what = f"save a checkpoint in {self.checkpoints_dir}"
        mode = f"commit_in_background={self.commit_in_background}"
        try:
            # Every process calls every state_dict, in the same order: one may run collectives
            # (the brain's run state gathers each process's RNG state). Only the main
            # process's states are written.
            # FSDP2-sharded states (DTensors) are gathered into full tensors: a collective too.
            # (Imported here: torch.distributed.tensor imports sympy, which adds a warning
            # filter, and importing typedbrain must change nothing global.)
            from typedbrain._sharded_state import gathered as full_state

            states: dict[str, object] = {}
            for recoverable, entry in self._recoverables.items():
                if entry.saver is None:
                    with _noted(f"taking the state of recoverable {recoverable!r}"):
                        states[recoverable] = full_state(_taken_state(entry.obj))
            clean_meta, phase, flag = self._checked_inputs(meta, end_of_epoch, name, ranking_keys)
        except BaseException as error:
            _agree(error, what, mode)
            raise
        # The same commit mode everywhere: it decides which collectives follow.
        _agree(None, what, mode)
        return _main_decides(
            lambda: self._write(clean_meta, phase, flag, name, states, after=after), what
        )

    def _write(
        self,
        clean_meta: dict[str, JsonValue],
        phase: str | None,
        end_of_epoch: bool,
        name: str | None,
        states: Mapping[str, object] | None,
        *,
        after: Callable[[Checkpoint], object] | None = None,
    ) -> Checkpoint:
        """Write and commit a checkpoint; ``states`` holds the state dicts already taken.

        Committing in the background, it returns once the files are written, and their
        hashing, syncing and the commit (then ``after``) run in a thread of its own. Under
        ``torch.distributed`` the files are hashed before it returns all the same: the
        checkpoint returned is broadcast to the other processes with its records. A commit
        still running from the last save is waited for first, and its failure raised.
        """
        work = work_for(self.checkpoints_dir)
        work.settle()
        self._report_background()
        background = self.commit_in_background
        hash_later = background and not _collective()
        folder = self._new_folder(name)
        hasher = ThreadPoolExecutor(hash_workers(), "typedbrain-hash")
        finishes: list[tuple[str, Callable[[], CheckpointFile]]] = []
        opened: list[IO[bytes]] = []  # the files written, open until synced
        try:
            if background:
                records: dict[str, CheckpointFile] = {}
                for recoverable, entry in self._recoverables.items():
                    record, finish = self._save_one(
                        recoverable, entry, folder, hasher, states, opened, hash_later=hash_later
                    )
                    finishes.append((recoverable, finish))
                    if record is not None:
                        records[recoverable] = record
                pending = PendingRecords(folder) if hash_later else None
                checkpoint = self._new_checkpoint(
                    folder, end_of_epoch, phase, clean_meta, records if pending is None else pending
                )
                work.start(
                    f"committing checkpoint {folder}",
                    functools.partial(self._commit, checkpoint, finishes, hasher, pending, after),
                )
                return checkpoint
            # The pieces of a large write are hashed in parallel while it is written. Each
            # file's fsync runs in a thread of its own while the next one is written, and all
            # are done before the manifest commits; leaving the ``with`` joins them, on
            # failure too, before the folder is removed.
            with ThreadPoolExecutor(1, "typedbrain-sync") as syncer:
                synced = {}
                for recoverable, entry in self._recoverables.items():
                    _, finish = self._save_one(
                        recoverable, entry, folder, hasher, states, opened, hash_later=False
                    )
                    synced[recoverable] = syncer.submit(finish)
                files = {recoverable: done.result() for recoverable, done in synced.items()}
            checkpoint = self._new_checkpoint(folder, end_of_epoch, phase, clean_meta, files)
            commit_manifest(checkpoint)
        except BaseException:
            try:
                # Files whose syncs never ran (in the background mode) are still open.
                for stream in opened:
                    with contextlib.suppress(OSError):
                        stream.close()
            finally:
                hasher.shutdown()
                if not (folder / MANIFEST_NAME).exists():
                    shutil.rmtree(folder, ignore_errors=True)
            raise
        hasher.shutdown()
        self._after_commit(checkpoint)
        return checkpoint

    def _new_checkpoint(
        self,
        folder: Path,
        end_of_epoch: bool,
        phase: str | None,
        clean_meta: dict[str, JsonValue],
        files: Mapping[str, CheckpointFile],
    ) -> Checkpoint:
        """The record of the checkpoint saved now in ``folder``, numbered after the others."""
        return Checkpoint(
            path=folder,
            sequence=self._next_sequence(),
            unixtime=time.time(),
            end_of_epoch=end_of_epoch,
            phase=phase,
            meta=clean_meta,
            files=files,
            typedbrain_version=__version__,
            torch_version=str(torch.__version__),
        )

    def _commit(
        self,
        checkpoint: Checkpoint,
        finishes: Sequence[tuple[str, Callable[[], CheckpointFile]]],
        hasher: Executor,
        pending: PendingRecords | None,
        after: Callable[[Checkpoint], object] | None,
    ) -> None:
        """Hash and sync ``checkpoint``'s files, commit it, then run ``after`` (in the background).

        ``pending`` (the returned checkpoint's records, unless they were taken already) gets
        the records once committed.
        """
        records: dict[str, CheckpointFile] = {}
        try:
            try:
                records = _finish_all(finishes)
            finally:
                hasher.shutdown()
            committed = attrs.evolve(checkpoint, files=records)
            commit_manifest(committed)
        except BaseException as error:
            if (checkpoint.path / MANIFEST_NAME).exists():
                # Committed, but syncing its folder failed (the error says so): it stands.
                if pending is not None:
                    pending.resolve(records)
            else:
                if pending is not None:
                    pending.fail(error)
                shutil.rmtree(checkpoint.path, ignore_errors=True)
            raise
        if pending is not None:
            pending.resolve(records)
        self._after_commit(committed)
        if after is not None:
            after(committed)

    def _after_commit(self, checkpoint: Checkpoint) -> None:
        """Make the new folder's entry durable and say that ``checkpoint`` is saved."""
        with committed_already(checkpoint.path, checkpoint.path.parent):
            sync_directory(checkpoint.path.parent)
        # Intra-epoch checkpoints can come every few batches: logged at DEBUG, not INFO.
        logger.log(
            logging.INFO if checkpoint.end_of_epoch else logging.DEBUG,
            "saved checkpoint %s",
            checkpoint.path,
        )

    def _check_folder(self) -> None:
        """Refuse a ``checkpoints_dir`` that exists but is not a folder (a file, say).

        Or one under a file (``afile/save``), which cannot be made, or one that is, or lies
        under, a symbolic link to nothing (``save -> /scratch/...`` on a machine where that is
        not mounted): it would look like a folder without checkpoints, and the first save would
        fail an epoch later.
        """
        folder = self.checkpoints_dir
        for path in (folder, *folder.parents):
            if path.is_symlink() and not path.exists():
                inside = "" if path == folder else f" (checkpoints_dir {folder} lies under it)"
                raise ConfigurationError(
                    f"checkpoints_dir: {path} is a symbolic link to {os.readlink(path)}, which "
                    f"does not exist{inside}; mount or create the target, or fix the link"
                )
        check_makeable_folder("checkpoints_dir", folder)

    def _claim(self) -> None:
        """Hold the writer lock of ``checkpoints_dir`` (which exists), shared in this process.

        Raises:
            CheckpointError: another process writes to the folder; the message names it.
        """
        key = os.path.realpath(self.checkpoints_dir)
        if key not in self._claimed:
            self._claimed[key] = claim(self.checkpoints_dir, self)

    def release_lock(self) -> None:
        """Let go of the checkpoints folder's writer lock now, so another process may write.

        A checkpointer holds the lock from its first write until it is garbage-collected: an
        idle notebook kernel that trained into a folder would keep a script from writing there.
        This lets go of this checkpointer's share (the lock goes once no other checkpointer of
        the process that wrote to the folder holds it). The checkpointer stays usable: its
        next write takes the lock again (and fails if another process holds it then).
        """
        self._settle()
        claimed, self._claimed = self._claimed, {}
        for release in claimed.values():
            release()

    def _new_folder(self, name: str | None) -> Path:
        self._check_folder()
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self._claim()
        if name is not None:
            folder = self.checkpoints_dir / name
            try:
                folder.mkdir()
            except FileExistsError:
                _remove_leftover(folder)
                folder.mkdir()
            return folder
        stamp = time.strftime("%Y-%m-%d+%H-%M-%S", time.localtime())
        # Within a second, count on from this checkpointer's last folder even if a keep policy
        # has deleted it since: a name is not given to two checkpoints by one checkpointer.
        last_stamp, last_index = self._last_stamp
        start = last_index + 1 if last_stamp == stamp else 0
        for index in itertools.count(start):
            folder = self.checkpoints_dir / f"CKPT+{stamp}+{index:02d}"
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            self._last_stamp = (stamp, index)
            return folder
        raise AssertionError("unreachable")  # pragma: no cover

    def _save_one(
        self,
        name: str,
        entry: _Recoverable,
        folder: Path,
        hasher: Executor,
        states: Mapping[str, object] | None,
        opened: list[IO[bytes]],
        *,
        hash_later: bool,
    ) -> tuple[CheckpointFile | None, Callable[[], CheckpointFile]]:
        """Write recoverable ``name``'s file; return its record and the call that syncs it.

        The record is taken now (``None`` is returned with ``hash_later``): the stream the
        state is saved through takes the checksums, or a save hook's file is hashed once
        written. With ``hash_later`` the call returned hashes the file before syncing it, and
        returns the record (it always does). The pieces are hashed in ``hasher``'s threads.
        Its state is taken from ``states`` when given, else from its ``state_dict`` now. The
        file written, still open, is added to ``opened``.
        """
        path = folder / f"{name}{FILE_SUFFIX}"
        if entry.saver is not None:
            with _noted(f"saving recoverable {name!r} with its save hook"):
                entry.saver(entry.obj, path)
            if not path.is_file():
                raise CheckpointError(
                    f"the save hook of recoverable {name!r} wrote no file at {path}"
                )
            if hash_later:
                return None, functools.partial(hash_file, path, hasher)
            with naming(path, "while hashing the file a save hook wrote"):
                hooked = hash_pieces(path, hasher)
            return hooked, functools.partial(sync_file, path, hooked)
        if states is not None:
            state = states[name]
        else:
            with _noted(f"taking the state of recoverable {name!r}"):
                state = _taken_state(entry.obj)
        _check_loadable(name, state)
        raw = path.open("wb", buffering=WRITE_BUFFER)
        opened.append(raw)
        try:
            writer = None if hash_later else HashingWriter(raw, hasher)
            # A flush (torch.save's own, or this one) reports a full disk as a bare OSError.
            with naming(path, f"recoverable {name!r}"):
                try:
                    # cast: torch.save only calls write() and flush() on a stream.
                    torch.save(state, cast(IO[bytes], raw if writer is None else writer))
                except RuntimeError as error:
                    # torch's writer reports a failed write (a full disk) as its own
                    # RuntimeError; the OSError it met is the error to raise, and the file is
                    # the one to name.
                    failure = error.__context__
                    if isinstance(failure, OSError):
                        raise OSError(
                            failure.errno, f"{failure.strerror} (recoverable {name!r})", str(path)
                        ) from error
                    raise
                raw.flush()
        except BaseException:
            # Closing flushes what is left, which fails again on a full disk: the first
            # error is the one to raise.
            with contextlib.suppress(OSError):
                raw.close()
            raise
        if writer is None:
            return None, functools.partial(hash_sync_and_close, raw, path, hasher)
        record = writer.record(path.name)
        return record, functools.partial(sync_and_close, raw, path, record)

    def _next_sequence(self) -> int:
        last = max(self._scan(report=False), key=lambda c: c.sequence, default=None)
        if last is not None and last.sequence + 1 >= MAX_SEQUENCE:
            raise CheckpointError(
                f"cannot number a new checkpoint in {self.checkpoints_dir}: {last.path} has "
                f"sequence number {last.sequence}, the highest a manifest may hold; move that "
                "folder out of the way"
            )
        return 1 if last is None else last.sequence + 1

    def save_and_keep_only(
        self,
        meta: Mapping[str, object] | None = None,
        end_of_epoch: bool = True,
        name: str | None = None,
        num_to_keep: int = 1,
        keep_recent: bool = True,
        importance_keys: Sequence[ImportanceKey] = (),
        max_keys: Sequence[str] = (),
        min_keys: Sequence[str] = (),
        ckpt_predicate: CheckpointPredicate | None = None,
    ) -> Checkpoint:
        """Save a checkpoint, then delete the older ones that no keep policy protects.

        Saving comes first, so the newest committed checkpoint is never removed before its
        successor is committed, and the checkpoint just saved is always kept. An end-of-epoch
        checkpoint (``end_of_epoch=True``) supersedes the intra-epoch checkpoints saved before
        it (those whose meta carries ``INTRA_EPOCH_CKPT_FLAG``, among those ``ckpt_predicate``
        accepts): they are deleted, and do not count in the keep policy. (SpeechBrain counts
        them like any other checkpoint, so there they can push out an end-of-epoch checkpoint
        the policy should keep.) Which of the others are kept follows
        :meth:`delete_checkpoints`, with recency added to the importance keys when
        ``keep_recent``.

        A checkpoint folder that cannot be deleted (a permission error, say) is reported with a
        :class:`CheckpointWarning` naming it and the error; the other deletions go on, and the
        call returns the checkpoint it saved.

        Under ``torch.distributed`` it is collective: the main process decides what to delete
        (the importance keys and ``ckpt_predicate`` run there only) and deletes it before any
        process returns.

        With ``commit_in_background``, the deletions run after the commit, in its background
        thread (on the main process), and their failures are raised by the next save or
        :meth:`wait`.

        Args:
            meta: see :meth:`save_checkpoint`.
            end_of_epoch: see :meth:`save_checkpoint`.
            name: see :meth:`save_checkpoint`.
            num_to_keep: how many checkpoints to keep per key.
            keep_recent: also keep the ``num_to_keep`` most recent checkpoints.
            importance_keys: functions ranking checkpoints (higher is better).
            max_keys: meta keys for which higher values are better.
            min_keys: meta keys for which lower values are better.
            ckpt_predicate: only checkpoints it accepts are considered for deletion.

        Returns:
            The checkpoint just saved.

        Raises:
            ConfigurationError: an argument is invalid (``min_keys="loss"`` instead of
                ``["loss"]``, a negative ``num_to_keep``, a ``ckpt_predicate`` that is not a
                function, a ``meta`` value for one of ``min_keys`` / ``max_keys`` that is not
                a number, ...): nothing is saved. Or an importance key returned something other
                than a number: the keys run on the checkpoints once the new one is saved, so
                it stays saved, and nothing is deleted.
            CheckpointError: see :meth:`save_checkpoint`.
        """
        importance, maxima, minima = _checked_keep_policy(
            num_to_keep, importance_keys, max_keys, min_keys, ckpt_predicate
        )
        ranking_keys = [("min_keys", key) for key in minima] + [("max_keys", key) for key in maxima]
        keys = (*importance, ckpt_recency) if keep_recent else importance

        def delete_old(checkpoint: Checkpoint) -> list[Checkpoint]:
            try:
                return self._delete(
                    num_to_keep=num_to_keep,
                    importance_keys=keys,
                    max_keys=maxima,
                    min_keys=minima,
                    ckpt_predicate=ckpt_predicate,
                    keep=checkpoint,
                )
            except ConfigurationError as error:  # raised while ranking, before any deletion
                error.add_note(f"(checkpoint {checkpoint.path} was saved; none was deleted)")
                raise

        if self.commit_in_background:
            # The deletions follow the commit in its thread (on the main process).
            return self._save(meta, end_of_epoch, name, ranking_keys, after=delete_old)
        checkpoint = self._save(meta, end_of_epoch, name, ranking_keys)
        _main_decides(
            lambda: delete_old(checkpoint), f"delete old checkpoints in {self.checkpoints_dir}"
        )
        return checkpoint

    def wait(self) -> None:
        """Wait until the last save's commit in the background is done; raise what failed there.

        With ``commit_in_background``, a save returns before its checkpoint is committed.
        Every later call of the checkpointer waits for that commit first (a listing, say, sees
        the checkpoint), and the next save, or this, raises what failed in it (a full disk,
        say: the checkpoint was not committed, its folder is removed). The warnings of the
        commit (a keep policy's deletion that failed) are issued here too, in this thread, as
        they would be by the save in the default mode. Call it where you need the checkpoint
        on disk (a :class:`~typedbrain.Brain` does at the end of ``fit``). Without a save in
        the background it returns at once (but under ``torch.distributed`` every process must
        call it all the same).

        Under ``torch.distributed`` it is collective: a failure on the main process (the only
        one that commits) is raised on every process; its warnings are issued there.

        Raises:
            OSError, CheckpointError, ConfigurationError: what the commit, or the deletions of
                the ``save_and_keep_only`` that started it, raised (see
                :meth:`save_and_keep_only`); it carries a note saying it comes from the
                background. Each failure is raised once.
        """
        self._settle()
        _main_decides(self._report_background, f"commit a checkpoint in {self.checkpoints_dir}")

    def _settle(self) -> None:
        """Wait for a commit running in the background in this folder (any checkpointer's)."""
        work_for(self.checkpoints_dir).settle()

    def _report_background(self) -> None:
        """Issue the warnings of the settled background work, then raise its failure, if any.

        A warning that a filter makes an error is raised first; the failure waits for the next
        call.
        """
        work = work_for(self.checkpoints_dir)
        for message, category in work.take_warnings():
            warn(message, category)
        failure = work.take_failure()
        if failure is not None:
            raise failure

    # ------------------------------------------------------------------ listing and finding

    def list_checkpoints(self) -> list[Checkpoint]:
        """Every committed checkpoint in ``checkpoints_dir``, oldest first (reads manifests only).

        A folder without a valid manifest (an interrupted save, damage, or a folder that is
        not a checkpoint: the warning says which) is skipped with a :class:`CheckpointWarning`
        (once per folder for this checkpointer) and left on disk.
        Under ``torch.distributed`` it is collective: the main process lists, every process
        gets its list.

        Raises:
            CheckpointError: a manifest exists but cannot be read (a permission error, an I/O
                error): the folder may be an intact checkpoint, so it is not skipped; the
                message names the file and the OS error.
        """
        self._settle()
        return _main_decides(
            lambda: self._scan(report=True),
            f"list the checkpoints in {self.checkpoints_dir}",
        )

    def _scan(self, *, report: bool) -> list[Checkpoint]:
        """The committed checkpoints, oldest first; with ``report``, warn about the others."""
        self._check_folder()
        if not self.checkpoints_dir.is_dir():
            return []
        found: list[Checkpoint] = []
        for entry in sorted(self.checkpoints_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                # A link ("best" -> CKPT+...) would list its target twice, and deleting through
                # it would delete the target.
                logger.debug("ignoring %s: a symbolic link, not a checkpoint folder", entry)
                continue
            if not entry.is_dir():
                continue
            try:
                found.append(read_manifest(entry))
            except CorruptCheckpointError as error:
                if report and entry not in self._reported:
                    self._reported.add(entry)
                    warn(
                        f"ignoring folder {entry}: {error.reason}; it is left on disk",
                        CheckpointWarning,
                    )
        found.sort(key=lambda c: (c.sequence, c.unixtime, c.path.name))
        return found

    def find_checkpoints(
        self,
        importance_key: ImportanceKey | None = None,
        max_key: str | None = None,
        min_key: str | None = None,
        ckpt_predicate: CheckpointPredicate | None = None,
        max_num_checkpoints: int | None = None,
    ) -> list[Checkpoint]:
        """The checkpoints ranked by one key, best first; the most recent first by default.

        Give at most one of ``importance_key``, ``max_key`` and ``min_key``. With ``max_key``
        (``min_key``) the checkpoints whose meta has that key rank by its value, highest
        (lowest) first; the others are left out, and so, with a :class:`CheckpointWarning`
        naming the folder, are those whose value is not a number. A NaN ranks last, below
        the infinities, whatever the key. Ties go to the most recent checkpoint.

        Under ``torch.distributed`` it is collective: the main process ranks (the key and the
        predicate run there only), every process gets its answer.

        Args:
            importance_key: ranks checkpoints, higher first.
            max_key: a meta key; higher values rank first.
            min_key: a meta key; lower values rank first.
            ckpt_predicate: only checkpoints it accepts are returned.
            max_num_checkpoints: return at most this many (an integer >= 0).

        Raises:
            ConfigurationError: more than one key was given, a key is not a string (a meta
                key) or a function (an importance key), an importance key returned something
                other than a number, or ``max_num_checkpoints`` is negative.
        """
        self._settle()
        return _main_decides(
            lambda: _rank(
                self._scan(report=True),
                importance_key=importance_key,
                max_key=max_key,
                min_key=min_key,
                ckpt_predicate=ckpt_predicate,
                max_num_checkpoints=max_num_checkpoints,
                skip_non_numbers=True,
            ),
            f"find checkpoints in {self.checkpoints_dir}",
        )

    def find_checkpoint(
        self,
        importance_key: ImportanceKey | None = None,
        max_key: str | None = None,
        min_key: str | None = None,
        ckpt_predicate: CheckpointPredicate | None = None,
    ) -> Checkpoint | None:
        """The best checkpoint by one key (see :meth:`find_checkpoints`), or ``None``."""
        ranked = self.find_checkpoints(
            importance_key, max_key, min_key, ckpt_predicate, max_num_checkpoints=1
        )
        return ranked[0] if ranked else None

    # ------------------------------------------------------------------ deleting

    def delete_checkpoints(
        self,
        *,
        num_to_keep: int = 1,
        importance_keys: Sequence[ImportanceKey] = (ckpt_recency,),
        max_keys: Sequence[str] = (),
        min_keys: Sequence[str] = (),
        ckpt_predicate: CheckpointPredicate | None = None,
    ) -> list[Checkpoint]:
        """Delete the checkpoints that no key protects; return the deleted ones.

        For each key (each importance key, max key and min key) the checkpoints it ranks are
        candidates for deletion, and its ``num_to_keep`` best are protected. A checkpoint is
        deleted if it is a candidate for some key and protected by none. Checkpoints that no key
        ranks (a meta without any of the keys) and those ``ckpt_predicate`` rejects are kept.

        Under ``torch.distributed`` it is collective: the main process decides and deletes,
        every process gets the list of deleted checkpoints once they are gone.

        A folder that cannot be deleted is reported with a :class:`CheckpointWarning` naming
        it and the error, the others are deleted still, and it is not in the list returned.

        Raises:
            ConfigurationError: ``num_to_keep`` is negative, or a keys argument is not a list
                of keys (``min_keys="loss"`` instead of ``["loss"]``, say).
            CheckpointError: another process writes to this checkpoints folder (the message
                names it), or a manifest cannot be read (see :meth:`list_checkpoints`).
        """
        importance, maxima, minima = _checked_keep_policy(
            num_to_keep, importance_keys, max_keys, min_keys, ckpt_predicate
        )
        self._settle()
        return _main_decides(
            lambda: self._delete(
                num_to_keep=num_to_keep,
                importance_keys=importance,
                max_keys=maxima,
                min_keys=minima,
                ckpt_predicate=ckpt_predicate,
                keep=None,
            ),
            f"delete checkpoints in {self.checkpoints_dir}",
        )

    def _delete(
        self,
        *,
        num_to_keep: int,
        importance_keys: Sequence[ImportanceKey],
        max_keys: Sequence[str],
        min_keys: Sequence[str],
        ckpt_predicate: CheckpointPredicate | None,
        keep: Checkpoint | None,
    ) -> list[Checkpoint]:
        """Delete what the keep policy does not protect; return what was deleted.

        ``keep`` is the checkpoint a ``save_and_keep_only`` just saved: it is kept, and if it
        is an end-of-epoch one, the intra-epoch checkpoints saved before it (those
        ``ckpt_predicate`` accepts) are deleted and left out of the rankings. A folder that
        cannot be deleted is reported with a :class:`CheckpointWarning`; the others are
        deleted still.
        """
        self._check_folder()
        if not self.checkpoints_dir.is_dir():
            return []
        self._claim()
        self._finish_deletions()
        checkpoints = self._scan(report=True)
        superseded = _superseded(checkpoints, keep, ckpt_predicate)
        if superseded:
            gone = {checkpoint.path for checkpoint in superseded}
            checkpoints = [checkpoint for checkpoint in checkpoints if checkpoint.path not in gone]
        rankings: list[list[Checkpoint]] = []
        for key in importance_keys:
            rankings.append(_rank(checkpoints, importance_key=key, ckpt_predicate=ckpt_predicate))
        for name in max_keys:
            rankings.append(
                _rank(
                    checkpoints,
                    max_key=name,
                    ckpt_predicate=ckpt_predicate,
                    skip_non_numbers=True,
                )
            )
        for name in min_keys:
            rankings.append(
                _rank(
                    checkpoints,
                    min_key=name,
                    ckpt_predicate=ckpt_predicate,
                    skip_non_numbers=True,
                )
            )
        candidates = {c.path for ranking in rankings for c in ranking}
        protected = {c.path for ranking in rankings for c in ranking[:num_to_keep]}
        if keep is not None:
            protected.add(keep.path)
        ranked_out = [c for c in checkpoints if c.path in candidates and c.path not in protected]
        doomed = sorted(
            [*superseded, *ranked_out], key=lambda c: (c.sequence, c.unixtime, c.path.name)
        )
        return [checkpoint for checkpoint in doomed if _try_delete(checkpoint)]

    def _finish_deletions(self) -> None:
        """Remove what deletions cut short left behind (see :func:`_delete_folder`).

        Such a folder was renamed ``.deleting-...`` and holds nothing but files a save writes
        (and maybe the manifest): it is no checkpoint any more. One holding anything else is
        left alone, as is one that cannot be removed; a warning says so once per folder.
        """
        for entry in sorted(self.checkpoints_dir.iterdir()):
            if not entry.name.startswith(_DELETING) or entry.is_symlink() or not entry.is_dir():
                continue
            try:
                left = sorted(entry.iterdir())
                foreign = [
                    path.name
                    for path in left
                    if not (is_save_file(path) or _is_manifest_file(path))
                ]
                if not foreign:
                    for path in left:
                        path.unlink()
                    entry.rmdir()
                    logger.debug("finished deleting %s", entry)
                    continue
                problem = f"it holds {', '.join(map(repr, foreign))}, which no save writes"
            except OSError as error:
                problem = f"{type(error).__name__}: {error}"
            if entry not in self._reported:
                self._reported.add(entry)
                warn(
                    f"could not finish deleting {entry}, what a deletion of a checkpoint cut "
                    f"short left behind ({problem}); it is no checkpoint, and is left on disk",
                    CheckpointWarning,
                )

    # ------------------------------------------------------------------ loading

    def load_checkpoint(self, checkpoint: Checkpoint, device: Device = None) -> None:
        """Restore every recoverable from ``checkpoint`` (after checking its files).

        Every file is checked against the manifest (size and SHA-256) and decoded before any
        recoverable is changed, so a damaged checkpoint leaves all of them as they were. The
        checks run in worker threads while this thread decodes the files; a decoded state is
        handed to its recoverable only once every file has passed.

        Under ``torch.distributed`` it is collective: every process checks and decodes its
        files, and only once all have succeeded does any recoverable change.

        Args:
            checkpoint: the checkpoint to load.
            device: where tensors saved from an accelerator (a GPU) are loaded; by default
                where they were. Tensors saved from the CPU stay on the CPU, as they were in
                the run that saved them (an optimizer keeps its step counts there), whatever
                ``device`` says: ``load_state_dict`` puts a module's or an optimizer's state
                next to its parameters anyway. ``"cpu"`` loads everything on the CPU.

        Raises:
            ConfigurationError: ``checkpoint`` is not a :class:`Checkpoint` (a path, say), or
                ``device`` is not a device, or one this machine lacks.
            CorruptCheckpointError: a file is missing, or has the wrong size or checksum.
            UnsafeCheckpointError: a file holds objects that ``weights_only`` loading refuses.
            CheckpointError: a registered recoverable is not in the checkpoint (and neither
                ``allow_partial_load`` nor its ``optional_load`` is set); the message names it.
                Or a file whose checksum matches does not decode here (saved on a GPU and
                loaded where there is none, say); the message names the file and the cause.
                Or a recoverable's ``load_state_dict`` or load hook fails (a model whose shapes
                changed since the save, say): the message names the recoverable, its file, the
                typedbrain and torch versions that saved it, the original error (also the
                ``__cause__``) and the recoverables loaded before it, which keep their new
                state. Under ``torch.distributed``, on the other processes, when one process failed
                (the message says which and why) or when they were given different
                checkpoints.
        """
        _check_checkpoint("checkpoint", checkpoint)
        self._settle()
        if _collective():
            self._load_collectively(checkpoint, device, prepared=None)
            return
        self._apply(checkpoint, self._prepare(checkpoint, device))

    def _prepare(self, checkpoint: Checkpoint, device: Device) -> _Prepared:
        """Check and decode ``checkpoint``'s files; no recoverable changes."""
        present: dict[str, _Recoverable] = {}
        for name, entry in self._recoverables.items():
            if name in checkpoint.files:
                present[name] = entry
            elif self.allow_partial_load or entry.optional_load:
                logger.info(
                    "checkpoint %s has no %r; it keeps its current state", checkpoint.path, name
                )
            else:
                raise CheckpointError(
                    f"checkpoint {checkpoint.path} has no recoverable {name!r} (it holds: "
                    f"{', '.join(sorted(checkpoint.files)) or 'nothing'}); pass "
                    "allow_partial_load=True to the Checkpointer or optional_load=True to "
                    "add_recoverable to load it anyway"
                )
        decode = [name for name, entry in present.items() if entry.loader is None]
        mapped = frozenset(name for name in decode if _loads_by_copying(present[name].obj))
        states = _verified_states(
            checkpoint,
            present,
            decode=decode,
            device=device,
            keep_cpu=True,
            hints={name: entry.one_sided for name, entry in present.items() if entry.one_sided},
            mapped=mapped,
        )
        return _Prepared(present=present, states=states, mapped=mapped)

    def _apply(self, checkpoint: Checkpoint, prepared: _Prepared) -> None:
        """Hand the states of a prepared checkpoint to its recoverables (load hooks run here)."""
        # Every file has passed its checks before any recoverable changes.
        present, states = prepared.present, prepared.states
        loaded: list[str] = []
        for name, entry in present.items():
            path = checkpoint.paramfiles[name]
            try:
                if entry.loader is not None:
                    entry.loader(entry.obj, path, checkpoint.end_of_epoch)
                else:
                    state = _for_layout(entry.obj, states[name])
                    if isinstance(entry.obj, torch.nn.Module):
                        _warn_if_cast(checkpoint, name, entry.obj, state)
                    try:
                        cast(Stateful, entry.obj).load_state_dict(state)
                    finally:  # a load that failed half-way may have kept tensors too
                        if name in prepared.mapped:
                            _unmap_kept(name, cast(torch.nn.Module, entry.obj), states[name])
            except Exception as error:
                refused = _refused_state(checkpoint, name, error, loaded)
                if entry.one_sided is not None:
                    refused = f"{refused}. Its hooks may be the cause: {entry.one_sided}"
                raise CheckpointError(refused) from error
            loaded.append(name)
            logger.debug("restored %r from %s", name, path)
        self._loaded = checkpoint
        self._added_after_load.clear()
        logger.info("loaded checkpoint %s", checkpoint.path)

    def _load_collectively(
        self, checkpoint: Checkpoint, device: Device, prepared: _Prepared | None
    ) -> None:
        """Every process checks, decodes and (once all have) applies ``checkpoint``."""
        what = f"load checkpoint {checkpoint.path}"
        token = str(checkpoint.path)
        try:
            ready = prepared if prepared is not None else self._prepare(checkpoint, device)
        except BaseException as error:
            _agree(error, what, token)
            raise
        _agree(None, what, token)
        # All processes apply together, in registration order: a load_state_dict may run
        # collectives; the agreement afterwards is the final barrier.
        try:
            self._apply(checkpoint, ready)
        except BaseException as error:
            _agree(error, what, token)
            raise
        _agree(None, what, token)

    def recover_if_possible(
        self,
        importance_key: ImportanceKey | None = None,
        max_key: str | None = None,
        min_key: str | None = None,
        ckpt_predicate: CheckpointPredicate | None = None,
        device: Device = None,
    ) -> Checkpoint | None:
        """Load the best usable checkpoint (the most recent by default); return it, or None.

        Candidates are ranked as by :meth:`find_checkpoints`. A candidate that fails
        verification (a missing file, a wrong size or checksum, a manifest that is not valid)
        is skipped with a :class:`CheckpointWarning` naming its folder and the reason, and the
        next one is tried; with no usable checkpoint nothing is loaded. A candidate whose
        files are intact but do not decode on this machine (a GPU checkpoint without a GPU),
        or whose manifest or files exist but cannot be read (a permission error, EIO, ESTALE),
        is not known to be damaged: that stops the recovery with an error rather than falling
        back to an older checkpoint (which the next keep policy would then let replace it),
        or to none.

        Recovering takes no lock (evaluating the checkpoints of a run still training is
        legitimate); it logs (at INFO) when another live process of this machine holds the
        folder's writer lock: a second run of the same job would fail at its first save. A
        candidate that such a writer deletes or replaces before its files are verified (its
        folder is gone, is there without its manifest, or holds another commit) is not damage:
        the folder is scanned again (said at INFO, no warning) and the best of the new ranking
        is tried, leaving out the folders found damaged; after 3 rescans, such a candidate is
        skipped like a damaged one. A deletion later than that (while a custom load hook reads
        its file, or, under ``torch.distributed``, before the other processes read theirs)
        stops the recovery with a :class:`CheckpointError`.

        Under ``torch.distributed`` it is collective: the main process picks the checkpoint
        (checking it, and skipping damaged ones with the warning, there only) and every process
        then loads that one, checking the files it reads; a folder the main process did not
        pick (an uncommitted one, say) is never loaded. It returns the same checkpoint (or
        None) everywhere.

        Raises:
            ConfigurationError: ``device`` is not a device, or one this machine lacks (checked
                before any checkpoint is tried), or a key is invalid (see
                :meth:`find_checkpoints`).
            UnsafeCheckpointError: a verified file holds objects ``weights_only`` loading
                refuses (a planted file: this is not skipped silently).
            CheckpointError: a registered recoverable is missing from the chosen checkpoint,
                a manifest or file cannot be read (the message names it and the OS error),
                or a verified file does not decode (the message names the file and the cause),
                or a recoverable's ``load_state_dict`` or load hook fails (see
                :meth:`load_checkpoint`); under ``torch.distributed``, on the other processes,
                when one process failed (the message says which and why).
        """
        self._settle()
        if _collective():
            return self._recover_collectively(
                importance_key, max_key, min_key, ckpt_predicate, device
            )
        _check_device(device)
        chosen = self._first_usable(
            importance_key,
            max_key,
            min_key,
            ckpt_predicate,
            lambda checkpoint: self.load_checkpoint(checkpoint, device=device),
        )
        if chosen is None:
            logger.info("no checkpoint to recover in %s", self.checkpoints_dir)
        return chosen

    def _first_usable(
        self,
        importance_key: ImportanceKey | None,
        max_key: str | None,
        min_key: str | None,
        ckpt_predicate: CheckpointPredicate | None,
        load: Callable[[Checkpoint], None],
    ) -> Checkpoint | None:
        """Try the candidates best first with ``load``; return the first that loads, or None.

        A candidate that fails verification is skipped with a :class:`CheckpointWarning`. One
        whose folder a writer deleted (or replaced) since it was ranked (see
        :func:`_gone_since_ranked`) is not damage: a writer commits a successor before it
        deletes its newest checkpoint, so the folder is scanned again (said at INFO) and the
        new ranking is tried from its best, leaving out the folders already found damaged. After
        :data:`_MAX_RESCANS` rescans, a vanished candidate is skipped like a damaged one.
        """
        candidates = self._candidates(importance_key, max_key, min_key, ckpt_predicate)
        damaged: set[tuple[Path, int, float]] = set()
        rescans = 0
        while True:
            for checkpoint in candidates:
                commit = (checkpoint.path, checkpoint.sequence, checkpoint.unixtime)
                if commit in damaged:
                    continue
                try:
                    load(checkpoint)
                except CorruptCheckpointError as error:
                    gone = _gone_since_ranked(checkpoint)
                    if gone is not None and rescans < _MAX_RESCANS:
                        rescans += 1
                        if gone == "its manifest is gone":
                            # A deletion in place goes on: the rescan need not call it an
                            # interrupted save.
                            self._reported.add(checkpoint.path)
                        logger.info(
                            "checkpoint %s was deleted or replaced while it was being loaded "
                            "(%s: another process's keep policy, say); scanning %s again "
                            "(rescan %d of at most %d)",
                            checkpoint.path,
                            gone,
                            self.checkpoints_dir,
                            rescans,
                            _MAX_RESCANS,
                        )
                        break
                    damaged.add(commit)
                    reason = error.reason
                    if gone is not None:
                        reason = (
                            f"{reason} ({gone}: it was deleted or replaced while it was being "
                            f"loaded, and the folder has been scanned again {rescans} times "
                            "already)"
                        )
                    warn(
                        f"skipping checkpoint {checkpoint.path}: {reason}; trying an older one",
                        CheckpointWarning,
                    )
                    continue
                return checkpoint
            else:
                return None
            candidates = self._candidates(
                importance_key, max_key, min_key, ckpt_predicate, rescan=True
            )

    def _candidates(
        self,
        importance_key: ImportanceKey | None,
        max_key: str | None,
        min_key: str | None,
        ckpt_predicate: CheckpointPredicate | None,
        *,
        rescan: bool = False,
    ) -> list[Checkpoint]:
        """The checkpoints to try recovering, best first; warns when a meta key ranks none.

        A ``min_key`` / ``max_key`` that no checkpoint's meta holds (a typo, or a folder of
        intra-epoch checkpoints only) would otherwise recover nothing without a word. With
        ``rescan`` (the folder changed while a candidate was loaded) the writer is not named
        again.
        """
        writer = None if rescan else other_writer(self.checkpoints_dir)
        if writer is not None:
            # Legitimate for an evaluation next to the training: said, not warned.
            logger.info(
                "recovering from %s while %s writes to it (it holds the folder's writer lock): "
                "a checkpoint it deletes meanwhile is replaced by the best one left then, and "
                "this process cannot save there until that one ends",
                self.checkpoints_dir,
                writer,
            )
        checkpoints = self._scan(report=True)
        ranked = _rank(
            checkpoints,
            importance_key=importance_key,
            max_key=max_key,
            min_key=min_key,
            ckpt_predicate=ckpt_predicate,
            skip_non_numbers=True,
        )
        argument, meta_key = ("max_key", max_key) if max_key is not None else ("min_key", min_key)
        if (
            meta_key is not None
            and checkpoints
            and not any(meta_key in checkpoint.meta for checkpoint in checkpoints)
        ):
            held = sorted({key for checkpoint in checkpoints for key in checkpoint.meta})
            warn(
                f"none of the {len(checkpoints)} checkpoints in {self.checkpoints_dir} has the "
                f"meta key {meta_key!r} that {argument} ranks by (their meta keys: "
                f"{', '.join(map(repr, held)) or 'none'}), so none is recovered",
                CheckpointWarning,
            )
        return ranked

    def _recover_collectively(
        self,
        importance_key: ImportanceKey | None,
        max_key: str | None,
        min_key: str | None,
        ckpt_predicate: CheckpointPredicate | None,
        device: Device,
    ) -> Checkpoint | None:
        # The main process's decoded states wait here (they are not broadcast) for the others.
        held: list[_Prepared] = []

        def choose() -> Checkpoint | None:
            # Every process checks its own device when it loads (_verified_states), and the
            # processes agree on the outcome there.
            _check_device(device)
            return self._first_usable(
                importance_key,
                max_key,
                min_key,
                ckpt_predicate,
                lambda checkpoint: held.append(self._prepare(checkpoint, device)),
            )

        chosen = _main_decides(choose, f"recover a checkpoint from {self.checkpoints_dir}")
        if chosen is None:
            logger.info("no checkpoint to recover in %s", self.checkpoints_dir)
            return None
        self._load_collectively(chosen, device, prepared=held[0] if held else None)
        return chosen


def _finish_all(
    finishes: Iterable[tuple[str, Callable[[], CheckpointFile]]],
) -> dict[str, CheckpointFile]:
    """Run every file's finishing call (each closes its file, on failure too); their records.

    Raises:
        BaseException: the first failure, once every call has run.
    """
    records: dict[str, CheckpointFile] = {}
    failures: list[BaseException] = []
    for name, finish in finishes:
        try:
            records[name] = finish()
        except BaseException as error:
            failures.append(error)
    if failures:
        raise failures[0]
    return records


def added_after_load(checkpointer: Checkpointer) -> tuple[Checkpoint, tuple[str, ...]] | None:
    """The checkpoint ``checkpointer`` loaded last, and the recoverables registered since.

    Only those whose state that checkpoint holds, and only objects other than the one loaded
    under that name: their state was not loaded (a brain recovers in ``on_fit_start``, so a
    scheduler registered after ``super().on_fit_start()`` starts afresh). ``None`` when there
    are none.
    """
    if checkpointer._loaded is None or not checkpointer._added_after_load:
        return None
    return checkpointer._loaded, tuple(checkpointer._added_after_load)


def finish_background_commit(checkpointer: Checkpointer) -> BaseException | None:
    """Wait for ``checkpointer``'s commit in the background; return its failure, if any.

    Unlike :meth:`Checkpointer.wait` it is never collective (for a brain's ``fit`` that is
    failing: the other processes may not be failing with it).
    """
    checkpointer._settle()
    return work_for(checkpointer.checkpoints_dir).take_failure()


# ---------------------------------------------------------------------- several processes


def _collective() -> bool:
    """Whether a process group of more than one process is up: the methods are collective."""
    return is_distributed() and dist.get_world_size() > 1


def _describe(error: BaseException) -> str:
    """The error's type and message, with its notes (where it came from) for other processes."""
    notes = " ".join(getattr(error, "__notes__", ()))
    return f"{type(error).__name__}: {error}" + (f" {notes}" if notes else "")


def _broadcast(value: object) -> object:
    """``value`` from the main process (rank 0), on every process."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _main_decides(action: Callable[[], _T], what: str) -> _T:
    """Run ``action`` on the main process only and hand its result to every process.

    Without a process group it just runs ``action``. With one, the main process runs it and
    broadcasts the result, or that it failed (then it re-raises, and every other process raises
    :class:`CheckpointError` instead of waiting for a result that never comes).

    The main process starts ``action`` only once every process has called this (a broadcast
    alone would let it run ahead: a process still reading the folders it was shown could see
    them deleted by the main process's next call), and the broadcast comes after ``action`` is
    done, so no process returns before it.
    """
    if not _collective():
        return action()
    # An all-gather (not a broadcast) so the main process waits for every other one to arrive;
    # the same object collective as _agree, so it runs on whatever device the group uses.
    dist.all_gather_object([None] * dist.get_world_size(), None)
    if dist.get_rank() == 0:
        try:
            result = action()
        except BaseException as error:
            _broadcast((None, _describe(error)))
            raise
        _broadcast((result, None))
        return result
    # cast: the main process broadcast (result of action, None) or (None, message).
    shared, failure = cast(tuple[_T, str | None], _broadcast(None))
    if failure is not None:
        raise CheckpointError(f"the main process failed to {what}: {failure}")
    return shared


def _agree(failure: BaseException | None, what: str, token: str | None = None) -> None:
    """Tell every process whether this one failed; raise if another one did.

    Every process calls it at the same point (it is an all-gather, and so also a barrier). A
    process that failed returns (its caller re-raises its own error); the others raise
    :class:`CheckpointError` naming the processes that failed. With ``token``, all processes
    must pass the same one (the checkpoint they load, say), or all raise.
    """
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (token, None if failure is None else _describe(failure)))
    if failure is not None:
        return
    # cast: every process contributed a (token, message) pair.
    entries = cast(list[tuple[str | None, str | None]], gathered)
    failed = [(rank, message) for rank, (_, message) in enumerate(entries) if message is not None]
    if failed:
        listing = "; ".join(f"process {rank}: {message}" for rank, message in failed)
        raise CheckpointError(f"another process failed to {what} ({listing})")
    if len({entry_token for entry_token, _ in entries}) > 1:
        listing = "; ".join(f"process {rank}: {given}" for rank, (given, _) in enumerate(entries))
        raise CheckpointError(f"the processes disagree on what to {what} ({listing})")


@contextlib.contextmanager
def _noted(doing: str) -> Iterator[None]:
    """Add "(while <doing>)" to an exception raised from user code, keeping its type."""
    try:
        yield
    except Exception as error:
        error.add_note(f"(while {doing})")
        raise


def _checked_keep_policy(
    num_to_keep: object,
    importance_keys: object,
    max_keys: object,
    min_keys: object,
    ckpt_predicate: object,
) -> tuple[tuple[ImportanceKey, ...], tuple[str, ...], tuple[str, ...]]:
    """A keep policy's arguments checked: its importance keys, max keys and min keys as tuples.

    Raises:
        ConfigurationError: an argument is invalid; the message names it.
    """
    _check_num_to_keep(num_to_keep)
    _check_predicate(ckpt_predicate)
    return (
        _checked_importance_keys(importance_keys),
        _checked_key_names("max_keys", max_keys),
        _checked_key_names("min_keys", min_keys),
    )


def _check_num_to_keep(num_to_keep: object) -> None:
    if isinstance(num_to_keep, bool) or not isinstance(num_to_keep, int) or num_to_keep < 0:
        raise ConfigurationError(f"num_to_keep must be an integer >= 0, got {num_to_keep!r}")


def _checked_key_names(argument: str, keys: object) -> tuple[str, ...]:
    """``keys`` (``min_keys`` or ``max_keys``) as a tuple of meta keys, once it is one."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
        raise ConfigurationError(
            f"{argument} must be a list of meta keys (strings), got {keys!r}; for one key "
            f"write {argument}=[{keys!r}]"
        )
    names = tuple(keys)
    for key in names:
        if not isinstance(key, str):
            raise ConfigurationError(
                f"{argument} must be a list of meta keys (strings), got {key!r} in it"
            )
    return names


def _checked_importance_keys(keys: object) -> tuple[ImportanceKey, ...]:
    """``importance_keys`` as a tuple of functions, once it is a collection of them."""
    if isinstance(keys, str | bytes) or callable(keys) or not isinstance(keys, Iterable):
        raise ConfigurationError(
            "importance_keys must be a list of functions (Checkpoint -> float), got "
            f"{keys!r}; for one function write importance_keys=[function]"
        )
    functions = tuple(keys)
    for key in functions:
        if not callable(key):
            raise ConfigurationError(
                f"importance_keys must be a list of functions (Checkpoint -> float), got {key!r} "
                "in it"
            )
    return functions


def _describe_key(key: object) -> str:
    name = getattr(key, "__qualname__", None)
    return repr(name) if isinstance(name, str) else repr(key)


def _check_predicate(ckpt_predicate: object) -> None:
    if ckpt_predicate is not None and not callable(ckpt_predicate):
        raise ConfigurationError(
            f"ckpt_predicate must be a function (Checkpoint -> bool) or None, got "
            f"{ckpt_predicate!r}"
        )


def _check_checkpoint(argument: str, value: object) -> None:
    """Refuse a ``value`` of ``argument`` that is not a :class:`Checkpoint` (a path, say)."""
    if not isinstance(value, Checkpoint):
        raise ConfigurationError(
            f"{argument} must be a Checkpoint, such as find_checkpoint()'s result (or "
            f"verify_checkpoint(path) for a checkpoint folder), got {type(value).__name__} "
            f"{value!r}"
        )


def _check_rank_arguments(
    importance_key: object,
    max_key: object,
    min_key: object,
    max_num_checkpoints: object,
    ckpt_predicate: object,
) -> None:
    if sum(key is not None for key in (importance_key, max_key, min_key)) > 1:
        raise ConfigurationError(
            "give at most one of importance_key, max_key and min_key, got "
            f"importance_key={importance_key!r}, max_key={max_key!r}, min_key={min_key!r}"
        )
    _check_predicate(ckpt_predicate)
    if importance_key is not None and not callable(importance_key):
        raise ConfigurationError(
            f"importance_key must be a function (Checkpoint -> float) or None, got "
            f"{importance_key!r}"
        )
    for argument, key in (("max_key", max_key), ("min_key", min_key)):
        if key is not None and not isinstance(key, str):
            raise ConfigurationError(
                f"{argument} must be a meta key (a string) or None, got {key!r}"
            )
    if max_num_checkpoints is not None and (
        isinstance(max_num_checkpoints, bool)
        or not isinstance(max_num_checkpoints, int)
        or max_num_checkpoints < 0
    ):
        raise ConfigurationError(
            f"max_num_checkpoints must be an integer >= 0 or None, got {max_num_checkpoints!r}"
        )


def _rank(
    checkpoints: Sequence[Checkpoint],
    *,
    importance_key: ImportanceKey | None = None,
    max_key: str | None = None,
    min_key: str | None = None,
    ckpt_predicate: CheckpointPredicate | None = None,
    max_num_checkpoints: int | None = None,
    skip_non_numbers: bool = False,
) -> list[Checkpoint]:
    """The checkpoints ranked by one key, best first (see ``Checkpointer.find_checkpoints``).

    A NaN ranks last for every key, below the infinities. A ``max_key`` / ``min_key`` value
    that is not a number is a :class:`ConfigurationError`, or with ``skip_non_numbers`` leaves
    its checkpoint out with a :class:`CheckpointWarning`, so that one bad checkpoint does not
    block every later ranking.

    Raises:
        ConfigurationError: an argument is invalid, or an importance key returned something
            that is not a number; the message names it.
    """
    _check_rank_arguments(importance_key, max_key, min_key, max_num_checkpoints, ckpt_predicate)
    meta_key = max_key if max_key is not None else min_key
    key = importance_key if importance_key is not None else ckpt_recency
    scored: list[tuple[float, Checkpoint]] = []
    for checkpoint in checkpoints:
        if meta_key is not None and meta_key not in checkpoint.meta:
            continue
        if ckpt_predicate is not None and not ckpt_predicate(checkpoint):
            continue
        if meta_key is None:
            score = key(checkpoint)
            value = real_number(score)
            if value is None:
                raise ConfigurationError(
                    f"importance key {_describe_key(key)} returned {score!r} for checkpoint "
                    f"{checkpoint.path}, not a number"
                )
        else:
            raw = checkpoint.meta[meta_key]
            value = real_number(raw)
            if value is None:
                problem = (
                    f"checkpoint {checkpoint.path}: meta {meta_key!r} is {raw!r}, not a number"
                )
                if not skip_non_numbers:
                    raise ConfigurationError(problem)
                warn(
                    f"{problem}; it is left out of the ranking by {meta_key!r}",
                    CheckpointWarning,
                )
                continue
            if min_key is not None:
                value = -value
        scored.append((value, checkpoint))
    # Highest value first, NaN last; ties go to the most recent: the higher sequence number,
    # then (two checkpointers writing into one folder can give two the same) the later save.
    scored.sort(
        key=lambda pair: (
            not math.isnan(pair[0]),
            0.0 if math.isnan(pair[0]) else pair[0],
            pair[1].sequence,
            pair[1].unixtime,
            pair[1].path.name,
        ),
        reverse=True,
    )
    ranked = [checkpoint for _, checkpoint in scored]
    return ranked if max_num_checkpoints is None else ranked[:max_num_checkpoints]


def _loads_by_copying(obj: object) -> bool:
    """Whether ``obj`` is a module whose state may be loaded from a mapped file as it is.

    A module's ``load_state_dict`` copies what it is given into its parameters and buffers,
    so its file is memory-mapped rather than read (:func:`_decoded`): one copy of each tensor,
    where reading the file first makes two. Only modules whose parameters and buffers are all
    plain tensors (no DTensor, no lazy parameter, whose loading may keep what it is given);
    :func:`_unmap_kept` checks afterwards. Other states are read: an optimizer keeps the
    tensors it is given.
    """
    if not isinstance(obj, torch.nn.Module):
        return False
    held = itertools.chain(obj.parameters(), obj.buffers())
    return all(type(tensor) in (Tensor, torch.nn.Parameter) for tensor in held)


def _unmap_kept(name: str, module: torch.nn.Module, state: object) -> None:
    """Copy out any parameter or buffer of ``module`` still in the mapped file of ``state``.

    ``load_state_dict`` copies, unless the module's own loading code (an override of
    ``_load_from_state_dict``, a hook) kept a tensor it was given: that one gets memory of
    its own here, so no parameter or buffer reads a checkpoint file.
    """
    moved = copy_kept_out_of_file(module, file_storages(state))
    if moved:
        logger.debug(
            "recoverable %r kept %d tensors of its mapped state: copied out of the file",
            name,
            moved,
        )


def _warn_if_cast(
    checkpoint: Checkpoint, name: str, module: torch.nn.Module, state: Mapping[str, object]
) -> None:
    """Warn when ``module``'s ``load_state_dict`` will cast ``state``'s tensors to other dtypes.

    A module built in another precision than the one that saved it (another default dtype, a
    ``.double()`` left out) takes the values cast, silently: the run goes on, but not as the
    one that saved the checkpoint.
    """
    own = module.state_dict(keep_vars=True)
    cast_keys = [
        key
        for key, value in state.items()
        if isinstance(value, Tensor)
        and isinstance(own.get(key), Tensor)
        and value.dtype != own[key].dtype
    ]
    if cast_keys:
        first = cast_keys[0]
        saved = cast(Tensor, state[first]).dtype
        warn(
            f"recoverable {name!r} of checkpoint {checkpoint.path}: {len(cast_keys)} of its "
            f"tensors are loaded into tensors of another dtype and cast (first {first!r}: "
            f"{saved} into {own[first].dtype}), so the run does not go on exactly "
            "as the one that saved them; build the module in the precision it was saved in "
            "(the default dtype, .double()/.half()) to continue it exactly",
            ResumeWarning,
        )


def _for_layout(obj: object, state: dict[str, Any]) -> dict[str, Any]:
    """A loaded state, cut to the shards ``obj`` holds when it is FSDP2-sharded."""
    if not _collective():
        return state
    from typedbrain._sharded_state import sharded_for_optimizer, sharded_like  # see full_state

    if isinstance(obj, torch.optim.Optimizer):
        return sharded_for_optimizer(state, obj)
    return sharded_like(state, cast(Stateful, obj).state_dict())


_SHOWN_NAME: Final = 40
"""A name too long for the filesystem is quoted up to this many characters."""


def _check_name_length(what: str, name: str, suffix: str) -> None:
    """Refuse a name whose file name (``name`` + ``suffix``) no common filesystem accepts.

    Raises:
        ConfigurationError: the file name is longer than 255 bytes in UTF-8; the message
            names it.
    """
    size = name_bytes(f"{name}{suffix}")
    if size > MAX_FILE_NAME_BYTES:
        shown = f"{name[:_SHOWN_NAME]!r}... ({len(name)} characters)"
        named = f"its file name, <name>{suffix}," if suffix else "it"
        raise ConfigurationError(
            f"{what} {shown} is too long: {named} takes {size} bytes in UTF-8, more than the "
            f"{MAX_FILE_NAME_BYTES} a file name may have; choose a shorter name"
        )


def _superseded(
    checkpoints: Sequence[Checkpoint],
    keep: Checkpoint | None,
    ckpt_predicate: CheckpointPredicate | None,
) -> list[Checkpoint]:
    """The intra-epoch checkpoints that ``keep``, an end-of-epoch checkpoint, supersedes.

    Those are the checkpoints whose meta carries ``INTRA_EPOCH_CKPT_FLAG``, saved before
    ``keep`` (a lower sequence number, or the same one and an earlier commit), and accepted by
    ``ckpt_predicate`` when one is given. None when ``keep`` is ``None`` or not end-of-epoch.
    """
    if keep is None or not keep.end_of_epoch:
        return []
    return [
        checkpoint
        for checkpoint in checkpoints
        if INTRA_EPOCH_CKPT_FLAG in checkpoint.meta
        and checkpoint.path != keep.path
        and (checkpoint.sequence, checkpoint.unixtime) < (keep.sequence, keep.unixtime)
        and (ckpt_predicate is None or ckpt_predicate(checkpoint))
    ]


_NO_FOLDER_RENAME: Final = frozenset(
    {errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
)
"""``os.rename`` errors of a filesystem that cannot rename a folder (gcsfuse refuses to).

Not EPERM: on a local filesystem that is a sticky folder or an immutable flag, a refusal to
report, not a reason to delete in place."""

_DELETING: Final = ".deleting-"
"""A checkpoint folder being deleted is first renamed to a name that starts with this."""


class _PartlyDeletedError(Exception):
    """A deletion that failed after its folder was renamed aside (no checkpoint any more)."""

    def __init__(self, aside: Path, error: OSError) -> None:
        super().__init__(str(error))
        self.aside = aside
        self.error = error


def _try_delete(checkpoint: Checkpoint) -> bool:
    """Delete ``checkpoint``'s folder; if that fails, warn (naming it and why) and go on.

    Returns:
        Whether it is no checkpoint any more: deleted, or renamed aside for deletion and left
        for the next keep policy to finish.
    """
    try:
        _delete_folder(checkpoint)
    except _PartlyDeletedError as partly:
        error = partly.error
        warn(
            f"could not finish deleting checkpoint {checkpoint.path} ({type(error).__name__}: "
            f"{error}); it is no checkpoint any more: what is left of it is {partly.aside}, "
            "which the next keep policy removes. The other deletions went on",
            CheckpointWarning,
        )
        return True
    except (OSError, CheckpointError) as error:
        state = (
            "it is still a committed checkpoint"
            if (checkpoint.path / MANIFEST_NAME).exists()
            else "it is not a committed checkpoint"
        )
        warn(
            f"could not delete checkpoint {checkpoint.path} ({type(error).__name__}: {error}); "
            f"{state}, left on disk. The other deletions went on",
            CheckpointWarning,
        )
        return False
    return True


def _delete_folder(checkpoint: Checkpoint) -> None:
    """Delete ``checkpoint``'s folder, once it is sure the folder still holds that checkpoint.

    The folder is first renamed to a unique ``.deleting-...`` name in the same checkpoints
    folder (atomic: from then on it is not listed, so a deletion cut short never leaves a
    committed checkpoint with files missing), then its manifest is checked against
    ``checkpoint``: a folder replaced since it was ranked (the name given to a newer
    checkpoint) is renamed back and kept. Then it is removed.

    Raises:
        CheckpointError: the folder is a symbolic link, or no longer holds ``checkpoint``.
        OSError: it cannot be renamed (nothing changed).
        _PartlyDeletedError: removing it failed after the rename.
    """
    folder = checkpoint.path
    if folder.is_symlink():  # never delete a target through a link
        raise CheckpointError(f"refusing to delete {folder}: it is a symbolic link")
    token = secrets.token_hex(6)
    aside_name = f"{_DELETING}{token}-{folder.name}"
    if name_bytes(aside_name) > MAX_FILE_NAME_BYTES:
        aside_name = f"{_DELETING}{token}"
    aside = folder.parent / aside_name
    try:
        os.rename(folder, aside)
    except OSError as error:
        if error.errno not in _NO_FOLDER_RENAME:
            raise
        # A filesystem that cannot rename folders (some object-store mounts): checked, then
        # uncommitted in place first, so that a deletion cut short leaves no committed
        # checkpoint with files missing.
        if _identity(read_manifest(folder)) != _identity(checkpoint):
            raise _replaced_since_ranked(folder, "it is left as it is") from error
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
        sync_directory(folder)
        shutil.rmtree(folder)
        logger.debug("deleted checkpoint %s in place (%s)", folder, error.strerror)
        return
    try:
        found: Checkpoint | None = read_manifest(aside)
    except CheckpointError:
        found = None
    if found is None or _identity(found) != _identity(checkpoint):
        try:
            os.rename(aside, folder)
        except OSError as error:
            raise _replaced_since_ranked(
                folder, f"putting it back from {aside} failed ({error}): it is there now"
            ) from error
        raise _replaced_since_ranked(folder, "it is left as it is")
    try:
        (aside / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(aside)
    except OSError as error:
        raise _PartlyDeletedError(aside, error) from error
    logger.debug("deleted checkpoint %s", folder)


_MAX_RESCANS: Final = 3
"""How often one recovery scans the folder again after a candidate vanished while it loaded.

A writer's keep policy deletes a checkpoint only after committing its successor, so one rescan
normally settles it; the bound stops a folder that changes under every load from looping."""


def _gone_since_ranked(checkpoint: Checkpoint) -> str | None:
    """Why ``checkpoint``'s folder no longer holds it, if a writer deleted or replaced it.

    Called after loading it failed verification. Deleted meanwhile: the folder is gone (a
    deletion renames it aside, then removes it), or it is there without its manifest (a
    filesystem that cannot rename folders deletes in place, the manifest first: nothing else
    removes the manifest of a committed checkpoint). Replaced meanwhile: its manifest is that
    of another commit (a checkpoint saved under the same name since). Anything else (the
    same manifest with a file missing or changed, a manifest that is no longer valid, one that
    cannot be read) is not explained by a writer: ``None``, and it is damage as before.
    """
    manifest = checkpoint.path / MANIFEST_NAME
    try:
        os.lstat(manifest)
    except FileNotFoundError:
        try:
            os.lstat(checkpoint.path)
        except FileNotFoundError:
            return "its folder is gone"
        except OSError:
            return None
        return "its manifest is gone"
    except OSError:
        return None
    try:
        found = read_manifest(checkpoint.path)
    except CheckpointError:
        return None
    if _identity(found) != _identity(checkpoint):
        return "its folder holds another checkpoint now"
    return None


def _replaced_since_ranked(folder: Path, outcome: str) -> CheckpointError:
    """The error for a folder a keep policy meant to delete that now holds another checkpoint."""
    return CheckpointError(
        f"did not delete {folder}: it no longer holds the checkpoint that was ranked (its "
        f"manifest changed since: another checkpointer writes to this folder?); {outcome}"
    )


def _identity(checkpoint: Checkpoint) -> tuple[int, float, Mapping[str, CheckpointFile]]:
    """What tells two commits apart: the sequence, the commit time and every file's SHA-256.

    (Not the whole :class:`Checkpoint`: a NaN in its meta is unequal to itself.)
    """
    return checkpoint.sequence, checkpoint.unixtime, checkpoint.files


def _is_manifest_file(path: Path) -> bool:
    return path.name == MANIFEST_NAME and not path.is_symlink() and path.is_file()


def _remove_leftover(folder: Path) -> None:
    """Make way for a checkpoint named ``folder``, which exists: only if a crash left it.

    A save interrupted before its commit leaves a real folder holding nothing but regular files
    that a save writes (``<name>.ckpt`` files and the temporary manifest), and no manifest: such
    a folder is removed, file by file, with a warning. Anything else stays as it is: a
    committed checkpoint, a damaged manifest, a file, a link, or a folder holding anything else
    (a subfolder, another file: another checkpoints folder, a SpeechBrain checkpoint, your
    files). Nothing is removed until the whole folder has been checked.

    Raises:
        CheckpointError: ``folder`` is not such a leftover; the message names it and what is
            in the way.
    """
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(
            f"cannot save checkpoint {folder}: something that is not a checkpoint folder (a "
            "file or a link) has that name"
        )
    if (folder / MANIFEST_NAME).exists():
        raise CheckpointError(f"cannot save checkpoint {folder}: it exists")
    try:
        in_the_way = unexpected_entries(folder)
    except OSError as error:
        raise CheckpointError(
            f"cannot save checkpoint {folder}: a folder of that name exists and cannot be "
            f"listed ({error})"
        ) from error
    if in_the_way:
        raise CheckpointError(
            f"cannot save checkpoint {folder}: a folder of that name exists, and it is not "
            f"what an interrupted save leaves behind: it holds {describe_entries(in_the_way)}, "
            "which no save writes; nothing was written or deleted. Move the folder out of the "
            "way, or save under another name"
        )
    warn(
        f"removing {folder}: a save interrupted before its commit left it (it has no "
        f"{MANIFEST_NAME}, only files a save writes); a new checkpoint is saved under its name",
        CheckpointWarning,
    )
    # File by file, never recursively: a file that appeared since the check stops the
    # removal (the folder is then not empty) instead of being deleted unseen.
    try:
        for entry in folder.iterdir():
            if is_save_file(entry):
                entry.unlink()
        folder.rmdir()
    except OSError as error:
        raise CheckpointError(
            f"cannot save checkpoint {folder}: removing what an interrupted save left there "
            f"failed ({error})"
        ) from error


def _taken_state(obj: object) -> object:
    """``obj.state_dict()``; a mapping that is not a dict (a ``MappingProxyType``) as a dict.

    ``Stateful.state_dict`` may return any mapping; loading gives a dict whatever was saved,
    so a mapping is saved as the dict of its items (a dict, ``OrderedDict`` included, as it is).
    """
    state: object = cast(Stateful, obj).state_dict()
    if isinstance(state, Mapping) and not isinstance(state, dict):
        return dict(state)
    return state


def _check_loadable(name: str, state: object) -> None:
    """Refuse to save a state that loading would refuse: a checkpoint of it could never resume.

    Raises:
        CheckpointError: ``state`` is not a dict (what :func:`_taken_state` makes of a
            mapping), or holds something that ``torch.load(weights_only=True)`` does not
            unpickle; the message names the recoverable and where in the state it lies.
    """
    if not isinstance(state, dict):
        raise CheckpointError(
            f"recoverable {name!r}: its state_dict() returned a {type(state).__qualname__}, "
            "not a mapping; nothing was saved"
        )
    refused = refusal(state)
    if refused is not None:
        raise CheckpointError(
            f"recoverable {name!r}: {refused.where} is a {refused.kind} (state being what its "
            "state_dict() returned), which loading with weights_only=True refuses "
            f"({refused.reason}), so no checkpoint of it could be loaded; nothing was saved. "
            "Keep plain data (dicts, lists, tuples, numbers, strings) and tensors in the "
            "state, or allow a type you trust with torch.serialization.add_safe_globals"
        )


def _refused_state(
    checkpoint: Checkpoint, name: str, error: Exception, loaded: Sequence[str]
) -> str:
    """Why recoverable ``name`` of ``checkpoint`` did not load: ``error``, and where things stand.

    ``loaded`` are the recoverables that took their state before it (they keep it).
    """
    versions = (
        f"saved by typedbrain {checkpoint.typedbrain_version} with torch "
        f"{checkpoint.torch_version}; this is typedbrain {__version__} with torch "
        f"{torch.__version__}"
    )
    before = (
        "the recoverables loaded before it keep the checkpoint's state: "
        + ", ".join(map(repr, loaded))
        if loaded
        else "no recoverable was changed"
    )
    return (
        f"recoverable {name!r} did not take its state from {checkpoint.paramfiles[name]} "
        f"({versions}): {type(error).__name__}: {error} ({before})"
    )


def _verified_states(
    checkpoint: Checkpoint,
    names: Iterable[str],
    decode: Sequence[str],
    device: Device,
    *,
    keep_cpu: bool = False,
    hints: Mapping[str, str] | None = None,
    mapped: Collection[str] = (),
) -> dict[str, dict[str, Any]]:
    """Check the files of ``names`` against the manifest; return the decoded ``decode`` ones.

    ``device`` is where tensors are decoded (``map_location``); with ``keep_cpu``, only those
    saved from an accelerator go there (see :func:`_map_location`). ``hints`` (name -> why its
    file may not decode: its saver is custom, its loader the default) replace the error of an
    intact file that does not decode. The files of ``mapped`` (modules whose
    ``load_state_dict`` copies, see :func:`_loads_by_copying`) are decoded memory-mapped, and
    their tensors left in the mapping: their caller checks that nothing keeps them
    (:func:`_unmap_kept`).

    Sizes are checked first (a stat each), so a truncated file is never decoded. Then worker
    threads hash the files' pieces, in parallel, while this thread decodes those in ``decode``
    (``torch.load`` with ``weights_only=True``, which unpickles only plain data and tensors).
    Nothing is returned unless every piece's SHA-256 matches: a damaged file's decoded state is
    dropped unused. A file in ``decode`` is opened once, before its hashing starts, and its
    hash must come from that same file, and so must a mapping of it, so a file replaced
    meanwhile fails its check.

    Raises:
        ConfigurationError: ``device`` is not a device, or one this machine lacks.
        CorruptCheckpointError: a file fails its checks (the first in ``names`` order). This
            wins over a decoding error, which damage causes too.
        UnsafeCheckpointError: every file passed its checks, and one in ``decode`` (without a
            hint) holds objects that ``weights_only`` loading refuses.
        CheckpointError: every file passed its checks, and one in ``decode`` does not decode
            here: the file is intact, so the cause is this machine (a GPU checkpoint without a
            GPU, say), not damage, and the checkpoint must not be skipped as if it were damaged.
            Or one with a hint does not decode: the message gives the hint.
    """
    _check_device(device)
    names = list(names)
    if not names:
        return {}
    states: dict[str, dict[str, Any]] = {}
    with ExitStack() as files:
        streams: dict[str, IO[bytes]] = {}
        for name in names:
            if name in decode:
                streams[name] = files.enter_context(open_present(checkpoint, name))
            else:
                check_present(checkpoint, name)
        read_as = {name: os.fstat(stream.fileno()) for name, stream in streams.items()}
        tasks = piece_tasks(checkpoint, names)
        pool = files.enter_context(
            ThreadPoolExecutor(min(len(tasks), hash_workers()), "typedbrain-verify")
        )
        checks = [
            pool.submit(verify_piece, checkpoint, name, index, read_as.get(name))
            for name, index in tasks
        ]
        try:
            for name in decode:
                try:
                    path = checkpoint.paramfiles[name]
                    states[name] = _decode(
                        streams[name],
                        path,
                        device,
                        keep_cpu=keep_cpu,
                        hint=None if hints is None else hints.get(name),
                        mapped=name in mapped,
                    )
                except Exception:
                    # Damage makes files undecodable too: report it as such if it is.
                    for check in checks:
                        check.result()
                    raise
            for check in checks:
                check.result()
        except BaseException:
            for check in checks:
                check.cancel()
            # Drop what was decoded now: a mapped file would stay mapped (and open) for as
            # long as the error's traceback, which the failed futures keep in a cycle.
            states.clear()
            raise
    return states


def _decode(
    stream: IO[bytes],
    path: Path,
    device: Device,
    *,
    keep_cpu: bool = False,
    hint: str | None = None,
    mapped: bool = False,
) -> dict[str, Any]:
    """``torch.load`` the checkpoint file ``path``, open as ``stream``, with ``weights_only=True``.

    Plain data only. Its caller reports a checksum mismatch first: an error from here stands
    only for a file that is intact, so it is not a :class:`CorruptCheckpointError`. With a
    ``hint`` (the file was written by a custom saver and is read by the default loader), a
    file that does not decode raises a :class:`CheckpointError` giving it, rather than an
    :class:`UnsafeCheckpointError` that would call the saver's own file unsafe.
    """
    try:
        return _decoded(stream, path, device, keep_cpu=keep_cpu, mapped=mapped)
    except CheckpointError as error:
        if hint is None:
            raise
        cause = error.__cause__
        if isinstance(cause, pickle.UnpicklingError):
            detail = weights_only_reason(cause)
        elif cause is not None:
            detail = f"{type(cause).__name__}: {cause}"
        else:
            detail = str(error)
        raise CheckpointError(
            f"cannot load {path.name} of checkpoint {path.parent}: {hint}. (torch.load with "
            f"weights_only=True, which unpickles nothing but plain data and tensors, refused "
            f"the file: {detail})"
        ) from error


def _decoded(
    stream: IO[bytes], path: Path, device: Device, *, keep_cpu: bool, mapped: bool = False
) -> dict[str, Any]:
    """What :func:`_decode` does without a hint.

    With ``mapped``, a zip archive (what ``torch.save`` writes) is memory-mapped rather than
    read, for a module's ``load_state_dict`` to copy its tensors straight into its parameters
    (see :func:`_loads_by_copying`); its extra states (``get_extra_state``) are deep-copied out
    of the mapping here. ``torch.load`` maps it by ``path``, so the file mapped must be the one
    open as ``stream`` (whose hash is checked): one replaced or deleted meanwhile fails. A file
    that does not load mapped (a filesystem that cannot map files) is read instead.
    """
    if not (mapped and _is_zip(stream)):
        return _dict_state(_read_state(stream, path, device, keep_cpu=keep_cpu), path)
    try:
        state: object = torch.load(
            path,
            map_location=_map_location(device, keep_cpu=keep_cpu),
            weights_only=True,
            mmap=True,
        )
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(path, weights_only_reason(error)) from error
    except Exception:
        _check_same_file(stream, path)
        logger.debug("%s did not load memory-mapped: reading it", path, exc_info=True)
        stream.seek(0)
        return _decoded(stream, path, device, keep_cpu=keep_cpu)
    _check_same_file(stream, path)
    state = _dict_state(state, path)
    for key, value in state.items():
        if key.endswith(_EXTRA_STATE_SUFFIX):  # any object: handed over as it is
            state[key] = copy.deepcopy(value)
    return state


_EXTRA_STATE_SUFFIX: Final = "_extra_state"
"""How a module state dict names the entries of ``get_extra_state`` (``<prefix>_extra_state``)."""


def _read_state(stream: IO[bytes], path: Path, device: Device, *, keep_cpu: bool) -> object:
    """``torch.load`` the file open as ``stream`` (``path``), read, with ``weights_only=True``."""
    try:
        return torch.load(
            stream, map_location=_map_location(device, keep_cpu=keep_cpu), weights_only=True
        )
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(path, weights_only_reason(error)) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(
            f"cannot load {path.name} of checkpoint {path.parent} with device={device!r}: "
            f"{type(error).__name__}: {error} (its size and SHA-256 match the manifest: the "
            "file is intact, so this is not skipped as damage; if it holds tensors of a device "
            "this machine lacks, pass one it has as device=...)"
        ) from error
    except Exception as error:  # whatever torch.load makes of a file it did not write
        raise CheckpointError(
            f"cannot load {path.name} of checkpoint {path.parent}: {type(error).__name__}: "
            f"{error}; its size and SHA-256 match the manifest, so it was written so: not by "
            "torch.save (a custom save hook's file, read without its load hook?)"
        ) from error


def _dict_state(state: object, path: Path) -> dict[str, Any]:
    """``state``, a decoded file's content, once it is known to be a state dict."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"cannot load {path.name} of checkpoint {path.parent}: it holds a "
            f"{type(state).__name__}, not a state dict"
        )
    return state


_ZIP_MAGIC: Final = b"PK\x03\x04"
"""How a zip archive begins: ``torch.save``'s files do."""


def _is_zip(stream: IO[bytes]) -> bool:
    """Whether the file open as ``stream`` (at its start) is a zip archive; left at its start."""
    head = stream.read(len(_ZIP_MAGIC))
    stream.seek(0)
    return head == _ZIP_MAGIC


def _check_same_file(stream: IO[bytes], path: Path) -> None:
    """Refuse a mapping of ``path`` unless ``path`` is still the file open as ``stream``.

    Raises:
        CorruptCheckpointError: ``path`` was deleted or replaced since ``stream`` was opened
            (another process's keep policy, say), so what was mapped may not be what is hashed.
    """
    try:
        now = os.stat(path)
    except OSError:
        now = None
    if now is None or not os.path.samestat(now, os.fstat(stream.fileno())):
        raise CorruptCheckpointError(
            path.parent, f"the file {path.name} was deleted or replaced while it was being loaded"
        )


def _map_location(device: Device, *, keep_cpu: bool) -> MAP_LOCATION:
    """``torch.load``'s ``map_location`` for ``device``.

    With ``keep_cpu``, a tensor saved from the CPU stays there and only those saved from an
    accelerator go to ``device``: restoring a run puts every tensor where the run that saved
    it had it. (Loaded on the GPU, an optimizer's CPU step counts would come back on the GPU,
    which the run that saved them never did, and each step would then wait for the GPU.)
    """
    if device is None:
        return None
    target = torch.device(device)
    if target.type == "cpu":
        # torch restores CPU storages to "cpu" only: "cpu:0" would fail every tensor.
        return torch.device("cpu")
    if not keep_cpu:
        return target

    def place(storage: Storage, location: str) -> Storage:
        if location == "cpu":
            return storage
        placed: Storage = default_restore_location(storage, str(target))  # type: ignore[no-untyped-call]  # untyped in torch
        return placed

    return place


def _check_device(device: object) -> None:
    """Check ``device`` (a ``map_location``) before any file is read.

    Raises:
        ConfigurationError: ``device`` is not a device, or a CUDA device this machine lacks;
            the message names it.
    """
    if device is None:
        return
    if not isinstance(device, torch.device | str):
        raise ConfigurationError(
            f"device must be a torch.device, a string or None, got {device!r} "
            f"({type(device).__qualname__})"
        )
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ConfigurationError(f"device {device!r} is not a device: {error}") from None
    missing = missing_device(device)
    if missing is not None:
        raise ConfigurationError(f"device {device!r}: {missing}")


# The precision checkpoint averaging sums in, by whether the tensor is complex.
_SUM_DTYPE: Final = {False: torch.float64, True: torch.complex128}


def average_checkpoints(
    checkpoints: Sequence[Checkpoint], recoverable_name: str, device: Device = None
) -> dict[str, object]:
    """Average a module's parameters over several checkpoints (checkpoint averaging).

    Floating-point tensors are averaged (in float64, complex ones in complex128, then cast
    back to their dtype); the other entries (integer counters such as BatchNorm's
    ``num_batches_tracked``, and entries that are not tensors, such as a module's
    ``_extra_state``) are taken from the last checkpoint given. Load the result with
    ``module.load_state_dict``.

    Args:
        checkpoints: the checkpoints to average (each file is verified first).
        recoverable_name: the module's recoverable name.
        device: where to load the tensors.

    Returns:
        The averaged state dict: key -> tensor, or the last checkpoint's value for an entry
        that is not a tensor.

    Raises:
        CheckpointError: no checkpoint was given, one lacks ``recoverable_name``, the state
            dicts differ in keys, or in the shape or dtype of a tensor entry, or an entry is a
            tensor in one and not in another (the message names the checkpoint and key), or a
            verified file does not decode here.
        CorruptCheckpointError: a file fails verification.
        ConfigurationError: ``checkpoints`` is not a list of :class:`Checkpoint` (a path,
            say), or ``device`` is not a device, or one this machine lacks.
    """
    if isinstance(checkpoints, str | bytes | os.PathLike | Checkpoint) or not isinstance(
        checkpoints, Iterable
    ):
        raise ConfigurationError(
            "checkpoints must be a list of Checkpoint, such as find_checkpoints()' result, got "
            f"{type(checkpoints).__name__} {checkpoints!r}"
        )
    checkpoints = tuple(checkpoints)
    for checkpoint in checkpoints:
        _check_checkpoint("each of checkpoints", checkpoint)
    if not checkpoints:
        raise CheckpointError("average_checkpoints needs at least one checkpoint")
    sums: dict[str, Tensor] = {}
    result: dict[str, object] = {}
    reference: Checkpoint | None = None
    for checkpoint in checkpoints:
        if recoverable_name not in checkpoint.files:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} has no recoverable {recoverable_name!r}"
            )
        path = checkpoint.paramfiles[recoverable_name]
        state = _verified_states(checkpoint, [recoverable_name], [recoverable_name], device)[
            recoverable_name
        ]
        if reference is None:
            reference = checkpoint
            for key, value in state.items():
                result[key] = value
                if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
                    sums[key] = value.to(_SUM_DTYPE[value.is_complex()])
            continue
        if set(state) != set(result):
            difference = sorted(set(state) ^ set(result))
            raise CheckpointError(
                f"cannot average {path} with {reference.path}: their keys differ ({difference})"
            )
        for key, value in state.items():
            first = result[key]
            if isinstance(first, Tensor) != isinstance(value, Tensor) or (
                isinstance(first, Tensor)
                and isinstance(value, Tensor)
                and (value.shape != first.shape or value.dtype != first.dtype)
            ):
                raise CheckpointError(
                    f"cannot average {path} with {reference.path}: {key!r} is "
                    f"{_described_entry(value)} there and {_described_entry(first)} in the first"
                )
            if key in sums:
                sums[key] += cast(Tensor, value).to(sums[key].dtype)
            else:
                result[key] = value
    count = len(checkpoints)
    for key, total in sums.items():
        result[key] = (total / count).to(cast(Tensor, result[key]).dtype)
    return result


def _described_entry(value: object) -> str:
    """A state dict entry for a message: a tensor's dtype and shape, else its type."""
    if isinstance(value, Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return f"a {type(value).__name__}"

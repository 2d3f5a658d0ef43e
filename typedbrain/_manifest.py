"""The on-disk format of a checkpoint: its manifest, the file records, and how both are checked.

A checkpoint folder holds one ``<name>.ckpt`` file per recoverable and ``MANIFEST.json``. The
manifest is written last, to a temporary name, synced and renamed into place: a folder without
it is never a checkpoint (it is an interrupted save, or a folder of something else). It records
the size of every file and the SHA-256 of each of its pieces (:data:`PIECE_BYTES` each, so that
the pieces of a large file are checked in parallel), so a truncated or altered file is found
before anything is loaded from it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Final, TypeAlias, final

import attrs
import numpy as np
import torch

from typedbrain._errors import CheckpointError, ConfigurationError, CorruptCheckpointError
from typedbrain._files import NotAFileError, naming, naming_file, open_regular

__all__ = ["Checkpoint", "CheckpointFile", "JsonValue", "verify_checkpoint"]

JsonValue: TypeAlias = str | int | float | bool | list["JsonValue"] | dict[str, "JsonValue"] | None
"""What a checkpoint's ``meta`` may hold: JSON data (NaN and infinities included)."""

MANIFEST_NAME: Final = "MANIFEST.json"
_TEMP_MANIFEST_NAME: Final = ".MANIFEST.json.tmp"
FILE_SUFFIX: Final = ".ckpt"
"""The suffix of a recoverable's file: ``<name>.ckpt``."""
MAX_FILE_NAME_BYTES: Final = 255
"""The longest file name (in bytes) that common filesystems (ext4, XFS, APFS, NTFS) accept."""
INTRA_EPOCH_CKPT_FLAG: Final = "typedbrain_intra_epoch"
"""The meta key that marks an intra-epoch checkpoint (the brain saves it as ``True``)."""
_SPEECHBRAIN_META: Final = "CKPT.yaml"
"""The file that holds a SpeechBrain checkpoint's meta: a folder with it is one of theirs."""
_SHOWN_ENTRIES: Final = 5
"""An uncommitted folder's unexpected entries are named up to this many in a message."""
FORMAT: Final = "typedbrain-checkpoint"
FORMAT_VERSION: Final = 3
"""3: each file's SHA-256 is taken piece by piece. 2: one SHA-256 per file (still read)."""
READ_VERSIONS: Final = (2, 3)
"""The format versions this typedbrain loads: 2 differs from 3 only in its file records."""
PIECE_BYTES: Final = 16 << 20
"""A file is checksummed in pieces of this many bytes (the last one shorter), one SHA-256 each.

Pieces are hashed in parallel, on save and on load: one SHA-256 of a whole large file would
take one CPU longer than the rest of a load does (about 1.6 GB/s with SHA instructions). A file
no larger than a piece has a single SHA-256, which is that of the whole file (``sha256sum``)."""
DIGEST_KEY: Final = "manifest_sha256"
"""The manifest's key for the SHA-256 of the rest of it (see :func:`manifest_digest`)."""
_CHUNK: Final = 1 << 22
WRITE_BUFFER: Final = 1 << 20
"""The buffer of a checkpoint file's writer: torch.save's many small writes go out together."""
_HASH_ASIDE_MIN: Final = 1 << 20
"""Writes at least this large are hashed by other threads while they are written."""

_HASH_WORKERS: Final = 8
"""At most this many pieces of files are hashed at once, saving or loading (and no more than
the CPUs).

As many as there are CPUs, not one fewer: decoding (or writing) is mostly copying, and measured
on two CPUs two hashing threads next to the decoding one load faster than one."""
_SHA256_HEX_LENGTH: Final = 64
MAX_SEQUENCE: Final = 1 << 63
"""Sequence numbers are below this (a float holds them, for ranking by recency)."""
_SHOWN_MAX: Final = 80
"""A rejected manifest value is quoted up to this many characters in the reason."""
MAX_MANIFEST_BYTES: Final = 64 << 20
"""A manifest larger than this is not read (one lists a SHA-256 per 16 MiB of its files, about
4 KiB per GiB, and the user's meta): a file of endless bytes (``/dev/zero``) is not one."""


@final
@attrs.frozen
class CheckpointFile:
    """One file of a checkpoint, as its manifest records it.

    Attributes:
        file: the file's name inside the checkpoint folder (``<recoverable>.ckpt``).
        size: its size in bytes.
        sha256: the hex SHA-256 of each of its pieces, in order (see :func:`pieces`): one for
            an empty file or one no larger than ``piece_bytes``.
        piece_bytes: the size of its pieces (the last one may be shorter). A record of format
            version 2 has one SHA-256 for the whole file, and this is its size (1 if empty).
    """

    file: str
    size: int
    sha256: tuple[str, ...]
    piece_bytes: int


def hash_workers() -> int:
    """How many threads hash the pieces of checkpoint files: the CPUs, up to ``_HASH_WORKERS``."""
    return max(1, min(_HASH_WORKERS, os.cpu_count() or 1))


def piece_count(size: int, piece_bytes: int) -> int:
    """How many pieces a file of ``size`` bytes has: one if it is empty."""
    return max(1, -(-size // piece_bytes))


def piece_span(size: int, piece_bytes: int, index: int) -> tuple[int, int]:
    """The ``(offset, length)`` of piece ``index`` of a file of ``size`` bytes."""
    offset = index * piece_bytes
    return offset, max(0, min(piece_bytes, size - offset))


def piece_tasks(checkpoint: Checkpoint, names: Iterable[str]) -> list[tuple[str, int]]:
    """``(name, index)`` of every piece of the files of ``names``, for :func:`verify_piece`."""
    return [(name, index) for name in names for index in range(len(checkpoint.files[name].sha256))]


def pieces(size: int, piece_bytes: int) -> list[tuple[int, int]]:
    """The ``(offset, length)`` of each piece of a file of ``size`` bytes; one if it is empty."""
    return [piece_span(size, piece_bytes, index) for index in range(piece_count(size, piece_bytes))]


@final
@attrs.frozen
class Checkpoint:
    """A committed checkpoint folder, as read from its manifest.

    Listing checkpoints reads manifests only; the files' sizes and checksums are checked when the
    checkpoint is loaded (or by :func:`verify_checkpoint`).

    Attributes:
        path: the checkpoint folder.
        sequence: its commit number in its checkpoints folder: higher is more recent.
        unixtime: when it was committed (seconds since the epoch).
        end_of_epoch: whether it was saved at the end of an epoch (not mid-epoch).
        phase: the brain's phase when it was saved, if the checkpointer watched one.
        meta: the user's metadata (validation losses and the like), as JSON data.
        files: recoverable name -> the file record of its data.
        typedbrain_version: the typedbrain version that wrote it.
        torch_version: the torch version that wrote it.
    """

    path: Path
    sequence: int
    unixtime: float
    end_of_epoch: bool
    phase: str | None
    meta: Mapping[str, JsonValue] = attrs.field(hash=False)
    files: Mapping[str, CheckpointFile] = attrs.field(hash=False)
    typedbrain_version: str
    torch_version: str

    @property
    def paramfiles(self) -> dict[str, Path]:
        """Recoverable name -> the path of its file in this checkpoint."""
        return {name: self.path / record.file for name, record in self.files.items()}


# ----------------------------------------------------------------------------- meta validation


def to_json_meta(meta: Mapping[str, object] | None) -> dict[str, JsonValue]:
    """Copy ``meta`` as JSON data: 0-d tensors and NumPy scalars become Python numbers.

    Raises:
        ConfigurationError: a key is not a string or a value is not JSON data; the message names
            the meta key (and the position inside it).
    """
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise ConfigurationError(
            f"checkpoint meta must be a mapping of str to JSON data, got {type(meta).__name__}"
        )
    result: dict[str, JsonValue] = {}
    for key, value in meta.items():
        if not isinstance(key, str):
            raise ConfigurationError(f"checkpoint meta key {key!r} is not a string")
        result[key] = _to_json(value, key, repr(key))
    return result


def _to_json(value: object, key: str, where: str) -> JsonValue:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        try:
            repr(int(value))  # JSON holds it in decimal, which Python caps at so many digits
        except ValueError:
            raise ConfigurationError(
                f"checkpoint meta {key!r}: {where} is an integer of {value.bit_length()} bits, "
                "too long for Python to write or read as JSON"
            ) from None
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ConfigurationError(
                f"checkpoint meta {key!r}: {where} is a tensor of shape {tuple(value.shape)}; "
                "only 0-d tensors (scalars) are accepted, as Python numbers"
            )
        return _to_json(value.item(), key, where)
    if isinstance(value, np.generic | np.ndarray) and np.ndim(value) == 0:
        item: object = value.item()
        if isinstance(item, np.generic | np.ndarray):
            raise ConfigurationError(
                f"checkpoint meta {key!r}: {where} is a NumPy {value.dtype} value, not JSON data"
            )
        return _to_json(item, key, where)
    if isinstance(value, Mapping):
        converted: dict[str, JsonValue] = {}
        for inner_key, inner in value.items():
            if not isinstance(inner_key, str):
                raise ConfigurationError(
                    f"checkpoint meta {key!r}: {where} has the key {inner_key!r}, not a string"
                )
            converted[inner_key] = _to_json(inner, key, f"{where}[{inner_key!r}]")
        return converted
    if isinstance(value, list | tuple):
        return [_to_json(inner, key, f"{where}[{index}]") for index, inner in enumerate(value)]
    raise ConfigurationError(
        f"checkpoint meta {key!r}: {where} is a {type(value).__qualname__}, not JSON data "
        "(str, int, float, bool, None, lists and dicts of them, or a 0-d tensor / NumPy scalar)"
    )


# ----------------------------------------------------------------------------- writing


class HashingWriter:
    """A write-only binary stream that hashes and counts what passes through to ``raw``.

    ``torch.save`` writes to it, so the checksums cost no second read of the file. The bytes
    are hashed in pieces of ``piece_bytes`` (:data:`PIECE_BYTES`), one SHA-256 each. Given a
    ``hasher`` (an executor), each large write (a tensor's bytes) is hashed there, the parts
    of it that fall in different pieces in parallel, while this thread writes it: ``hashlib``
    and file writes both release the GIL. Every write returns only once its bytes are hashed,
    so the caller's buffer is never read later and each piece's hash sees its bytes in order.
    """

    def __init__(
        self, raw: IO[bytes], hasher: Executor | None = None, piece_bytes: int | None = None
    ) -> None:
        self._raw = raw
        self._hasher = hasher
        self._piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
        self._hashes = [hashlib.sha256()]
        self._filled = 0
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` to the underlying file, hashing it on the way."""
        view = memoryview(data).cast("B")
        parts = self._parts(view)
        if self._hasher is not None and view.nbytes >= _HASH_ASIDE_MIN:
            hashed = [self._hasher.submit(digest.update, part) for digest, part in parts]
            try:
                self._raw.write(view)
            finally:
                for done in hashed:
                    done.result()
        else:
            for digest, part in parts:
                digest.update(part)
            self._raw.write(view)
        self.size += view.nbytes
        return view.nbytes

    def _parts(self, view: memoryview) -> list[tuple[hashlib._Hash, memoryview]]:
        """Split ``view`` where pieces end: each part with the hash of the piece it falls in."""
        parts = []
        start = 0
        while start < view.nbytes:
            if self._filled == self._piece_bytes:
                self._hashes.append(hashlib.sha256())
                self._filled = 0
            count = min(self._piece_bytes - self._filled, view.nbytes - start)
            parts.append((self._hashes[-1], view[start : start + count]))
            self._filled += count
            start += count
        return parts

    def flush(self) -> None:
        """Flush the underlying file."""
        self._raw.flush()

    def record(self, file: str) -> CheckpointFile:
        """The record of what was written, under the name ``file``."""
        return CheckpointFile(
            file=file,
            size=self.size,
            sha256=tuple(digest.hexdigest() for digest in self._hashes),
            piece_bytes=self._piece_bytes,
        )


def sync_and_close(stream: IO[bytes], path: Path, record: CheckpointFile) -> CheckpointFile:
    """Flush ``stream`` (the file ``path``), sync it to disk and close it; return ``record``.

    Raises:
        OSError: flushing, syncing or closing failed (a full disk); it names ``path``.
    """
    with naming(path, "while writing and syncing the file"):
        try:
            stream.flush()
            os.fsync(stream.fileno())
        finally:
            stream.close()
    return record


def hash_file(path: Path, hasher: Executor | None = None) -> CheckpointFile:
    """Record ``path`` (size and SHA-256 of each piece) and sync it: for files written by hooks.

    The pieces are hashed in ``hasher``'s threads when given (see :func:`hash_pieces`).

    Raises:
        OSError: reading or syncing failed; it names ``path``.
        CheckpointError: the file changed size while it was hashed.
    """
    with naming(path, "while hashing the file a save hook wrote"):
        record = hash_pieces(path, hasher)
    return sync_file(path, record)


def hash_sync_and_close(stream: IO[bytes], path: Path, hasher: Executor) -> CheckpointFile:
    """Flush ``stream`` (the file ``path``), take its record, sync it and close it.

    For a file written without a :class:`HashingWriter`: it is read back (from the page cache,
    as a rule) and its pieces hashed in ``hasher``'s threads.

    Raises:
        OSError: flushing, reading, syncing or closing failed (a full disk); it names ``path``.
        CheckpointError: the file changed size while it was hashed.
    """
    with naming(path, "while hashing and syncing the file"):
        try:
            stream.flush()
            record = hash_pieces(path, hasher)
            os.fsync(stream.fileno())
        finally:
            stream.close()
    return record


def hash_pieces(path: Path, hasher: Executor | None) -> CheckpointFile:
    """Size and SHA-256 of each :data:`PIECE_BYTES` piece of the file ``path``.

    The pieces are hashed in parallel in ``hasher``'s threads, or one after the other without.

    Raises:
        OSError: the file cannot be read.
        CheckpointError: the file changed size while it was hashed (something else writes in
            the checkpoint folder).
    """
    if hasher is None:
        return hash_file_readonly(path)
    size = path.stat().st_size
    hash_piece = functools.partial(_hash_piece, path, size)
    try:
        done = [hasher.submit(hash_piece, index) for index in range(piece_count(size, PIECE_BYTES))]
    except RuntimeError:
        # The interpreter is exiting (a commit in the background finishing): executors take
        # no new work then, so this thread hashes the file itself.
        return hash_file_readonly(path)
    digests = tuple(piece.result() for piece in done)
    return CheckpointFile(file=path.name, size=size, sha256=digests, piece_bytes=PIECE_BYTES)


def _hash_piece(path: Path, size: int, index: int) -> str:
    """The SHA-256 of piece ``index`` of ``path``, a file of ``size`` bytes."""
    offset, length = piece_span(size, PIECE_BYTES, index)
    with path.open("rb", buffering=0) as stream:
        stream.seek(offset)
        count, sha256 = _hash_stream(stream, length)
        # A byte past the end: the file grew since its size was read.
        if count < length or (index == piece_count(size, PIECE_BYTES) - 1 and stream.read(1)):
            raise CheckpointError(f"the file {path} changed size while it was being hashed")
    return sha256


def sync_file(path: Path, record: CheckpointFile) -> CheckpointFile:
    """Sync the closed file ``path`` (written by a save hook) to disk; return ``record``.

    Raises:
        OSError: opening or syncing failed; it names ``path``.
    """
    with naming(path, "while syncing the file a save hook wrote"), path.open("rb") as stream:
        os.fsync(stream.fileno())
    return record


def sync_directory(path: Path) -> None:
    """Make the entries of the folder ``path`` (renames, new files) durable.

    Raises:
        OSError: the folder cannot be opened or synced; it names ``path``.
    """
    if os.name == "nt":  # pragma: no cover - Windows cannot open a folder to sync it
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        with naming(path, "while syncing the folder"):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def committed_already(checkpoint: Path, folder: Path) -> Iterator[None]:
    """Say so when syncing ``folder`` fails after ``checkpoint`` was committed.

    The manifest has been renamed into place: the checkpoint exists, and is not removed, but
    the rename may not survive a crash of the machine. The ``OSError`` raised keeps the type
    and errno of the original (its ``__cause__``) and names ``folder``.
    """
    try:
        yield
    except OSError as error:
        said = (
            f"checkpoint {checkpoint} is committed, but syncing the folder {folder} failed, "
            "so the commit may not survive a crash of the machine"
        )
        if error.errno is None:
            error.add_note(f"({said})")
            raise
        raise naming_file(error, folder, said) from error


def manifest_data(checkpoint: Checkpoint) -> dict[str, JsonValue]:
    """The JSON document that ``checkpoint``'s manifest holds."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sequence": checkpoint.sequence,
        "unixtime": checkpoint.unixtime,
        "end_of_epoch": checkpoint.end_of_epoch,
        "phase": checkpoint.phase,
        "typedbrain_version": checkpoint.typedbrain_version,
        "torch_version": checkpoint.torch_version,
        "meta": dict(checkpoint.meta),
        "files": {
            name: {
                "file": record.file,
                "size": record.size,
                "piece_bytes": record.piece_bytes,
                "sha256": list(record.sha256),
            }
            for name, record in checkpoint.files.items()
        },
    }


def manifest_digest(data: Mapping[str, object]) -> str:
    """The SHA-256 of a manifest's content but its own digest, written as canonical JSON.

    A manifest is checked against it when read, so that damage to the manifest itself (a
    flipped byte in a meta value or in the sequence number, which would still be valid JSON)
    is caught like damage to any other file of the checkpoint.
    """
    body = {key: value for key, value in data.items() if key != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_temp_manifest(folder: Path, text: str) -> Path:
    """Write the manifest ``text`` to a temporary file in ``folder``, synced; return its path."""
    temp = folder / _TEMP_MANIFEST_NAME
    with temp.open("w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    return temp


def commit_manifest(checkpoint: Checkpoint) -> None:
    """Commit ``checkpoint``: its manifest is renamed into place atomically, then synced.

    Every file of the checkpoint must already be written and synced.

    Raises:
        OSError: writing, syncing or renaming the manifest failed (it names the file, and
            says when the checkpoint is committed already: syncing the folder after the
            rename failed).
    """
    data = manifest_data(checkpoint)
    data[DIGEST_KEY] = manifest_digest(data)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    with naming(checkpoint.path / _TEMP_MANIFEST_NAME, "while writing the manifest"):
        temp = write_temp_manifest(checkpoint.path, text)
    os.replace(temp, checkpoint.path / MANIFEST_NAME)
    with committed_already(checkpoint.path, checkpoint.path):
        sync_directory(checkpoint.path)


# ----------------------------------------------------------------------------- reading


def is_plain_name(name: object) -> bool:
    """Whether ``name`` can name a file or folder directly inside another one (no path tricks)."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and not any(character in name for character in "/\\\0:")
        and Path(name).name == name
    )


def name_bytes(name: str) -> int:
    """How many bytes the file name ``name`` takes on disk (UTF-8; lone surrogates count 3)."""
    return len(name.encode("utf-8", "surrogatepass"))


def is_save_file(entry: Path) -> bool:
    """Whether ``entry`` is a file that a save writes into its folder before the commit.

    Those are the recoverables' ``<name>.ckpt`` files and the temporary manifest, all regular
    files (not links).
    """
    name = entry.name
    written = name == _TEMP_MANIFEST_NAME or (
        is_plain_name(name) and name.endswith(FILE_SUFFIX) and name != FILE_SUFFIX
    )
    return written and not entry.is_symlink() and entry.is_file()


def unexpected_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` that no save writes, described (``"the folder runs"``).

    An empty list means ``folder`` holds only what a save writes before its commit: it is what
    a save interrupted before its commit leaves behind.

    Raises:
        OSError: ``folder`` cannot be listed.
    """
    found: list[str] = []
    for entry in sorted(folder.iterdir()):
        if is_save_file(entry):
            continue
        if entry.is_symlink():
            found.append(f"the link {entry.name!r}")
        elif entry.is_dir():
            found.append(f"the folder {entry.name!r}")
        elif entry.is_file():
            found.append(f"the file {entry.name!r}")
        else:
            found.append(f"{entry.name!r} (not a regular file)")
    return found


def describe_entries(entries: list[str]) -> str:
    """``entries`` (from :func:`unexpected_entries`) as a phrase, naming the first few."""
    shown = ", ".join(entries[:_SHOWN_ENTRIES])
    rest = len(entries) - _SHOWN_ENTRIES
    return f"{shown} and {rest} more" if rest > 0 else shown


def describe_uncommitted(folder: Path) -> str:
    """Why the folder ``folder``, which has no manifest, is not a checkpoint: what it is.

    A SpeechBrain checkpoint (it holds ``CKPT.yaml``), a save interrupted before its commit (it
    holds only files a save writes), an empty folder, or some other folder (a logger's, say).
    """
    missing = f"no {MANIFEST_NAME}"
    try:
        if (folder / _SPEECHBRAIN_META).is_file():
            return (
                f"{missing}: it is a SpeechBrain checkpoint (it holds {_SPEECHBRAIN_META}), which "
                "typedbrain does not load"
            )
        entries = unexpected_entries(folder)
        empty = not entries and not any(folder.iterdir())
    except OSError as error:
        return f"{missing}, and its content cannot be listed: {error}"
    if empty:
        return (
            f"{missing}: an empty folder (a save interrupted before it wrote anything, or not "
            "a checkpoint folder)"
        )
    if not entries:
        return f"{missing}: the save was interrupted before its commit"
    return (
        f"{missing}: not a checkpoint folder (it holds {describe_entries(entries)}, which no "
        "save writes)"
    )


def unreadable(path: Path, error: OSError, what: str) -> CheckpointError:
    """The error for a file of a checkpoint that exists but cannot be read (``error``).

    A permission error, an I/O error or a stale network handle says nothing about the file's
    bytes: the checkpoint may be intact, so it is not damage (which recovery skips for an older
    checkpoint, and a keep policy would then delete). ``what`` says which file it is.
    """
    return CheckpointError(
        f"cannot read {path} ({what}): {type(error).__name__}: {error}. This is not damage "
        "(the file may well be intact), so the checkpoint is neither skipped nor deleted: "
        "fix the cause (permissions, the filesystem or its mount) and try again"
    )


def _require(condition: bool, folder: Path, reason: str) -> None:
    if not condition:
        raise CorruptCheckpointError(folder, f"{MANIFEST_NAME}: {reason}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    """Whether ``value`` is a finite number that a float holds (``10**400`` is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _bad(folder: Path, key: str, value: object) -> CorruptCheckpointError:
    shown = repr(value)
    if len(shown) > _SHOWN_MAX:
        shown = f"{shown[:_SHOWN_MAX]}... ({len(shown)} characters)"
    return CorruptCheckpointError(folder, f"{MANIFEST_NAME}: {key!r} is {shown}, not valid")


def read_manifest(folder: Path) -> Checkpoint:
    """Read the committed manifest of ``folder`` (its files are not checked here).

    Raises:
        CorruptCheckpointError: the manifest is missing (``reason`` then says what the folder
            seems to be: an interrupted save, a SpeechBrain checkpoint, another folder), not
            UTF-8 text, of another format or version, or malformed; ``reason`` says which.
        CheckpointError: the manifest exists but cannot be read (a permission error, an I/O
            error): that is not damage, and the message names the file and the OS error.
    """
    manifest = folder / MANIFEST_NAME
    try:
        with io.BufferedReader(open_regular(manifest, follow_links=True)) as stream:
            content = stream.read(MAX_MANIFEST_BYTES + 1)
        if len(content) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                folder, f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes"
            )
        text = content.decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise CorruptCheckpointError(folder, describe_uncommitted(folder)) from None
    except IsADirectoryError:
        raise CorruptCheckpointError(folder, f"{MANIFEST_NAME} is a folder, not a file") from None
    except NotAFileError as error:
        raise CorruptCheckpointError(folder, f"{MANIFEST_NAME} is {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise CorruptCheckpointError(folder, f"cannot read {MANIFEST_NAME}: {error}") from error
    except OSError as error:
        try:
            os.lstat(manifest)
        except PermissionError:
            # A folder this process cannot even look into (another user's, a disk's
            # lost+found): nothing says it holds a checkpoint, and it is skipped, as before.
            raise CorruptCheckpointError(
                folder, f"cannot look into the folder: {type(error).__name__}: {error}"
            ) from error
        except OSError:  # EIO, ESTALE: nothing says the folder is not a checkpoint
            pass
        raise unreadable(manifest, error, f"the manifest of checkpoint {folder}") from error
    try:
        data: object = json.loads(text)
    except json.JSONDecodeError as error:
        raise CorruptCheckpointError(folder, f"{MANIFEST_NAME} is not JSON: {error}") from error
    except (ValueError, RecursionError) as error:
        # JSON that Python will not build: an integer of thousands of digits (ValueError), or
        # arrays and objects nested thousands deep (RecursionError).
        raise CorruptCheckpointError(
            folder, f"{MANIFEST_NAME} cannot be read: {type(error).__name__}: {error}"
        ) from error
    _require(isinstance(data, dict), folder, "not a JSON object")
    assert isinstance(data, dict)
    _require(data.get("format") == FORMAT, folder, f"'format' is not {FORMAT!r}")
    version = data.get("format_version")
    _require(
        _is_int(version) and version in READ_VERSIONS,
        folder,
        f"format version {version!r} is not one this typedbrain reads "
        f"({', '.join(map(str, READ_VERSIONS))})",
    )
    digest = data.get(DIGEST_KEY)
    _require(isinstance(digest, str), folder, f"no {DIGEST_KEY!r}")
    _require(
        digest == manifest_digest(data),
        folder,
        f"it fails its own SHA-256 check ({DIGEST_KEY}: its bytes changed after the commit)",
    )
    sequence = data.get("sequence")
    unixtime = data.get("unixtime")
    end_of_epoch = data.get("end_of_epoch")
    phase = data.get("phase")
    meta = data.get("meta")
    files = data.get("files")
    typedbrain_version = data.get("typedbrain_version")
    torch_version = data.get("torch_version")
    if not (_is_int(sequence) and isinstance(sequence, int) and 0 <= sequence < MAX_SEQUENCE):
        raise _bad(folder, "sequence", sequence)
    if not (isinstance(unixtime, int | float) and _is_finite(unixtime)) or _is_bool(unixtime):
        raise _bad(folder, "unixtime", unixtime)
    if not isinstance(end_of_epoch, bool):
        raise _bad(folder, "end_of_epoch", end_of_epoch)
    if not (phase is None or isinstance(phase, str)):
        raise _bad(folder, "phase", phase)
    if not isinstance(meta, dict):
        raise _bad(folder, "meta", meta)
    if not isinstance(typedbrain_version, str):
        raise _bad(folder, "typedbrain_version", typedbrain_version)
    if not isinstance(torch_version, str):
        raise _bad(folder, "torch_version", torch_version)
    if not isinstance(files, dict):
        raise _bad(folder, "files", files)
    records: dict[str, CheckpointFile] = {}
    for name, entry in files.items():
        _require(isinstance(entry, dict), folder, f"the record of {name!r} is not an object")
        assert isinstance(entry, dict)
        records[name] = _file_record(folder, name, entry, version == 2)
    return Checkpoint(
        path=folder,
        sequence=sequence,
        unixtime=float(unixtime),
        end_of_epoch=end_of_epoch,
        phase=phase,
        meta=meta,
        files=records,
        typedbrain_version=typedbrain_version,
        torch_version=torch_version,
    )


def _file_record(
    folder: Path, name: str, entry: Mapping[str, object], whole_file: bool
) -> CheckpointFile:
    """The record of recoverable ``name`` in a manifest; ``whole_file``: format version 2."""
    file, size, sha256 = entry.get("file"), entry.get("size"), entry.get("sha256")
    if (
        not (isinstance(file, str) and is_plain_name(file))
        or name_bytes(file) > MAX_FILE_NAME_BYTES
    ):
        raise _bad(folder, f"files.{name}.file", file)
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        raise _bad(folder, f"files.{name}.size", size)
    if whole_file:
        if not _is_sha256(sha256):
            raise _bad(folder, f"files.{name}.sha256", sha256)
        assert isinstance(sha256, str)
        return CheckpointFile(file=file, size=size, sha256=(sha256,), piece_bytes=max(size, 1))
    piece_bytes = entry.get("piece_bytes")
    if not (isinstance(piece_bytes, int) and not isinstance(piece_bytes, bool)) or piece_bytes < 1:
        raise _bad(folder, f"files.{name}.piece_bytes", piece_bytes)
    count = piece_count(size, piece_bytes)  # arithmetic: a crafted size allocates nothing
    if not (isinstance(sha256, list) and len(sha256) == count and all(map(_is_sha256, sha256))):
        shown = _bad(folder, f"files.{name}.sha256", sha256).reason
        raise CorruptCheckpointError(
            folder, f"{shown} (it must list {count} SHA-256: one per piece of the file)"
        )
    return CheckpointFile(
        file=file, size=size, sha256=tuple(map(str, sha256)), piece_bytes=piece_bytes
    )


def _is_sha256(value: object) -> bool:
    """Whether ``value`` is a SHA-256 written as 64 lower-case hex digits."""
    return (
        isinstance(value, str)
        and len(value) == _SHA256_HEX_LENGTH
        and all(c in "0123456789abcdef" for c in value)
    )


def check_present(checkpoint: Checkpoint, name: str) -> Path:
    """The path of recoverable ``name``'s file, once its size matches the manifest (cheap: a stat).

    Raises:
        CorruptCheckpointError: the file is missing or of the wrong size; the error's ``path``
            is the checkpoint folder.
        CheckpointError: the file cannot be read (see :func:`unreadable`).
    """
    record = checkpoint.files[name]
    path = checkpoint.path / record.file
    with _reading(checkpoint, name):
        size = path.stat().st_size
    _check_size(checkpoint, name, record, size)
    return path


@contextlib.contextmanager
def _reading(checkpoint: Checkpoint, name: str) -> Iterator[None]:
    """Turn a missing file of recoverable ``name`` into a CorruptCheckpointError.

    Any other ``OSError`` (a permission error, EIO, ESTALE) is not damage: it becomes the
    :class:`CheckpointError` of :func:`unreadable`.
    """
    file = checkpoint.files[name].file
    try:
        yield
    except (FileNotFoundError, NotADirectoryError):
        raise CorruptCheckpointError(
            checkpoint.path, f"the file {file} (recoverable {name!r}) is missing"
        ) from None
    except IsADirectoryError:
        raise CorruptCheckpointError(
            checkpoint.path, f"the file {file} (recoverable {name!r}) is a folder"
        ) from None
    except NotAFileError as error:
        raise CorruptCheckpointError(
            checkpoint.path, f"the file {file} (recoverable {name!r}) is {error.strerror}"
        ) from None
    except OSError as error:
        raise unreadable(
            checkpoint.path / file, error, f"recoverable {name!r} of checkpoint {checkpoint.path}"
        ) from error


def open_present(checkpoint: Checkpoint, name: str) -> IO[bytes]:
    """Open recoverable ``name``'s file for reading, once its size matches the manifest.

    The size is that of the opened file (``fstat``), so it is the file the caller will read.

    Raises:
        CorruptCheckpointError: the file is missing or of the wrong size; the error's ``path``
            is the checkpoint folder.
        CheckpointError: the file cannot be read (see :func:`unreadable`).
    """
    record = checkpoint.files[name]
    with _reading(checkpoint, name):
        stream = io.BufferedReader(open_regular(checkpoint.path / record.file, follow_links=True))
        try:
            _check_size(checkpoint, name, record, os.fstat(stream.fileno()).st_size)
        except BaseException:
            stream.close()
            raise
    return stream


def verify_piece(
    checkpoint: Checkpoint, name: str, index: int, read_as: os.stat_result | None = None
) -> None:
    """Check piece ``index`` of recoverable ``name``'s file against the manifest's SHA-256.

    It opens the file and reads the piece in chunks into one buffer; run the pieces in worker
    threads, in parallel with each other and with decoding the file (``hashlib`` and reads
    release the GIL). Given ``read_as`` (the ``fstat`` of the handle the file is decoded
    from), the file hashed must be that same file: one replaced in between (renamed over, say)
    fails the check, so the bytes decoded are the bytes checked.

    Raises:
        CorruptCheckpointError: the file is missing, replaced since ``read_as``, of another
            size than the manifest's, or the piece's SHA-256 differs; the error's ``path`` is
            the checkpoint folder.
        CheckpointError: the file cannot be read (see :func:`unreadable`).
    """
    record = checkpoint.files[name]
    offset, length = piece_span(record.size, record.piece_bytes, index)
    path = checkpoint.path / record.file
    with _reading(checkpoint, name), open_regular(path, follow_links=True) as stream:
        status = os.fstat(stream.fileno())
        if read_as is not None and not os.path.samestat(read_as, status):
            raise CorruptCheckpointError(
                checkpoint.path,
                f"the file {record.file} (recoverable {name!r}) was replaced while it was "
                "being loaded",
            )
        _check_size(checkpoint, name, record, status.st_size)
        stream.seek(offset)
        count, sha256 = _hash_stream(stream, length)
    if count < length:  # shortened since its size was checked
        _check_size(checkpoint, name, record, offset + count)
    if sha256 != record.sha256[index]:
        raise CorruptCheckpointError(checkpoint.path, _failed_piece(record, name, index))


def _failed_piece(record: CheckpointFile, name: str, index: int) -> str:
    """Why the file of ``record`` is refused: piece ``index`` fails its SHA-256 check."""
    where = ""
    if len(record.sha256) > 1:
        offset, length = piece_span(record.size, record.piece_bytes, index)
        where = (
            f" in bytes {offset}-{offset + length - 1} (piece {index + 1} of {len(record.sha256)})"
        )
    return (
        f"the file {record.file} (recoverable {name!r}) fails its SHA-256 check{where} "
        "(its bytes changed after the commit)"
    )


def _check_size(checkpoint: Checkpoint, name: str, record: CheckpointFile, size: int) -> None:
    if size != record.size:
        raise CorruptCheckpointError(
            checkpoint.path,
            f"the file {record.file} (recoverable {name!r}) has {size} bytes, "
            f"the manifest says {record.size} (truncated or overwritten)",
        )


def verify_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Check a checkpoint folder completely: its manifest, then every file's size and SHA-256s.

    Nothing is loaded or unpickled. Use it to vet a folder before loading it, or from a script.

    Args:
        path: the checkpoint folder (``<checkpoints_dir>/CKPT+...``).

    Returns:
        The checkpoint, as its manifest describes it.

    Raises:
        CorruptCheckpointError: the folder is not a usable checkpoint; ``reason`` says why.
        CheckpointError: the manifest or a file exists but cannot be read (a permission error,
            an I/O error): not damage; the message names the file and the OS error.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CorruptCheckpointError(folder, "no such folder")
    checkpoint = read_manifest(folder)
    tasks = piece_tasks(checkpoint, checkpoint.files)
    if not tasks:
        return checkpoint
    with ThreadPoolExecutor(min(len(tasks), hash_workers()), "typedbrain-verify") as pool:
        checks = [pool.submit(verify_piece, checkpoint, name, index) for name, index in tasks]
        try:
            for check in checks:  # the first failure in the manifest's order is raised
                check.result()
        finally:
            for check in checks:
                check.cancel()
    return checkpoint


def hash_file_readonly(path: Path, piece_bytes: int | None = None) -> CheckpointFile:
    """Size and SHA-256 of each piece of ``path``, read in chunks into one reused buffer.

    The pieces are of ``piece_bytes`` (by default :data:`PIECE_BYTES`).
    """
    piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
    digests: list[str] = []
    size = 0
    with path.open("rb", buffering=0) as stream:
        while True:
            count, sha256 = _hash_stream(stream, piece_bytes)
            if count == 0 and digests:
                break
            digests.append(sha256)
            size += count
            if count < piece_bytes:
                break
    return CheckpointFile(file=path.name, size=size, sha256=tuple(digests), piece_bytes=piece_bytes)


def _hash_stream(stream: io.FileIO, limit: int) -> tuple[int, str]:
    """How many bytes ``stream`` has left up to ``limit``, and their hex SHA-256."""
    digest = hashlib.sha256()
    size = 0
    buffer = memoryview(bytearray(min(_CHUNK, max(limit, 1))))
    while size < limit and (count := stream.readinto(buffer[: min(len(buffer), limit - size)])):
        digest.update(buffer[:count])
        size += count
    return size, digest.hexdigest()

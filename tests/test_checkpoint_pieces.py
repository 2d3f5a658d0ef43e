"""Files are checksummed piece by piece; decoded states own their memory; format 2 still loads."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor

from tests.helpers import rewrite_manifest
from typedbrain import _checkpoint, _manifest
from typedbrain._checkpoint import Checkpoint, Checkpointer, verify_checkpoint
from typedbrain._errors import CheckpointError, CheckpointWarning, CorruptCheckpointError

_PIECE = 4096
"""A piece size small enough that a test model's file has several."""


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_manifest, "PIECE_BYTES", _PIECE)


def _two_checkpoints(folder: Path) -> tuple[Checkpoint, Checkpoint, Tensor]:
    """An older and a newer checkpoint of a model; the weight the older one holds."""
    model = torch.nn.Linear(64, 64)
    checkpointer = Checkpointer(folder, {"model": model})
    older = checkpointer.save_checkpoint()
    weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    return older, checkpointer.save_checkpoint(), weight


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.usefixtures("small_pieces")
def test_a_large_file_is_recorded_with_the_sha256_of_each_piece(tmp_path: Path) -> None:
    _, newer, _ = _two_checkpoints(tmp_path)
    record = newer.files["model"]
    data = newer.paramfiles["model"].read_bytes()
    assert record.piece_bytes == _PIECE
    assert len(record.sha256) == -(-len(data) // _PIECE) > 4
    assert record.sha256 == tuple(
        hashlib.sha256(data[start : start + _PIECE]).hexdigest()
        for start in range(0, len(data), _PIECE)
    )
    assert verify_checkpoint(newer.path) == newer


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("where", ["first byte", "end of a piece", "start of a piece", "last byte"])
def test_a_changed_byte_in_any_piece_is_found_and_its_bytes_named(
    tmp_path: Path, where: str
) -> None:
    older, newer, weight = _two_checkpoints(tmp_path)
    path = newer.paramfiles["model"]
    size = path.stat().st_size
    offset = {
        "first byte": 0,
        "end of a piece": 2 * _PIECE - 1,
        "start of a piece": 2 * _PIECE,
        "last byte": size - 1,
    }[where]
    _flip(path, offset)
    index = offset // _PIECE
    first, last = index * _PIECE, min(size, (index + 1) * _PIECE) - 1
    named = re.escape(
        f"fails its SHA-256 check in bytes {first}-{last} (piece {index + 1} of "
        f"{len(newer.files['model'].sha256)})"
    )

    with pytest.raises(CorruptCheckpointError, match=named):
        verify_checkpoint(newer.path)
    model = torch.nn.Linear(64, 64)
    with pytest.warns(CheckpointWarning, match=named):
        assert Checkpointer(tmp_path, {"model": model}).recover_if_possible() == older
    assert torch.equal(model.weight, weight)


@pytest.mark.usefixtures("small_pieces")
def test_each_piece_is_checked_by_a_task_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What lets the pieces of one large file be hashed on several CPUs at once.
    _, newer, _ = _two_checkpoints(tmp_path)
    checked: list[tuple[str, int]] = []
    real = _manifest.verify_piece

    def counting(
        checkpoint: Checkpoint, name: str, index: int, read_as: os.stat_result | None = None
    ) -> None:
        checked.append((name, index))
        real(checkpoint, name, index, read_as)

    monkeypatch.setattr(_checkpoint, "verify_piece", counting)
    Checkpointer(tmp_path, {"model": torch.nn.Linear(64, 64)}).load_checkpoint(newer)
    assert sorted(checked) == [("model", i) for i in range(len(newer.files["model"].sha256))]


def _as_format_2(checkpoint: Checkpoint) -> None:
    """Rewrite ``checkpoint``'s manifest as format version 2 wrote it: one SHA-256 per file."""

    def whole_files(data: dict[str, object]) -> None:
        data["format_version"] = 2
        files = data["files"]
        assert isinstance(files, dict)
        for name, entry in files.items():
            del entry["piece_bytes"]
            entry["sha256"] = hashlib.sha256(checkpoint.paramfiles[name].read_bytes()).hexdigest()

    rewrite_manifest(checkpoint.path, whole_files)


@pytest.mark.usefixtures("small_pieces")
def test_a_checkpoint_of_format_version_2_loads_and_is_checked_whole(tmp_path: Path) -> None:
    older, newer, weight = _two_checkpoints(tmp_path)
    newer_weight = torch.load(newer.paramfiles["model"], weights_only=True)["weight"]
    for checkpoint in (older, newer):
        _as_format_2(checkpoint)
    read = verify_checkpoint(newer.path)
    size = newer.paramfiles["model"].stat().st_size
    assert read.files["model"].piece_bytes == size
    assert len(read.files["model"].sha256) == 1

    model = torch.nn.Linear(64, 64)
    assert Checkpointer(tmp_path, {"model": model}).recover_if_possible() == read
    assert torch.equal(model.weight, newer_weight)

    _flip(newer.paramfiles["model"], size - 1)
    model = torch.nn.Linear(64, 64)
    message = r"model\.ckpt \(recoverable 'model'\) fails its SHA-256 check \(its bytes"
    with pytest.warns(CheckpointWarning, match=message):
        Checkpointer(tmp_path, {"model": model}).recover_if_possible()
    assert torch.equal(model.weight, weight)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            lambda entry: entry["sha256"].append("0" * 64),
            r"'files\.model\.sha256' is .* \(it must list 1 SHA-256: one per piece of the file\)",
        ),
        (lambda entry: entry.update(sha256=[]), r"it must list 1 SHA-256"),
        (lambda entry: entry.update(sha256=["0" * 63]), r"it must list 1 SHA-256"),
        (lambda entry: entry.update(piece_bytes=0), r"'files\.model\.piece_bytes' is 0"),
        (lambda entry: entry.update(piece_bytes=True), r"'files\.model\.piece_bytes' is True"),
        (lambda entry: entry.pop("piece_bytes"), r"'files\.model\.piece_bytes' is None"),
    ],
    ids=["a digest too many", "no digest", "short digest", "zero", "true", "missing"],
)
def test_a_manifest_whose_piece_records_do_not_fit_the_file_is_refused(
    tmp_path: Path, edit: Any, reason: str
) -> None:
    _, newer, _ = _two_checkpoints(tmp_path)

    def damage(data: dict[str, object]) -> None:
        files = data["files"]
        assert isinstance(files, dict)
        edit(files["model"])

    rewrite_manifest(newer.path, damage)
    with pytest.raises(CorruptCheckpointError, match=reason):
        verify_checkpoint(newer.path)


def test_a_loaded_optimizer_state_does_not_read_the_checkpoint_file(tmp_path: Path) -> None:
    # Decoding maps the file; the state handed on must not stay backed by it: Adam's
    # load_state_dict keeps the tensors it is given, so a file changed in place (or deleted)
    # afterwards would otherwise change the run's moments.
    model = torch.nn.Linear(32, 32)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    checkpoint = Checkpointer(tmp_path, {"model": model, "optimizer": optimizer}).save_checkpoint()
    expected = [state["exp_avg"].clone() for state in optimizer.state_dict()["state"].values()]

    fresh_model = torch.nn.Linear(32, 32)
    fresh = torch.optim.Adam(fresh_model.parameters())
    Checkpointer(tmp_path, {"model": fresh_model, "optimizer": fresh}).load_checkpoint(checkpoint)
    for path in checkpoint.paramfiles.values():
        with path.open("r+b") as stream:
            stream.write(bytes(path.stat().st_size))
    shutil.rmtree(checkpoint.path)

    loaded = [state["exp_avg"] for state in fresh.state_dict()["state"].values()]
    assert len(loaded) == len(expected) == 2
    for got, want in zip(loaded, expected, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(fresh_model.weight, model.weight)


class _Views:
    """A Stateful whose state holds a tensor, a view of it and the tensor again."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        base = torch.arange(6.0)
        return {"base": base, "view": base[2:5], "again": [base], "pair": (base, 1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def test_loaded_tensors_that_shared_a_storage_still_share_one(tmp_path: Path) -> None:
    checkpoint = Checkpointer(tmp_path, {"views": _Views()}).save_checkpoint()
    views = _Views()
    Checkpointer(tmp_path, {"views": views}).load_checkpoint(checkpoint)
    state = views.state
    assert torch.equal(state["view"], torch.tensor([2.0, 3.0, 4.0]))
    state["base"][3] = 30.0
    assert state["view"].tolist() == [2.0, 30.0, 4.0]
    assert state["again"][0][3].item() == 30.0
    assert state["pair"][0][3].item() == 30.0
    assert state["pair"][1] == 1


@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_a_file_replaced_or_deleted_before_it_is_mapped_is_refused(
    tmp_path: Path, change: str
) -> None:
    # torch maps the file by its path: the file mapped must be the one whose hash is checked.
    path = tmp_path / "model.ckpt"
    torch.save({"weight": torch.ones(3)}, path)
    with path.open("rb") as stream:
        if change == "replaced":
            torch.save({"weight": torch.zeros(3)}, tmp_path / "other.ckpt")
            os.replace(tmp_path / "other.ckpt", path)
        else:
            path.unlink()
        with pytest.raises(
            CorruptCheckpointError,
            match=r"the file model\.ckpt was deleted or replaced while it was being loaded",
        ):
            _checkpoint._decoded(stream, path, None, keep_cpu=False, mapped=True)


class _KeepsWhatItLoads(torch.nn.Module):
    """A module whose own loading code keeps the tensors it is given (``assign`` style)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(64, 64))
        self.register_buffer("scale", torch.zeros(64))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self.weight = torch.nn.Parameter(state_dict[prefix + "weight"])
        self.scale = state_dict[prefix + "scale"]


def _rewrite_in_place(checkpoint: Checkpoint) -> None:
    """Overwrite every file of ``checkpoint`` with zeros, in place, then delete the folder."""
    for path in checkpoint.paramfiles.values():
        with path.open("r+b") as stream:
            stream.write(bytes(path.stat().st_size))
    shutil.rmtree(checkpoint.path)


@pytest.mark.parametrize("module", ["plain", "keeps what it loads"])
def test_a_loaded_modules_parameters_and_buffers_do_not_read_the_checkpoint_file(
    tmp_path: Path, module: str
) -> None:
    saved = _KeepsWhatItLoads()
    with torch.no_grad():
        saved.weight.normal_()
        saved.scale.uniform_()
    checkpoint = Checkpointer(tmp_path, {"model": saved}).save_checkpoint()

    fresh: torch.nn.Module = torch.nn.Module() if module == "plain" else _KeepsWhatItLoads()
    if module == "plain":
        fresh.weight = torch.nn.Parameter(torch.zeros(64, 64))
        fresh.register_buffer("scale", torch.zeros(64))
    Checkpointer(tmp_path, {"model": fresh}).load_checkpoint(checkpoint)
    _rewrite_in_place(checkpoint)

    assert torch.equal(fresh.get_parameter("weight"), saved.weight)
    assert torch.equal(fresh.get_buffer("scale"), saved.scale)


def test_a_modules_file_is_mapped_and_an_optimizers_or_a_lazy_modules_file_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module's load_state_dict copies into its parameters: its file is mapped (one copy, not
    # a read and a copy). Adam keeps what it is given, and a lazy module's parameters are not
    # plain tensors: their files are read.
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    lazy = torch.nn.LazyLinear(3)
    lazy(torch.randn(2, 5))  # initialised now; its parameters are plain again
    uninitialised = torch.nn.LazyLinear(3)
    recoverables = {"model": model, "optimizer": optimizer, "lazy": lazy}
    checkpoint = Checkpointer(tmp_path, recoverables).save_checkpoint()
    decoded: dict[str, bool] = {}
    real = _checkpoint._decoded

    def recording(
        stream: Any, path: Path, device: Any, *, keep_cpu: bool, mapped: bool = False
    ) -> dict[str, Any]:
        decoded[path.name] = mapped
        return real(stream, path, device, keep_cpu=keep_cpu, mapped=mapped)

    monkeypatch.setattr(_checkpoint, "_decoded", recording)
    fresh_model = torch.nn.Linear(8, 8)
    fresh = {
        "model": fresh_model,
        "optimizer": torch.optim.Adam(fresh_model.parameters()),
        "lazy": uninitialised,
    }
    Checkpointer(tmp_path, fresh).load_checkpoint(checkpoint)
    assert decoded == {"model.ckpt": True, "optimizer.ckpt": False, "lazy.ckpt": False}
    assert torch.equal(fresh_model.weight, model.weight)
    assert torch.equal(uninitialised.weight, lazy.weight)


class _TableInExtraState(torch.nn.Module):
    """A module whose ``set_extra_state`` keeps the tensor it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.table = torch.zeros(256)

    def get_extra_state(self) -> dict[str, Any]:
        return {"table": self.table, "pair": _Pair(self.table[:2], 7)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.table = state["table"]
        self.pair = state["pair"]


class _Pair(NamedTuple):
    values: Tensor
    number: int


def test_a_modules_extra_state_does_not_read_the_checkpoint_file(tmp_path: Path) -> None:
    saved = _TableInExtraState()
    saved.table = torch.arange(256.0)
    fresh = _TableInExtraState()
    with torch.serialization.safe_globals([_Pair]):
        checkpoint = Checkpointer(tmp_path, {"model": saved}).save_checkpoint()
        Checkpointer(tmp_path, {"model": fresh}).load_checkpoint(checkpoint)
    _rewrite_in_place(checkpoint)
    assert torch.equal(fresh.table, torch.arange(256.0))
    assert isinstance(fresh.pair, _Pair)
    assert fresh.pair.values.tolist() == [0.0, 1.0]
    assert fresh.pair.number == 7


class _KeepsThenFails(_KeepsWhatItLoads):
    """Keeps the tensors it is given, then fails its load."""

    def _load_from_state_dict(self, *args: Any) -> None:
        super()._load_from_state_dict(*args)
        raise RuntimeError("refused after keeping")


def test_a_module_that_kept_tensors_and_then_failed_its_load_does_not_read_the_file(
    tmp_path: Path,
) -> None:
    saved = _KeepsWhatItLoads()
    with torch.no_grad():
        saved.weight.normal_()
    checkpoint = Checkpointer(tmp_path, {"model": saved}).save_checkpoint()
    fresh = _KeepsThenFails()
    with pytest.raises(CheckpointError, match="refused after keeping"):
        Checkpointer(tmp_path, {"model": fresh}).load_checkpoint(checkpoint)
    _rewrite_in_place(checkpoint)
    assert torch.equal(fresh.weight, saved.weight)


def test_a_file_that_does_not_load_mapped_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filesystem that cannot map files makes torch.load(mmap=True) fail: the file is read.
    model = torch.nn.Linear(4, 4)
    checkpoint = Checkpointer(tmp_path, {"model": model}).save_checkpoint()
    real = torch.load

    def no_mapping(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("mmap"):
            raise RuntimeError("unable to mmap 1234 bytes from file: No such device (19)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_mapping)
    fresh = torch.nn.Linear(4, 4)
    Checkpointer(tmp_path, {"model": fresh}).load_checkpoint(checkpoint)
    assert torch.equal(fresh.weight, model.weight)


class _Box:
    """An object of a class allowed with ``add_safe_globals``, holding a tensor."""

    def __init__(self, tensor: Tensor | None = None) -> None:
        self.tensor = tensor


class _OddExtraState(torch.nn.Module):
    """A module whose extra state holds what a copy storage by storage would get wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.kept: dict[str, Any] = {}

    def get_extra_state(self) -> dict[str, Any]:
        z = torch.tensor([1 + 2j, 3 - 1j])
        return {
            "conj": z.conj(),
            "neg": torch._neg_view(z),
            "grad": torch.ones(3, requires_grad=True),
            "named": _Pair(torch.full((2,), 3.0), 3),
            "box": _Box(torch.full((4,), 5.0)),
            "set": {torch.full((2,), 6.0)},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.kept = state


def test_an_extra_state_of_any_kind_is_copied_out_of_the_file_whole(tmp_path: Path) -> None:
    z = torch.tensor([1 + 2j, 3 - 1j])
    fresh = _OddExtraState()
    with torch.serialization.safe_globals([_Pair, _Box]):
        checkpoint = Checkpointer(tmp_path, {"model": _OddExtraState()}).save_checkpoint()
        Checkpointer(tmp_path, {"model": fresh}).load_checkpoint(checkpoint)
    _rewrite_in_place(checkpoint)
    kept = fresh.kept
    assert torch.equal(kept["conj"].resolve_conj(), z.conj().resolve_conj())
    assert torch.equal(kept["neg"].resolve_neg(), -z)
    assert kept["grad"].requires_grad
    assert kept["grad"].is_leaf
    assert torch.equal(kept["grad"].detach(), torch.ones(3))
    assert isinstance(kept["named"], _Pair)
    assert kept["named"].values.tolist() == [3.0, 3.0]
    assert isinstance(kept["box"], _Box)
    assert kept["box"].tensor is not None
    assert kept["box"].tensor.tolist() == [5.0] * 4
    [in_set] = kept["set"]
    assert in_set.tolist() == [6.0, 6.0]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_a_damaged_checkpoint_skipped_for_an_older_one_is_not_left_mapped(
    tmp_path: Path,
) -> None:
    older, newer, weight = _two_checkpoints(tmp_path)
    path = newer.paramfiles["model"]
    _flip(path, path.stat().st_size - 1)
    model = torch.nn.Linear(64, 64)
    with pytest.warns(CheckpointWarning, match="fails its SHA-256 check"):
        assert Checkpointer(tmp_path, {"model": model}).recover_if_possible() == older
    assert torch.equal(model.weight, weight)
    assert str(path) not in Path("/proc/self/maps").read_text()


def test_a_manifest_claiming_an_enormous_file_is_refused_at_once(tmp_path: Path) -> None:
    # Counting its pieces is arithmetic: nothing is built per piece before the check.
    _, newer, _ = _two_checkpoints(tmp_path)

    def enormous(data: dict[str, object]) -> None:
        files = data["files"]
        assert isinstance(files, dict)
        files["model"].update(size=10**18, piece_bytes=1)

    rewrite_manifest(newer.path, enormous)
    with pytest.raises(CorruptCheckpointError, match=r"it must list 10{18} SHA-256"):
        verify_checkpoint(newer.path)

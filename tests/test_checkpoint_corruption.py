"""Damaged, uncommitted and planted checkpoints are detected, named, skipped or refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest
import torch

from tests.helpers import rewrite_manifest
from typedbrain import _checkpoint, _manifest
from typedbrain._checkpoint import Checkpoint, Checkpointer, verify_checkpoint
from typedbrain._epochs import EpochCounter
from typedbrain._errors import (
    CheckpointError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from typedbrain._folder_lock import LOCK_NAME
from typedbrain._manifest import MAX_SEQUENCE


@attrs.define
class Saved:
    """Two checkpoints of one model: ``good`` (older) and ``newer``, with their weights."""

    good: Checkpoint
    newer: Checkpoint
    good_weight: torch.Tensor
    newer_weight: torch.Tensor


@pytest.fixture
def saved(tmp_path: Path) -> Saved:
    model = torch.nn.Linear(4, 4)
    checkpointer = Checkpointer(tmp_path, {"model": model, "counter": EpochCounter(5)})
    good = checkpointer.save_checkpoint(meta={"loss": 1.0})
    good_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.mul_(2.0)
    newer = checkpointer.save_checkpoint(meta={"loss": 0.5})
    return Saved(good, newer, good_weight, model.weight.detach().clone())


def _truncate(checkpoint: Checkpoint) -> None:
    path = checkpoint.paramfiles["model"]
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(checkpoint: Checkpoint) -> None:
    path = checkpoint.paramfiles["model"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _remove_manifest(checkpoint: Checkpoint) -> None:
    # What a crash between writing the files and committing leaves behind.
    (checkpoint.path / "MANIFEST.json").unlink()


def _remove_file(checkpoint: Checkpoint) -> None:
    checkpoint.paramfiles["model"].unlink()


def _garble_manifest(checkpoint: Checkpoint) -> None:
    manifest = checkpoint.path / "MANIFEST.json"
    manifest.write_text(manifest.read_text()[:40])


def _future_format(checkpoint: Checkpoint) -> None:
    manifest = checkpoint.path / "MANIFEST.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))


def _format_version_true(checkpoint: Checkpoint) -> None:
    # JSON's true, which Python compares equal to 1.
    manifest = checkpoint.path / "MANIFEST.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = True
    manifest.write_text(json.dumps(data))


def _escaping_file_name(checkpoint: Checkpoint) -> None:
    def escape(data: dict[str, object]) -> None:
        files = data["files"]
        assert isinstance(files, dict)
        files["model"]["file"] = "../../outside.ckpt"

    rewrite_manifest(checkpoint.path, escape)


def _changed_meta(checkpoint: Checkpoint) -> None:
    # Still valid JSON, the loss a little lower: only the manifest's own checksum tells.
    _edit_manifest_text(checkpoint, '"loss": 0.', '"loss": 1.')


def _edit_manifest_text(checkpoint: Checkpoint, old: str, new: str) -> None:
    manifest = checkpoint.path / "MANIFEST.json"
    text = manifest.read_text()
    assert old in text
    manifest.write_text(text.replace(old, new, 1))


def _huge_unixtime(checkpoint: Checkpoint) -> None:
    # Valid JSON, and a Python int, but beyond any float.
    rewrite_manifest(checkpoint.path, lambda data: data.update(unixtime=10**400))


def _huge_integer_in_meta(checkpoint: Checkpoint) -> None:
    # More digits than Python converts from a string (ValueError from json.loads).
    _edit_manifest_text(checkpoint, '"meta": {', '"meta": {"big": ' + "9" * 5000 + ", ")


def _deeply_nested_meta(checkpoint: Checkpoint) -> None:
    # Deeper than json.loads recurses (RecursionError).
    _edit_manifest_text(
        checkpoint, '"meta": {', '"meta": {"deep": ' + "[" * 100_000 + "]" * 100_000 + ", "
    )


DAMAGES: dict[str, tuple[Callable[[Checkpoint], None], str]] = {
    "truncated file": (_truncate, r"model\.ckpt \(recoverable 'model'\) has \d+ bytes"),
    "flipped byte": (_flip_byte, r"model\.ckpt \(recoverable 'model'\) fails its SHA-256"),
    "missing manifest": (_remove_manifest, "no MANIFEST.json: the save was interrupted"),
    "missing file": (_remove_file, r"model\.ckpt \(recoverable 'model'\) is missing"),
    "unparseable manifest": (_garble_manifest, "MANIFEST.json is not JSON"),
    "unknown format version": (_future_format, "format version 99"),
    "format version true": (_format_version_true, "format version True is not"),
    "file outside the folder": (_escaping_file_name, "'files.model.file'"),
    "changed meta in the manifest": (_changed_meta, "fails its own SHA-256 check"),
    "unixtime beyond the floats": (_huge_unixtime, r"'unixtime' is 10000.*\(401 characters\)"),
    "integer of 5000 digits": (_huge_integer_in_meta, "MANIFEST.json cannot be read: ValueError"),
    "nesting too deep": (_deeply_nested_meta, "MANIFEST.json cannot be read: RecursionError"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_recover_skips_a_damaged_checkpoint_with_a_warning_naming_it_and_loads_the_previous(
    saved: Saved, damage: str
) -> None:
    corrupt, reason = DAMAGES[damage]
    corrupt(saved.newer)
    model = torch.nn.Linear(4, 4)
    checkpointer = Checkpointer(
        saved.good.path.parent, {"model": model, "counter": EpochCounter(5)}
    )

    with pytest.warns(CheckpointWarning) as caught:
        recovered = checkpointer.recover_if_possible()

    assert recovered == saved.good
    assert torch.equal(model.weight, saved.good_weight)
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert any(str(saved.newer.path) in m and re.search(reason, m) for m in messages), messages
    # The damaged folder is left on disk for a person to look at.
    assert saved.newer.path.is_dir()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_verify_checkpoint_raises_the_reason(saved: Saved, damage: str) -> None:
    corrupt, reason = DAMAGES[damage]
    assert verify_checkpoint(saved.newer.path) == saved.newer
    corrupt(saved.newer)
    with pytest.raises(CorruptCheckpointError, match=reason) as caught:
        verify_checkpoint(saved.newer.path)
    assert caught.value.path == saved.newer.path
    assert verify_checkpoint(saved.good.path) == saved.good


@pytest.mark.parametrize("damage", ["truncated file", "flipped byte", "missing file"])
def test_loading_an_explicitly_given_damaged_checkpoint_raises_and_changes_nothing(
    saved: Saved, damage: str
) -> None:
    corrupt, reason = DAMAGES[damage]
    corrupt(saved.newer)
    model, counter = torch.nn.Linear(4, 4), EpochCounter(5)
    counter.current = 3
    before = model.weight.detach().clone()
    checkpointer = Checkpointer(saved.good.path.parent, {"counter": counter, "model": model})
    with pytest.raises(CorruptCheckpointError, match=reason):
        checkpointer.load_checkpoint(saved.newer)
    assert torch.equal(model.weight, before)
    assert counter.current == 3  # listed first, but not loaded: files are checked before any load


def _speechbrain_checkpoint(folder: Path) -> None:
    (folder / "CKPT.yaml").write_text("end-of-epoch: true\n")
    (folder / "model.ckpt").write_bytes(b"a SpeechBrain save")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            _speechbrain_checkpoint,
            "no MANIFEST.json: it is a SpeechBrain checkpoint (it holds CKPT.yaml), which "
            "typedbrain does not load",
        ),
        (
            lambda folder: (folder / "events.out.tfevents.1").write_bytes(b"x"),
            "no MANIFEST.json: not a checkpoint folder (it holds the file "
            "'events.out.tfevents.1', which no save writes)",
        ),
        (
            lambda folder: (folder / "plugins").mkdir(),
            "no MANIFEST.json: not a checkpoint folder (it holds the folder 'plugins', which no "
            "save writes)",
        ),
        (
            lambda folder: None,
            "no MANIFEST.json: an empty folder (a save interrupted before it wrote anything, or "
            "not a checkpoint folder)",
        ),
        (
            lambda folder: (folder / "model.ckpt").write_bytes(b"half"),
            "no MANIFEST.json: the save was interrupted before its commit",
        ),
    ],
    ids=["SpeechBrain checkpoint", "a logger's file", "a subfolder", "empty", "interrupted save"],
)
def test_a_folder_without_a_manifest_is_reported_as_what_it_is(
    tmp_path: Path, make: Callable[[Path], object], reason: str
) -> None:
    folder = tmp_path / "CKPT+2024-01-01+00-00-00+00"
    folder.mkdir()
    make(folder)
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1)})
    with pytest.warns(CheckpointWarning) as caught:
        assert checkpointer.recover_if_possible() is None
    assert [str(warning.message) for warning in caught] == [
        f"ignoring folder {folder}: {reason}; it is left on disk"
    ]
    with pytest.raises(CorruptCheckpointError) as raised:
        verify_checkpoint(folder)
    assert raised.value.reason == reason


def test_an_uncommitted_folder_is_reported_once_per_checkpointer_and_never_deleted(
    saved: Saved,
) -> None:
    _remove_manifest(saved.newer)
    checkpointer = Checkpointer(saved.good.path.parent, {"counter": EpochCounter(5)})
    with pytest.warns(CheckpointWarning, match="interrupted"):
        assert checkpointer.list_checkpoints() == [saved.good]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpointer.list_checkpoints()
        checkpointer.save_and_keep_only(num_to_keep=0)
    assert saved.newer.path.is_dir()
    assert not saved.good.path.exists()
    # A new checkpointer reports it again.
    with pytest.warns(CheckpointWarning, match=str(saved.newer.path.name).replace("+", r"\+")):
        Checkpointer(saved.good.path.parent).list_checkpoints()


def test_when_every_checkpoint_is_damaged_nothing_is_loaded(saved: Saved) -> None:
    _flip_byte(saved.newer)
    _truncate(saved.good)
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    checkpointer = Checkpointer(
        saved.good.path.parent, {"model": model, "counter": EpochCounter(5)}
    )
    with pytest.warns(CheckpointWarning):
        assert checkpointer.recover_if_possible() is None
    assert torch.equal(model.weight, before)


def test_recover_by_min_key_falls_back_to_the_next_best(saved: Saved) -> None:
    _flip_byte(saved.newer)  # the best loss (0.5)
    model = torch.nn.Linear(4, 4)
    checkpointer = Checkpointer(
        saved.good.path.parent, {"model": model, "counter": EpochCounter(5)}
    )
    with pytest.warns(CheckpointWarning, match="SHA-256"):
        assert checkpointer.recover_if_possible(min_key="loss") == saved.good
    assert torch.equal(model.weight, saved.good_weight)


# ---------------------------------------------------------------------------- security


def _write_marker(path: str) -> None:
    """What the planted payload would run on unpickling: harmless, but visible."""
    Path(path).write_text("the payload ran")


@attrs.define
class _Payload:
    marker: str

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (_write_marker, (self.marker,))


def _replant(checkpoint: Checkpoint, name: str, data: bytes) -> None:
    """Replace a file and re-commit the manifest with its matching size and checksum."""
    path = checkpoint.paramfiles[name]
    path.write_bytes(data)
    files = dict(checkpoint.files)
    files[name] = _manifest.hash_file_readonly(path)
    (checkpoint.path / "MANIFEST.json").unlink()
    _manifest.commit_manifest(attrs.evolve(checkpoint, files=files))


def test_the_payload_is_real(tmp_path: Path) -> None:
    # Negative control: plain unpickling of the planted bytes does run the payload.
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps({"weight": _Payload(str(marker))}))  # the control
    assert marker.read_text() == "the payload ran"


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_planted_pickle_with_a_valid_checksum_is_refused_and_never_runs(
    saved: Saved, tmp_path: Path, writer: str
) -> None:
    marker = tmp_path / "marker"
    payload = {"weight": _Payload(str(marker))}
    if writer == "pickle":
        data = pickle.dumps(payload, protocol=2)
    else:
        planted = tmp_path / "planted.pt"
        torch.save(payload, planted)
        data = planted.read_bytes()
    _replant(saved.newer, "model", data)
    assert verify_checkpoint(saved.newer.path).files["model"].size == len(data)
    model = torch.nn.Linear(4, 4)
    checkpointer = Checkpointer(
        saved.good.path.parent, {"model": model, "counter": EpochCounter(5)}
    )

    with pytest.raises(UnsafeCheckpointError) as caught:
        checkpointer.recover_if_possible()

    assert caught.value.path == saved.newer.paramfiles["model"]
    assert str(saved.newer.paramfiles["model"]) in str(caught.value)
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        checkpointer.load_checkpoint(verify_checkpoint(saved.newer.path))
    assert not marker.exists()


# ---------------------------------------------------------------------------- verify before load


class _Spy:
    """A Stateful that records every state handed to it."""

    def __init__(self) -> None:
        self.value = 1.0
        self.loaded: list[dict[str, object]] = []

    def state_dict(self) -> dict[str, object]:
        return {"value": torch.tensor([self.value] * 64)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.loaded.append(state)


def _replace_same_size(path: Path, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    data = path.read_bytes()
    assert data.count(old) == 1, "the bytes to replace must occur once"
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize(
    ("where", "old", "new"),
    [
        # Tensor bytes: the file still decodes; only its checksum tells.
        (
            "tensor data",
            torch.tensor([2.0] * 64).numpy().tobytes(),
            torch.tensor([3.0] * 64).numpy().tobytes(),
        ),
        # The pickle: the file no longer decodes under weights_only (an UnpicklingError, which
        # alone would read as a planted file); the checksum mismatch is the reason reported.
        ("pickle", b"collections\nOrderedDict", b"collections\nOrderedDicX"),
    ],
)
def test_a_damaged_later_file_of_the_same_size_leaves_every_recoverable_unchanged(
    tmp_path: Path, where: str, old: bytes, new: bytes
) -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    spy = _Spy()
    checkpointer = Checkpointer(tmp_path, {"model": model, "optimizer": optimizer, "spy": spy})
    good = checkpointer.save_checkpoint()
    good_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    spy.value = 2.0
    newer = checkpointer.save_checkpoint()
    file = newer.paramfiles["spy"]
    if where == "pickle":
        # torch.save writes the pickle of a plain dict without OrderedDict: use the module's.
        file = newer.paramfiles["model"]
    _replace_same_size(file, old, new)
    assert file.stat().st_size == newer.files[file.stem].size
    # Change the live objects so that any load from ``newer`` would show.
    with torch.no_grad():
        model.weight.fill_(7.0)
    weight_before = model.weight.detach().clone()
    optimizer_before = optimizer.state_dict()
    momentum_before = optimizer_before["state"][0]["momentum_buffer"].clone()

    with pytest.raises(CorruptCheckpointError, match="fails its SHA-256 check") as caught:
        checkpointer.load_checkpoint(newer)

    assert caught.value.path == newer.path
    assert torch.equal(model.weight, weight_before)
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], momentum_before)
    assert spy.loaded == []
    # recover_if_possible skips it with a warning (not an UnsafeCheckpointError) and loads the
    # previous checkpoint.
    with pytest.warns(CheckpointWarning, match="fails its SHA-256 check"):
        assert checkpointer.recover_if_possible() == good
    assert torch.equal(model.weight, good_weight)
    assert len(spy.loaded) == 1
    assert torch.equal(spy.loaded[0]["value"], torch.tensor([1.0] * 64))  # type: ignore[arg-type]


def test_a_truncated_file_is_reported_without_being_decoded(
    saved: Saved, monkeypatch: pytest.MonkeyPatch
) -> None:
    _truncate(saved.newer)
    loaded: list[object] = []
    real_load = torch.load

    def spy_load(*args: object, **kwargs: object) -> object:
        loaded.append(args[0])
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy_load)
    checkpointer = Checkpointer(
        saved.good.path.parent, {"model": torch.nn.Linear(4, 4), "counter": EpochCounter(5)}
    )
    with pytest.raises(CorruptCheckpointError, match=r"has \d+ bytes"):
        checkpointer.load_checkpoint(saved.newer)
    assert loaded == []


@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "left alone"])
def test_a_file_replaced_between_its_opening_and_its_hashing_is_refused(
    saved: Saved, monkeypatch: pytest.MonkeyPatch, replaced: bool
) -> None:
    # The loader opens the file it decodes before hashing starts. A copy renamed over it in
    # between (same bytes, so only the file's identity tells) must fail the check: the bytes
    # decoded would not be the bytes hashed.
    real_verify = _manifest.verify_piece

    def replace_then_verify(
        checkpoint: Checkpoint, name: str, index: int, read_as: os.stat_result | None = None
    ) -> None:
        path = checkpoint.path / checkpoint.files[name].file
        if replaced and name == "model" and index == 0:
            copy = path.with_name(path.name + ".copy")
            shutil.copyfile(path, copy)
            os.replace(copy, path)
        real_verify(checkpoint, name, index, read_as)

    monkeypatch.setattr(_checkpoint, "verify_piece", replace_then_verify)
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    checkpointer = Checkpointer(
        saved.good.path.parent, {"model": model, "counter": EpochCounter(5)}
    )
    if replaced:
        with pytest.raises(
            CorruptCheckpointError,
            match=r"the file model\.ckpt \(recoverable 'model'\) was replaced while it was "
            "being loaded",
        ):
            checkpointer.load_checkpoint(saved.newer)
        assert torch.equal(model.weight, before)
    else:
        checkpointer.load_checkpoint(saved.newer)
        assert torch.equal(model.weight, saved.newer_weight)


@pytest.mark.parametrize("piece_bytes", [None, 1 << 20, (3 << 20) + 7], ids=str)
def test_threaded_hashing_writer_records_the_files_size_and_sha256_of_each_piece(
    tmp_path: Path, piece_bytes: int | None
) -> None:
    # Writes of every size, some crossing one piece's end or several (hashed in parallel).
    path = tmp_path / "file"
    with (
        ThreadPoolExecutor(2) as hasher,
        path.open("wb") as raw,
    ):
        writer = _manifest.HashingWriter(raw, hasher, piece_bytes)
        for size in (3, 2 << 20, 10, 5 << 20, 1, (1 << 20) - 14, 7 << 20):
            writer.write(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        writer.flush()
    record = writer.record("file")
    data = path.read_bytes()
    step = _manifest.PIECE_BYTES if piece_bytes is None else piece_bytes
    assert record.size == len(data)
    assert record.piece_bytes == step
    assert record.sha256 == tuple(
        hashlib.sha256(data[start : start + step]).hexdigest()
        for start in range(0, len(data), step)
    )
    assert record == _manifest.hash_file_readonly(path, piece_bytes)


def test_saving_next_to_a_manifest_that_python_cannot_read_skips_it(saved: Saved) -> None:
    # The sequence number of a new checkpoint comes from every manifest in the folder.
    _huge_unixtime(saved.newer)
    checkpointer = Checkpointer(saved.good.path.parent, {"counter": EpochCounter(5)})
    with pytest.warns(CheckpointWarning, match="unixtime"):
        assert checkpointer.list_checkpoints() == [saved.good]
    assert checkpointer.save_checkpoint().sequence == saved.good.sequence + 1


# ---------------------------------------------------------------------------- intact, not loadable


def _save_as_if_on_a_gpu(checkpointer: Checkpointer, monkeypatch: pytest.MonkeyPatch) -> Checkpoint:
    """Save a checkpoint whose tensors are recorded on CUDA device 999, as a GPU machine would.

    No machine has that device, so loading it without ``device`` fails on every machine.
    """
    with monkeypatch.context() as patched:
        patched.setattr(torch.serialization, "location_tag", lambda storage: "cuda:999")
        return checkpointer.save_checkpoint(meta={"loss": 0.5})


def _a_checkpoint_then_one_from_a_gpu(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.nn.Linear, Checkpoint, Checkpoint]:
    """The saved model, an ordinary checkpoint, then a newer one recorded on a GPU."""
    model = torch.nn.Linear(4, 4)
    checkpointer = Checkpointer(folder, {"model": model, "counter": EpochCounter(5)})
    older = checkpointer.save_checkpoint(meta={"loss": 1.0})
    return model, older, _save_as_if_on_a_gpu(checkpointer, monkeypatch)


def test_an_intact_checkpoint_that_does_not_decode_here_stops_recovery_instead_of_being_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, older, newer = _a_checkpoint_then_one_from_a_gpu(tmp_path, monkeypatch)
    assert verify_checkpoint(newer.path) == newer  # intact: every checksum matches
    fresh = torch.nn.Linear(4, 4)
    before = fresh.weight.detach().clone()
    resumed = Checkpointer(tmp_path, {"model": fresh, "counter": EpochCounter(5)})

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping checkpoint" warning
        with pytest.raises(CheckpointError) as caught:
            resumed.recover_if_possible()

    assert not isinstance(caught.value, CorruptCheckpointError)
    message = str(caught.value)
    assert str(newer.path) in message
    assert "model.ckpt" in message
    assert "RuntimeError" in message  # torch's own words vary with the machine
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert torch.equal(fresh.weight, before)
    # Nothing was given up on: both checkpoints are still there, and a keep policy run after a
    # recovery that had fallen back to nothing would not have had them.
    assert resumed.list_checkpoints() == [older, newer]
    # The same from load_checkpoint, and with a min_key.
    with pytest.raises(CheckpointError, match=r"model\.ckpt") as again:
        resumed.load_checkpoint(newer)
    assert not isinstance(again.value, CorruptCheckpointError)
    with pytest.raises(CheckpointError, match=r"model\.ckpt"):
        resumed.recover_if_possible(min_key="loss")
    # Mapped to this machine, it loads.
    assert resumed.recover_if_possible(device="cpu") == newer
    assert torch.equal(fresh.weight, model.weight)


def test_a_damaged_file_that_would_not_decode_here_either_is_still_skipped_as_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, older, newer = _a_checkpoint_then_one_from_a_gpu(tmp_path, monkeypatch)
    _flip_byte(newer)
    resumed = Checkpointer(tmp_path, {"model": torch.nn.Linear(4, 4), "counter": EpochCounter(5)})
    with pytest.warns(CheckpointWarning, match="fails its SHA-256 check"):
        assert resumed.recover_if_possible() == older


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda:999", r"device 'cuda:999': this machine has \d+ CUDA device"),
        ("not-a-device", r"device 'not-a-device' is not a device"),
        (3.5, r"device must be a torch.device, a string or None, got 3.5"),
    ],
)
def test_a_device_that_cannot_be_used_is_refused_before_any_checkpoint_is_tried(
    saved: Saved, monkeypatch: pytest.MonkeyPatch, device: object, message: str
) -> None:
    loaded: list[object] = []
    real_load = torch.load

    def spy_load(*args: object, **kwargs: object) -> object:
        loaded.append(args[0])
        return real_load(*args, **kwargs)  # type: ignore[arg-type]  # passed through unchanged

    monkeypatch.setattr(torch, "load", spy_load)
    checkpointer = Checkpointer(
        saved.good.path.parent, {"model": torch.nn.Linear(4, 4), "counter": EpochCounter(5)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigurationError, match=message):
            checkpointer.recover_if_possible(device=device)  # type: ignore[arg-type]  # wrong on purpose
        with pytest.raises(ConfigurationError, match=message):
            checkpointer.load_checkpoint(saved.newer, device=device)  # type: ignore[arg-type]  # wrong on purpose
    assert loaded == []
    assert checkpointer.list_checkpoints() == [saved.good, saved.newer]


# ---------------------------------------------------------------------------- links


def test_a_link_to_a_checkpoint_folder_is_not_listed_and_nothing_is_deleted_through_it(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(5)})
    first = checkpointer.save_checkpoint(name="e1")
    os.symlink("e1", tmp_path / "best")
    assert checkpointer.list_checkpoints() == [first]

    checkpointer.save_and_keep_only(name="e2")

    assert sorted(entry.name for entry in tmp_path.iterdir()) == [LOCK_NAME, "best", "e2"]
    assert (tmp_path / "best").is_symlink()
    assert [c.path.name for c in checkpointer.list_checkpoints()] == ["e2"]


def test_a_link_to_a_checkpoint_folder_is_never_deleted_through(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(5)})
    first = checkpointer.save_checkpoint(name="e1")
    os.symlink("e1", tmp_path / "best")

    # A policy that would delete the link's checkpoint (and only it), were it one.
    deleted = checkpointer.delete_checkpoints(
        num_to_keep=0, ckpt_predicate=lambda checkpoint: checkpoint.path.name == "best"
    )

    assert deleted == []
    assert verify_checkpoint(first.path) == first
    assert (tmp_path / "best").is_symlink()


@pytest.mark.parametrize(
    ("sequence", "shown"),
    [(-1, "-1"), (True, "True"), ("2", "'2'"), (2.0, "2.0"), (MAX_SEQUENCE, str(MAX_SEQUENCE))],
)
def test_a_manifest_whose_sequence_number_is_not_valid_is_refused_and_skipped(
    tmp_path: Path, sequence: object, shown: str
) -> None:
    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(tmp_path, {"model": model})
    good = checkpointer.save_checkpoint()
    newer = checkpointer.save_checkpoint()
    rewrite_manifest(newer.path, lambda data: data.update(sequence=sequence))
    reason = f"'sequence' is {shown}, not valid"
    with pytest.raises(CorruptCheckpointError, match=reason):
        verify_checkpoint(newer.path)
    with pytest.warns(CheckpointWarning, match=reason):
        assert Checkpointer(tmp_path, {"model": model}).recover_if_possible() == good

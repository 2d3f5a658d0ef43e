"""Recovery next to a writer whose keep policy deletes checkpoints while they are being loaded.

(And, at the end, the command line's ``[newest]`` mark next to a checkpoint recovery stops at.)

Recovering takes no lock: an evaluation may read the checkpoints of a run that trains. A folder
that the writer deletes (or replaces) between the reader's scan and its load is not damage: the
writer committed a successor first, so the reader scans again and loads that one, saying so at
INFO rather than warning. Each test makes the rotation happen at one exact point: the reader's
``load_checkpoint`` is wrapped so that, before it reads a candidate, a second checkpointer (the
writer, in this process) saves and deletes through its own code, or a test removes files by
hand the way a deletion leaves them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import refuse_opening
from typedbrain._checkpoint import _MAX_RESCANS, Checkpoint, Checkpointer
from typedbrain._cli import main
from typedbrain._errors import CheckpointError, CheckpointWarning, CorruptCheckpointError
from typedbrain._manifest import MANIFEST_NAME

RESCAN_MESSAGE = "was deleted or replaced while it was being loaded"

Rotation = Callable[[Checkpoint, int], None]
"""Runs before the reader's ``load_checkpoint`` reads a candidate: (candidate, call number)."""


def _model(weight: float) -> torch.nn.Linear:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(weight)
    return model


def _weight(model: torch.nn.Linear) -> float:
    return float(model.weight.item())


class _Writer:
    """The training run: a checkpointer of its own model, saving checkpoints of a given weight."""

    def __init__(self, folder: Path) -> None:
        self.model = _model(0.0)
        self.checkpointer = Checkpointer(folder, {"model": self.model})

    def save(
        self, weight: float, *, meta: dict[str, object] | None = None, name: str | None = None
    ) -> Checkpoint:
        with torch.no_grad():
            self.model.weight.fill_(weight)
        return self.checkpointer.save_checkpoint(meta=meta, name=name)

    def delete(self, checkpoint: Checkpoint) -> None:
        """Delete ``checkpoint`` with the keep policy's own code (renamed aside, then removed)."""
        deleted = self.checkpointer.delete_checkpoints(
            num_to_keep=0, ckpt_predicate=lambda found: found.path == checkpoint.path
        )
        assert [found.path for found in deleted] == [checkpoint.path]
        assert not checkpoint.path.exists()


def _rotate_on_load(
    monkeypatch: pytest.MonkeyPatch, reader: Checkpointer, rotation: Rotation
) -> list[Path]:
    """Run ``rotation`` before each load of ``reader``; return the folders it was asked to load."""
    calls: list[Path] = []
    original = reader.load_checkpoint

    def load(checkpoint: Checkpoint, device: torch.device | str | None = None) -> None:
        calls.append(checkpoint.path)
        rotation(checkpoint, len(calls))
        original(checkpoint, device=device)

    monkeypatch.setattr(reader, "load_checkpoint", load)
    return calls


def _recover_while_rotating(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reader: Checkpointer,
    rotation: Rotation,
    max_key: str | None = None,
) -> tuple[Checkpoint | None, list[Path]]:
    """``reader.recover_if_possible(max_key=...)``, ``rotation`` before each load, INFO captured.

    Returns what it recovered and the folders it was asked to load, in order.
    """
    calls = _rotate_on_load(monkeypatch, reader, rotation)
    with caplog.at_level(logging.INFO, logger="typedbrain._checkpoint"):
        return reader.recover_if_possible(max_key=max_key), calls


@pytest.fixture
def caught() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        yield recorded


def _messages(recorded: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in recorded if issubclass(w.category, CheckpointWarning)]


def _rescans(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.INFO and RESCAN_MESSAGE in record.getMessage()
    ]


def test_a_checkpoint_the_keep_policy_deletes_while_it_loads_gives_way_to_its_successor(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    caught: list[warnings.WarningMessage],
) -> None:
    writer = _Writer(tmp_path)
    older = writer.save(1.0)
    newer = writer.save(2.0)
    model = _model(0.0)
    reader = Checkpointer(tmp_path, {"model": model})
    successor: list[Checkpoint] = []

    def rotate(checkpoint: Checkpoint, call: int) -> None:
        if call == 1:
            # save_and_keep_only commits the successor first, then deletes both older ones.
            with torch.no_grad():
                writer.model.weight.fill_(3.0)
            successor.append(writer.checkpointer.save_and_keep_only(num_to_keep=1))
            assert not newer.path.exists()
            assert not older.path.exists()

    recovered, calls = _recover_while_rotating(monkeypatch, caplog, reader, rotate)

    assert recovered == successor[0]
    assert _weight(model) == 3.0
    assert calls == [newer.path, successor[0].path]
    assert _messages(caught) == []
    [said] = _rescans(caplog)
    assert str(newer.path) in said
    assert "its folder is gone" in said
    # A caller that names the checkpoint still gets the error: it asked for that folder.
    monkeypatch.undo()
    with pytest.raises(CorruptCheckpointError, match="is missing"):
        reader.load_checkpoint(newer)


def test_a_deletion_in_place_cut_short_is_not_taken_for_damage(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    caught: list[warnings.WarningMessage],
) -> None:
    # A filesystem that cannot rename folders deletes in place: the manifest first, then the
    # files; the folder is still there, without its manifest, when the reader looks again.
    writer = _Writer(tmp_path)
    writer.save(1.0)
    newer = writer.save(2.0)
    model = _model(0.0)
    reader = Checkpointer(tmp_path, {"model": model})
    successor: list[Checkpoint] = []

    def rotate(checkpoint: Checkpoint, call: int) -> None:
        if call == 1:
            successor.append(writer.save(3.0))
            (newer.path / MANIFEST_NAME).unlink()
            for file in newer.paramfiles.values():
                file.unlink()

    recovered, calls = _recover_while_rotating(monkeypatch, caplog, reader, rotate)

    assert recovered == successor[0]
    assert _weight(model) == 3.0
    assert calls == [newer.path, successor[0].path]
    # Not "skipping checkpoint", and the rescan does not call the folder an interrupted save.
    assert _messages(caught) == []
    [said] = _rescans(caplog)
    assert "its manifest is gone" in said


def test_a_checkpoint_replaced_under_its_name_gives_way_to_the_new_commit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    caught: list[warnings.WarningMessage],
) -> None:
    writer = _Writer(tmp_path)
    first = writer.save(1.0, name="best")
    model = _model(0.0)
    reader = Checkpointer(tmp_path, {"model": model})
    replacement: list[Checkpoint] = []

    def rotate(checkpoint: Checkpoint, call: int) -> None:
        if call == 1:
            writer.delete(first)
            replacement.append(writer.save(5.0, name="best"))

    recovered, calls = _recover_while_rotating(monkeypatch, caplog, reader, rotate)

    assert recovered == replacement[0]
    assert _weight(model) == 5.0
    assert calls == [first.path, first.path]
    assert _messages(caught) == []
    [said] = _rescans(caplog)
    assert "holds another checkpoint now" in said


def test_a_damaged_folder_still_warns_once_and_is_left_out_of_the_rescan(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    caught: list[warnings.WarningMessage],
) -> None:
    writer = _Writer(tmp_path)
    middling = writer.save(1.0, meta={"score": 5.0})
    damaged = writer.save(2.0, meta={"score": 10.0})
    file = damaged.paramfiles["model"]
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    model = _model(0.0)
    reader = Checkpointer(tmp_path, {"model": model})
    successor: list[Checkpoint] = []

    def rotate(checkpoint: Checkpoint, call: int) -> None:
        if checkpoint.path == middling.path:
            successor.append(writer.save(3.0, meta={"score": 7.0}))
            writer.delete(middling)

    recovered, calls = _recover_while_rotating(monkeypatch, caplog, reader, rotate, max_key="score")

    assert recovered == successor[0]
    assert _weight(model) == 3.0
    # The damaged one ranks first in the rescan too, but it is not read (nor reported) again.
    assert calls == [damaged.path, middling.path, successor[0].path]
    [message] = _messages(caught)
    assert f"skipping checkpoint {damaged.path}" in message
    assert "SHA-256" in message
    assert damaged.path.is_dir()  # damage is left on disk, as before
    assert len(_rescans(caplog)) == 1


def test_rescans_are_bounded_then_a_vanished_candidate_is_skipped_as_before(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    caught: list[warnings.WarningMessage],
) -> None:
    # A pathological churn: every candidate but the oldest is deleted (after a successor is
    # committed) as the reader is about to read it.
    writer = _Writer(tmp_path)
    oldest = writer.save(1.0)
    newer = writer.save(2.0)
    model = _model(0.0)
    reader = Checkpointer(tmp_path, {"model": model})

    def rotate(checkpoint: Checkpoint, call: int) -> None:
        if checkpoint.path != oldest.path:
            writer.save(10.0 + call)
            writer.delete(checkpoint)

    recovered, calls = _recover_while_rotating(monkeypatch, caplog, reader, rotate)

    # The first candidate and one per rescan vanish; then the last scan's list is walked on,
    # as recovery always did: its next candidate is the oldest, which loads.
    assert len(calls) == _MAX_RESCANS + 2
    assert calls[0] == newer.path
    assert calls[-1] == oldest.path
    assert recovered == oldest
    assert _weight(model) == 1.0
    assert len(_rescans(caplog)) == _MAX_RESCANS
    [message] = _messages(caught)
    assert f"skipping checkpoint {calls[-2]}" in message
    assert f"scanned again {_MAX_RESCANS} times already" in message


# ------------------------------------------------------------- the command line's [newest] mark
#
# `typedbrain checkpoints` marks the checkpoint recovery would load. A checkpoint whose file
# or manifest cannot be read stops recovery with an error (it is not known to be damaged), so
# a usable checkpoint ranked below it is not what recovery loads, and is not marked.


def _refuse_reading(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """Make ``target`` unreadable: ``chmod 000`` where that stops this process (not root)."""
    if os.geteuid() != 0:
        target.chmod(0)
        return
    # root reads a file of mode 000: refuse it at the open instead
    refused = PermissionError(errno.EACCES, "Permission denied", str(target))
    refuse_opening(monkeypatch, target, refused)


def _listing(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(["checkpoints", *argv])
    return status, capsys.readouterr().out


def test_the_listing_marks_no_older_checkpoint_newest_below_an_unreadable_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    writer = _Writer(tmp_path)
    older = writer.save(1.0, meta={"loss": 0.5})
    newer = writer.save(2.0, meta={"loss": 0.1})
    _refuse_reading(monkeypatch, newer.paramfiles["model"])

    status, out = _listing(capsys, str(tmp_path), "--verify", "--min-key", "loss", "--json")
    document = json.loads(out)
    rows = {row["name"]: row for row in document["checkpoints"]}
    assert status == 1
    assert (rows[older.path.name]["status"], rows[older.path.name]["newest"]) == ("OK", False)
    assert rows[older.path.name]["best"] is False
    assert rows[newer.path.name]["status"] == "UNREADABLE"
    assert (rows[newer.path.name]["newest"], rows[newer.path.name]["best"]) == (False, False)
    assert rows[newer.path.name]["sequence"] == 2  # its manifest is readable: it is ranked
    assert document["notes"] == [
        f"{newer.path.name}: UNREADABLE, and it ranks above every usable checkpoint, so "
        "recover_if_possible() stops with an error at it rather than load an older one: no "
        "folder is marked [newest]",
        f"{newer.path.name}: UNREADABLE, and it ranks above every usable checkpoint, so "
        "recover_if_possible(min_key='loss') stops with an error at it rather than load an "
        "older one: no folder is marked [best]",
    ]
    status, table = _listing(capsys, str(tmp_path), "--verify")
    assert f"{older.path.name} [newest]" not in table
    assert table.count("[newest]") == 1  # in the note only
    assert f"{newer.path.name}: UNREADABLE, and it ranks above every usable checkpoint" in table
    # What the listing says is what recovery does.
    with pytest.raises(CheckpointError, match="Permission denied"):
        Checkpointer(tmp_path, {"model": _model(0.0)}).recover_if_possible()


def test_an_unreadable_checkpoint_ranked_below_a_usable_one_leaves_its_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The older one is unreadable and best by loss: [best] goes nowhere, [newest] stays.
    writer = _Writer(tmp_path)
    older = writer.save(1.0, meta={"loss": 0.1})
    newer = writer.save(2.0, meta={"loss": 0.5})
    _refuse_reading(monkeypatch, older.paramfiles["model"])

    _, out = _listing(capsys, str(tmp_path), "--verify", "--min-key", "loss", "--json")
    document = json.loads(out)
    marks = {row["name"]: (row["newest"], row["best"]) for row in document["checkpoints"]}
    assert marks == {older.path.name: (False, False), newer.path.name: (True, False)}
    assert document["notes"] == [
        f"{older.path.name}: UNREADABLE, and it ranks above every usable checkpoint, so "
        "recover_if_possible(min_key='loss') stops with an error at it rather than load an "
        "older one: no folder is marked [best]"
    ]
    assert Checkpointer(tmp_path, {"model": _model(0.0)}).recover_if_possible() == newer


def test_an_unreadable_manifest_leaves_no_folder_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its order is unknown, and every scan reads every manifest: recovery raises before ranking,
    # even where the unreadable one is the older.
    writer = _Writer(tmp_path)
    older = writer.save(1.0)
    newer = writer.save(2.0)
    _refuse_reading(monkeypatch, older.path / MANIFEST_NAME)

    for verify in ([], ["--verify"]):
        status, out = _listing(capsys, str(tmp_path), *verify, "--json")
        document = json.loads(out)
        assert status == 1
        assert [(row["newest"], row["best"]) for row in document["checkpoints"]] == [
            (False, False),
            (False, False),
        ]
        assert document["notes"] == [
            f"{older.path.name}: its MANIFEST.json cannot be read, so recover_if_possible stops "
            "with an error at it (as listing and keep policies do), whatever the other folders "
            "hold: no folder is marked [newest] or [best]"
        ]
        assert newer.path.name in out
    with pytest.raises(CheckpointError, match="Permission denied"):
        Checkpointer(tmp_path, {"model": _model(0.0)}).recover_if_possible()

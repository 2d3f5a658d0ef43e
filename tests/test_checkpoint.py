"""Checkpointer: round trips, keep/find policies, partial loads, averaging, meta, commit order."""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import types
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import python_blocks, rewrite_manifest
from typedbrain import _checkpoint
from typedbrain._checkpoint import (
    Checkpoint,
    Checkpointer,
    _map_location,
    average_checkpoints,
    ckpt_recency,
    verify_checkpoint,
)
from typedbrain._epochs import EpochCounter
from typedbrain._errors import (
    CheckpointError,
    CheckpointWarning,
    ConfigurationError,
    CorruptCheckpointError,
    ResumeWarning,
)
from typedbrain._folder_lock import LOCK_NAME
from typedbrain._manifest import INTRA_EPOCH_CKPT_FLAG, manifest_digest
from typedbrain._protocols import CheckpointerLike, Stateful

if TYPE_CHECKING:
    from torch.types import Storage


def entries(folder: Path) -> list[str]:
    """The names in ``folder``, sorted, but the writer lock file a first save leaves there."""
    return sorted(entry.name for entry in folder.iterdir() if entry.name != LOCK_NAME)


def assert_state_equal(actual: object, expected: object, where: str = "$") -> None:
    """Deep equality of state dicts: tensors with torch.equal (same dtype), the rest with ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), where
        assert set(actual) == set(expected), where
        for key in expected:
            assert_state_equal(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple), where
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_state_equal(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


class _Training:
    """A model, two optimizers, two schedulers, a scaler and a counter, a few steps in."""

    def __init__(self, seed: int, steps: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
        )
        self.sgd = torch.optim.SGD(self.model[0].parameters(), lr=0.1, momentum=0.9)
        self.adam = torch.optim.Adam(self.model[2].parameters(), lr=0.01)
        self.step_lr = torch.optim.lr_scheduler.StepLR(self.sgd, step_size=2, gamma=0.5)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(self.adam, patience=0)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        self.counter = EpochCounter(limit=10)
        for step in range(steps):
            loss = self.model(torch.randn(5, 4)).pow(2).mean()
            self.scaler.scale(loss).backward()
            for optimizer in (self.sgd, self.adam):
                self.scaler.step(optimizer)
                optimizer.zero_grad()
            self.scaler.update()
            self.step_lr.step()
            self.plateau.step(1.0 + step)  # never improves: the LR is cut
            next(self.counter)

    def recoverables(self) -> dict[str, object]:
        return {
            "model": self.model,
            "sgd": self.sgd,
            "adam": self.adam,
            "step_lr": self.step_lr,
            "plateau": self.plateau,
            "scaler": self.scaler,
            "counter": self.counter,
        }

    def states(self) -> dict[str, object]:
        return {
            name: obj.state_dict()  # type: ignore[attr-defined]  # every recoverable is Stateful
            for name, obj in self.recoverables().items()
        }


def test_round_trip_restores_module_optimizers_schedulers_scaler_and_counter_exactly(
    tmp_path: Path,
) -> None:
    trained = _Training(seed=0, steps=3)
    Checkpointer(tmp_path, trained.recoverables()).save_checkpoint()
    fresh = _Training(seed=1, steps=0)
    assert fresh.counter.current == 0

    checkpoint = Checkpointer(tmp_path, fresh.recoverables()).recover_if_possible(device="cpu")

    assert checkpoint is not None
    assert_state_equal(fresh.states(), trained.states())
    assert fresh.counter.current == 3
    assert fresh.scaler.get_scale() == trained.scaler.get_scale()
    assert fresh.plateau.num_bad_epochs == trained.plateau.num_bad_epochs


def test_round_trip_negative_control_detects_a_different_state(tmp_path: Path) -> None:
    trained = _Training(seed=0, steps=3)
    fresh = _Training(seed=1, steps=0)
    with pytest.raises(AssertionError):
        assert_state_equal(fresh.states(), trained.states())


def test_recover_without_any_checkpoint_returns_none_and_changes_nothing(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert Checkpointer(tmp_path / "missing", {"model": model}).recover_if_possible() is None
    assert_state_equal(model.state_dict(), before)


def test_checkpoint_folder_holds_one_file_per_recoverable_and_a_manifest(tmp_path: Path) -> None:
    checkpointer = Checkpointer(
        tmp_path, {"model": torch.nn.Linear(2, 2), "counter": EpochCounter(3)}
    )
    checkpoint = checkpointer.save_checkpoint(meta={"loss": 0.5}, end_of_epoch=False)

    assert checkpoint.path.parent == tmp_path
    assert checkpoint.path.name.startswith("CKPT+")
    assert sorted(p.name for p in checkpoint.path.iterdir()) == [
        "MANIFEST.json",
        "counter.ckpt",
        "model.ckpt",
    ]
    assert checkpoint.paramfiles == {
        "model": checkpoint.path / "model.ckpt",
        "counter": checkpoint.path / "counter.ckpt",
    }
    manifest = json.loads((checkpoint.path / "MANIFEST.json").read_text())
    assert manifest["format_version"] == 3
    assert manifest["manifest_sha256"] == manifest_digest(manifest)
    assert manifest["sequence"] == 1
    assert manifest["end_of_epoch"] is False
    assert manifest["meta"] == {"loss": 0.5}
    assert manifest["torch_version"] == str(torch.__version__)
    assert set(manifest["typedbrain_version"]) <= set("0123456789.abcdevr+")
    for name, record in manifest["files"].items():
        data = (checkpoint.path / f"{name}.ckpt").read_bytes()
        assert record["size"] == len(data)
        # Files smaller than a piece: one SHA-256, that of the whole file (sha256sum's).
        assert record["piece_bytes"] == 16 << 20
        assert record["sha256"] == [hashlib.sha256(data).hexdigest()]
    # What save_checkpoint returns is what the folder says.
    assert verify_checkpoint(checkpoint.path) == checkpoint
    assert checkpointer.list_checkpoints() == [checkpoint]


def test_sequence_numbers_increase_and_define_recency(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    first = checkpointer.save_checkpoint(name="zzz-first")
    second = checkpointer.save_checkpoint(name="aaa-second")
    assert (first.sequence, second.sequence) == (1, 2)
    # Recency is the sequence number, not the folder name or the clock.
    assert checkpointer.find_checkpoint() == second
    assert checkpointer.list_checkpoints() == [first, second]


def test_checkpoints_saved_within_one_second_get_distinct_default_names(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    paths = {checkpointer.save_checkpoint().path for _ in range(3)}
    assert len(paths) == 3


def test_a_default_name_is_not_reused_after_a_keep_policy_deleted_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every save in the same second: the folder saved before is deleted each time.
    monkeypatch.setattr("typedbrain._checkpoint.time.strftime", lambda *_: "2026-11-25+12-00-00")
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    names = [checkpointer.save_and_keep_only(num_to_keep=1).path.name for _ in range(4)]
    assert names == [f"CKPT+2026-11-25+12-00-00+0{index}" for index in range(4)]
    assert entries(tmp_path) == [names[-1]]


def test_an_uncommitted_folder_left_under_a_given_name_is_removed_with_a_warning_and_reused(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    checkpointer.save_checkpoint(name="epoch-1")
    # What a save of "epoch-2" killed before its commit leaves: files, no manifest.
    leftover = tmp_path / "epoch-2"
    leftover.mkdir()
    (leftover / "counter.ckpt").write_bytes(b"partial")
    (leftover / ".MANIFEST.json.tmp").write_text("{")

    with pytest.warns(CheckpointWarning, match=r"removing .*epoch-2: a save interrupted") as caught:
        saved = checkpointer.save_and_keep_only(name="epoch-2", num_to_keep=2)

    assert caught[0].filename == __file__
    assert saved.path == leftover
    assert sorted(entry.name for entry in leftover.iterdir()) == ["MANIFEST.json", "counter.ckpt"]
    assert verify_checkpoint(leftover) == saved
    assert [c.path.name for c in checkpointer.list_checkpoints()] == ["epoch-1", "epoch-2"]


@pytest.mark.parametrize(
    ("plant", "in_the_way"),
    [
        (lambda folder: (folder / "notes.txt").write_text("mine"), "the file 'notes.txt'"),
        (lambda folder: (folder / "runs").mkdir(), "the folder 'runs'"),
        (lambda folder: (folder / "CKPT.yaml").write_text("end-of-epoch: true\n"), "CKPT.yaml"),
        (lambda folder: (folder / "MANIFEST.ckpt").mkdir(), "the folder 'MANIFEST.ckpt'"),
        (
            lambda folder: (folder / "linked.ckpt").symlink_to(folder / "counter.ckpt"),
            "the link 'linked.ckpt'",
        ),
    ],
    ids=["a file", "a subfolder", "a SpeechBrain meta file", "a .ckpt folder", "a .ckpt link"],
)
def test_a_given_name_held_by_a_folder_that_is_not_a_save_leftover_is_refused_untouched(
    tmp_path: Path, plant: Callable[[Path], object], in_the_way: str
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    folder = tmp_path / "finetune"
    folder.mkdir()
    (folder / "counter.ckpt").write_bytes(b"partial")  # what a save writes, next to the rest
    plant(folder)
    before = sorted(entry.name for entry in folder.iterdir())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            CheckpointError,
            match=rf"cannot save checkpoint .*finetune: .*it holds .*{re.escape(in_the_way)}.*"
            "nothing was written or deleted",
        ):
            checkpointer.save_checkpoint(name="finetune")

    assert sorted(entry.name for entry in folder.iterdir()) == before
    assert (folder / "counter.ckpt").read_bytes() == b"partial"
    with pytest.warns(CheckpointWarning, match="finetune: no MANIFEST.json"):
        assert checkpointer.list_checkpoints() == []


def test_a_given_name_held_by_another_checkpoints_folder_keeps_its_checkpoints(
    tmp_path: Path,
) -> None:
    model = torch.nn.Linear(2, 2)
    inner = Checkpointer(tmp_path / "finetune", {"model": model}).save_checkpoint()
    outer = Checkpointer(tmp_path, {"model": model})
    with pytest.raises(CheckpointError, match=rf"the folder '{re.escape(inner.path.name)}'"):
        outer.save_checkpoint(name="finetune")
    assert verify_checkpoint(inner.path) == inner


def test_an_empty_folder_under_a_given_name_is_an_interrupted_save_and_is_reused(
    tmp_path: Path,
) -> None:
    (tmp_path / "epoch-1").mkdir()  # a save killed right after it made its folder
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    with pytest.warns(CheckpointWarning, match="a save interrupted before its commit left it"):
        saved = checkpointer.save_checkpoint(name="epoch-1")
    assert verify_checkpoint(tmp_path / "epoch-1") == saved


def test_a_given_name_held_by_a_damaged_manifest_or_a_file_is_refused_and_left_alone(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    damaged = checkpointer.save_checkpoint(name="damaged")
    (damaged.path / "MANIFEST.json").write_text("{")
    (tmp_path / "a-file").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=r"damaged: it exists"):
            checkpointer.save_checkpoint(name="damaged")
        with pytest.raises(CheckpointError, match=r"a-file: something that is not"):
            checkpointer.save_checkpoint(name="a-file")
    assert (damaged.path / "counter.ckpt").is_file()
    assert (tmp_path / "a-file").read_text() == "x"


def test_a_given_name_that_exists_or_is_not_a_plain_name_is_refused(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    checkpointer.save_checkpoint(name="best")
    with pytest.raises(CheckpointError, match="best"):
        checkpointer.save_checkpoint(name="best")
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(ConfigurationError, match="plain folder name"):
            checkpointer.save_checkpoint(name=bad)
    assert [c.path.name for c in checkpointer.list_checkpoints()] == ["best"]


def test_recoverable_names_must_be_plain_file_names(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path)
    for bad in ("../model", "a/b", ".model", ""):
        with pytest.raises(ConfigurationError, match="plain file name"):
            checkpointer.add_recoverable(bad, torch.nn.Linear(1, 1))


def test_watched_phase_is_recorded_in_the_manifest(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    assert checkpointer.save_checkpoint().phase is None
    phases = iter(["TRAIN", None])
    checkpointer.watch_phase(lambda: next(phases))
    assert checkpointer.save_checkpoint().phase == "TRAIN"
    assert checkpointer.save_checkpoint().phase is None
    assert [c.phase for c in checkpointer.list_checkpoints()] == [None, "TRAIN", None]


def test_re_adding_a_name_replaces_the_object(tmp_path: Path) -> None:
    first, second = EpochCounter(5), EpochCounter(5)
    second.current = 4
    checkpointer = Checkpointer(tmp_path, {"counter": first})
    checkpointer.add_recoverable("counter", second)
    assert checkpointer.recoverables == {"counter": second}
    checkpointer.save_checkpoint()
    restored = EpochCounter(5)
    Checkpointer(tmp_path, {"counter": restored}).recover_if_possible()
    assert restored.current == 4


def test_an_object_neither_stateful_nor_hooked_is_refused_at_registration(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigurationError, match=r"recoverable 'vocab'.*list"):
        Checkpointer(tmp_path, {"vocab": ["a", "b"]})


def test_checkpointer_satisfies_checkpointer_like(tmp_path: Path) -> None:
    # The annotation is the test: mypy checks the structural match.
    checkpointer: CheckpointerLike = Checkpointer(tmp_path)
    checkpointer.add_recoverable("counter", EpochCounter(2))
    assert checkpointer.recover_if_possible(min_key="loss") is None


def test_checkpoints_are_hashable_and_compare_by_content(tmp_path: Path) -> None:
    checkpoint = Checkpointer(tmp_path, {"counter": EpochCounter(2)}).save_checkpoint(
        meta={"a": [1, {"b": None}]}
    )
    assert {checkpoint, verify_checkpoint(checkpoint.path)} == {checkpoint}


# ---------------------------------------------------------------------------- meta


def test_meta_accepts_json_data_and_converts_scalars(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    checkpoint = checkpointer.save_checkpoint(
        meta={
            "loss": torch.tensor(0.25),
            "steps": torch.tensor(7),
            "np_float": np.float32(1.5),
            "np_int": np.int64(3),
            "np_bool": np.bool_(True),
            "nested": {"list": [1, 2.5, "x", None, (True, False)]},
            "inf": float("inf"),
        }
    )
    expected = {
        "loss": 0.25,
        "steps": 7,
        "np_float": 1.5,
        "np_int": 3,
        "np_bool": True,
        "nested": {"list": [1, 2.5, "x", None, [True, False]]},
        "inf": float("inf"),
    }
    assert checkpoint.meta == expected
    (listed,) = checkpointer.list_checkpoints()
    assert listed.meta == expected
    assert type(listed.meta["np_int"]) is int
    assert type(listed.meta["np_float"]) is float


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"vocab": {"a", "b"}}, r"meta 'vocab': 'vocab' is a set"),
        ({"loss": torch.tensor([1.0, 2.0])}, r"meta 'loss'.*tensor of shape \(2,\)"),
        ({"stats": {"errors": [1, object()]}}, r"meta 'stats': 'stats'\['errors'\]\[1\]"),
        ({"stats": {3: 1}}, r"meta 'stats'.*key 3, not a string"),
        ({7: 1}, r"meta key 7 is not a string"),
        ({"when": np.datetime64("2024-01-01")}, r"meta 'when'"),
    ],
)
def test_meta_that_is_not_json_data_is_refused_naming_the_key(
    tmp_path: Path, meta: Mapping[str, object], message: str
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    with pytest.raises(ConfigurationError, match=message):
        checkpointer.save_checkpoint(meta=meta)
    assert not tmp_path.exists() or not entries(tmp_path)


# ---------------------------------------------------------------------------- keep/find policy


def _save_losses(
    checkpointer: Checkpointer, losses: list[float | None], **keep: object
) -> list[Checkpoint]:
    saved = []
    for loss in losses:
        meta = {} if loss is None else {"loss": loss}
        saved.append(checkpointer.save_and_keep_only(meta=meta, **keep))  # type: ignore[arg-type]  # test passes the keep options through
    return saved


def _surviving(checkpointer: Checkpointer, saved: list[Checkpoint]) -> list[int]:
    """1-based positions in ``saved`` of the checkpoints still on disk."""
    alive = {c.sequence for c in checkpointer.list_checkpoints()}
    return [index + 1 for index, c in enumerate(saved) if c.sequence in alive]


def test_keep_recent_keeps_the_num_to_keep_most_recent(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    saved = _save_losses(checkpointer, [None] * 4, num_to_keep=2)
    assert _surviving(checkpointer, saved) == [3, 4]


def test_min_key_keeps_the_best_and_the_most_recent(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    saved = _save_losses(checkpointer, [3.0, 1.0, 2.0, 4.0], min_keys=["loss"])
    assert _surviving(checkpointer, saved) == [2, 4]
    assert checkpointer.find_checkpoint(min_key="loss") == saved[1]
    assert checkpointer.find_checkpoint() == saved[3]


def test_max_key_keeps_the_highest(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    saved = [
        checkpointer.save_and_keep_only(meta={"acc": acc}, max_keys=["acc"], keep_recent=False)
        for acc in (0.5, 0.9, 0.7, 0.6)
    ]
    # The one just saved is always kept; of the others only the best survives.
    assert _surviving(checkpointer, saved) == [2, 4]
    assert checkpointer.find_checkpoint(max_key="acc") == saved[1]


def test_num_to_keep_applies_per_key(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    saved = _save_losses(
        checkpointer, [5.0, 1.0, 4.0, 2.0, 3.0, 6.0], num_to_keep=2, min_keys=["loss"]
    )
    # best two losses: #2 (1.0), #4 (2.0); two most recent: #5, #6.
    assert _surviving(checkpointer, saved) == [2, 4, 5, 6]


def test_ties_go_to_the_most_recent(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    saved = _save_losses(checkpointer, [1.0, 1.0], min_keys=["loss"], keep_recent=False)
    assert _surviving(checkpointer, saved) == [2]
    checkpointer.save_checkpoint(meta={"loss": 1.0})
    assert checkpointer.find_checkpoint(min_key="loss") == checkpointer.list_checkpoints()[-1]
    assert checkpointer.find_checkpoints(min_key="loss") == checkpointer.list_checkpoints()[::-1]


def _set_sequence(checkpoint: Checkpoint, sequence: int) -> None:
    rewrite_manifest(checkpoint.path, lambda data: data.update(sequence=sequence))


def test_a_sequence_number_two_writers_both_took_ties_to_the_later_save(tmp_path: Path) -> None:
    # Two checkpointers saving into one folder at once can both number theirs max + 1.
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    older = checkpointer.save_checkpoint(meta={"loss": 1.0}, name="older")
    newer = checkpointer.save_checkpoint(meta={"loss": 1.0}, name="newer")
    assert newer.unixtime >= older.unixtime
    _set_sequence(newer, older.sequence)
    assert checkpointer.find_checkpoint().path == newer.path  # type: ignore[union-attr]  # found
    assert checkpointer.find_checkpoint(min_key="loss").path == newer.path  # type: ignore[union-attr]  # found
    recovered = Checkpointer(tmp_path, {"counter": EpochCounter(2)}).recover_if_possible()
    assert recovered is not None
    assert recovered.path == newer.path


def test_no_checkpoint_is_numbered_past_what_a_manifest_may_hold(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    last = checkpointer.save_checkpoint(name="last")
    _set_sequence(last, 2**63 - 1)
    with pytest.raises(
        CheckpointError, match=r"cannot number a new checkpoint .*last has sequence number 9223"
    ):
        checkpointer.save_and_keep_only(num_to_keep=0)
    assert entries(tmp_path) == ["last"]
    assert [c.path.name for c in checkpointer.list_checkpoints()] == ["last"]


def test_checkpoints_without_the_key_are_neither_candidates_nor_deleted(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    saved = _save_losses(checkpointer, [None, 2.0, 1.0, 3.0], min_keys=["loss"], keep_recent=False)
    assert _surviving(checkpointer, saved) == [1, 3, 4]
    assert checkpointer.find_checkpoints(min_key="loss") == [saved[2], saved[3]]
    assert checkpointer.find_checkpoint(max_key="missing") is None


def test_without_keys_and_without_keep_recent_nothing_is_deleted(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    saved = _save_losses(checkpointer, [None] * 3, keep_recent=False)
    assert _surviving(checkpointer, saved) == [1, 2, 3]


def test_num_to_keep_zero_still_keeps_the_checkpoint_just_saved(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    saved = _save_losses(checkpointer, [None] * 3, num_to_keep=0)
    assert _surviving(checkpointer, saved) == [3]


def test_custom_importance_key(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})

    def oldest_first(checkpoint: Checkpoint) -> float:
        return -ckpt_recency(checkpoint)

    saved = [
        checkpointer.save_and_keep_only(importance_keys=[oldest_first], keep_recent=False)
        for _ in range(3)
    ]
    assert _surviving(checkpointer, saved) == [1, 3]
    assert checkpointer.find_checkpoint(importance_key=oldest_first) == saved[0]


def test_predicate_limits_deletion_so_intra_epoch_checkpoints_replace_only_each_other(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})

    def intra(checkpoint: Checkpoint) -> bool:
        return checkpoint.meta.get("typedbrain_intra_epoch") is True

    def not_intra(checkpoint: Checkpoint) -> bool:
        return not intra(checkpoint)

    def save(kind: str) -> Checkpoint:
        if kind == "I":
            return checkpointer.save_and_keep_only(
                meta={"typedbrain_intra_epoch": True}, end_of_epoch=False, ckpt_predicate=intra
            )
        return checkpointer.save_and_keep_only(ckpt_predicate=not_intra)

    saved = [save(kind) for kind in "EIIEI"]
    assert _surviving(checkpointer, saved) == [4, 5]
    assert checkpointer.find_checkpoint(ckpt_predicate=not_intra) == saved[3]
    saved.append(save("I"))
    assert _surviving(checkpointer, saved) == [4, 6]


def _is_intra(checkpoint: Checkpoint) -> bool:
    return INTRA_EPOCH_CKPT_FLAG in checkpoint.meta


def _save_intra(checkpointer: Checkpointer) -> Checkpoint:
    """What the brain does every ``ckpt_interval_steps``."""
    return checkpointer.save_and_keep_only(
        meta={INTRA_EPOCH_CKPT_FLAG: True},
        end_of_epoch=False,
        num_to_keep=1,
        ckpt_predicate=_is_intra,
    )


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        ({"num_to_keep": 2}, [2, 3]),
        ({"num_to_keep": 2, "min_keys": ["loss"]}, [1, 2, 3]),
        ({"min_keys": ["loss"]}, [1, 3]),
        ({"min_keys": ["loss"], "keep_recent": False}, [1, 3]),
    ],
    ids=["recency", "recency and loss", "loss and the newest", "loss only"],
)
def test_an_end_of_epoch_save_deletes_the_intra_epoch_checkpoints_before_it_uncounted(
    tmp_path: Path, keep: dict[str, object], expected: list[int]
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    for epoch, loss in ((1, 0.5), (2, 0.7), (3, 0.9)):
        _save_intra(checkpointer)
        checkpointer.save_and_keep_only(meta={"epoch": epoch, "loss": loss}, **keep)  # type: ignore[arg-type]  # test passes the keep options through
    assert [c.meta.get("epoch") for c in checkpointer.list_checkpoints()] == expected


def test_an_intra_epoch_checkpoint_committed_after_the_end_of_epoch_one_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    intra = checkpointer.save_checkpoint(meta={INTRA_EPOCH_CKPT_FLAG: True}, end_of_epoch=False)
    # Another writer committed it as the save below runs: the same number, a later commit.
    rewrite_manifest(intra.path, lambda data: data.update(unixtime=intra.unixtime + 3600))
    monkeypatch.setattr(checkpointer, "_next_sequence", lambda: intra.sequence)
    checkpointer.save_and_keep_only(meta={"epoch": 1}, num_to_keep=2)
    assert [c.meta for c in checkpointer.list_checkpoints()] == [
        {"epoch": 1},
        {INTRA_EPOCH_CKPT_FLAG: True},
    ]


def test_an_end_of_epoch_save_deletes_only_the_intra_epoch_checkpoints_its_predicate_accepts(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    intra = _save_intra(checkpointer)

    def not_intra(checkpoint: Checkpoint) -> bool:
        return not _is_intra(checkpoint)

    checkpointer.save_and_keep_only(meta={"epoch": 1}, ckpt_predicate=not_intra)
    assert intra in checkpointer.list_checkpoints()
    checkpointer.save_and_keep_only(meta={"epoch": 2}, ckpt_predicate=_is_intra)
    assert intra not in checkpointer.list_checkpoints()


def test_a_save_that_is_not_end_of_epoch_keeps_counting_intra_epoch_checkpoints(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    epoch = checkpointer.save_checkpoint(meta={"epoch": 1})
    first = _save_intra(checkpointer)
    second = checkpointer.save_and_keep_only(meta={"user": True}, end_of_epoch=False, num_to_keep=2)
    # Recency ranks the intra-epoch one as any other: the oldest is deleted, not the flagged one.
    assert checkpointer.list_checkpoints() == [first, second]
    assert not epoch.path.exists()


def test_a_folder_that_cannot_be_deleted_is_a_warning_and_the_other_deletions_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    stuck, other = checkpointer.save_checkpoint(), checkpointer.save_checkpoint()
    real_delete = _checkpoint._delete_folder

    def refuse_stuck(checkpoint: Checkpoint) -> None:
        if checkpoint.path == stuck.path:
            raise PermissionError(13, "Permission denied", str(stuck.path / "MANIFEST.json"))
        real_delete(checkpoint)

    monkeypatch.setattr(_checkpoint, "_delete_folder", refuse_stuck)
    newest = other
    for _ in range(2):  # every later save too
        with pytest.warns(CheckpointWarning) as caught:
            newest = checkpointer.save_and_keep_only(num_to_keep=1)
        assert len(caught) == 1
        assert caught[0].filename == __file__
        assert re.search(
            rf"could not delete checkpoint .*{re.escape(stuck.path.name)} \(PermissionError: "
            r"\[Errno 13\] Permission denied: .*MANIFEST.json'\); it is still a committed "
            "checkpoint",
            str(caught[0].message),
        )
        assert checkpointer.list_checkpoints() == [stuck, newest]
        assert not other.path.exists()
    with pytest.warns(CheckpointWarning, match="could not delete"):
        assert checkpointer.delete_checkpoints(num_to_keep=0) == [newest]


def test_delete_checkpoints_keeps_the_most_recent_by_default(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    saved = [checkpointer.save_checkpoint() for _ in range(3)]
    deleted = checkpointer.delete_checkpoints(num_to_keep=1)
    assert deleted == saved[:2]
    assert checkpointer.list_checkpoints() == [saved[2]]
    assert not saved[0].path.exists()


def test_find_checkpoints_ranks_and_limits(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    for loss in (3, 1, float("nan"), 2):
        checkpointer.save_checkpoint(meta={"loss": loss})

    def sequences(found: list[Checkpoint]) -> list[int]:
        return [checkpoint.sequence for checkpoint in found]

    # NaN ranks last whichever the direction.
    assert sequences(checkpointer.find_checkpoints(min_key="loss")) == [2, 4, 1, 3]
    assert sequences(checkpointer.find_checkpoints(max_key="loss")) == [1, 4, 2, 3]
    assert sequences(checkpointer.find_checkpoints(max_key="loss", max_num_checkpoints=2)) == [1, 4]
    assert sequences(checkpointer.find_checkpoints()) == [4, 3, 2, 1]


def test_find_refuses_two_keys(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    with pytest.raises(ConfigurationError, match="at most one"):
        checkpointer.find_checkpoint(max_key="a", min_key="b")


@pytest.mark.parametrize("kind", ["min", "max", "importance"])
def test_nan_ranks_last_below_the_infinities_for_every_kind_of_key(
    tmp_path: Path, kind: str
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    # The NaN is saved last, so that it would win any tie (ties go to the most recent).
    for name, loss in [("low", 1.0), ("worst", math.inf), ("best", -math.inf), ("nan", math.nan)]:
        checkpointer.save_checkpoint(meta={"loss": loss, "gain": -loss}, name=name)

    def gain(checkpoint: Checkpoint) -> float:
        value = checkpoint.meta["gain"]
        assert isinstance(value, float)
        return value

    if kind == "min":
        ranked = checkpointer.find_checkpoints(min_key="loss")
    elif kind == "max":
        ranked = checkpointer.find_checkpoints(max_key="gain")
    else:
        ranked = checkpointer.find_checkpoints(importance_key=gain)
    assert [c.path.name for c in ranked] == ["best", "low", "worst", "nan"]


def test_a_nan_importance_never_costs_the_best_checkpoint_its_place(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    for name, wer in [("a", 0.3), ("b", math.nan), ("c", 0.1), ("d", 0.2)]:
        checkpointer.save_checkpoint(meta={"wer": wer}, name=name)

    def low_wer(checkpoint: Checkpoint) -> float:
        value = checkpoint.meta["wer"]
        assert isinstance(value, float)
        return -value

    checkpointer.delete_checkpoints(importance_keys=[low_wer], num_to_keep=1)
    assert [c.path.name for c in checkpointer.list_checkpoints()] == ["c"]


def test_a_ranking_value_that_is_not_a_number_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    first = checkpointer.save_and_keep_only(meta={"loss": 0.4}, min_keys=["loss"])
    for meta, keys in [
        ({"loss": None}, {"min_keys": ["loss"]}),
        ({"acc": True}, {"max_keys": ["acc"]}),
        ({"loss": "low"}, {"min_keys": ["other", "loss"]}),
    ]:
        with pytest.raises(ConfigurationError, match=r"meta '(loss|acc)' is .*not a number.*"):
            checkpointer.save_and_keep_only(meta=meta, **keys)  # type: ignore[arg-type]  # the keys argument varies
    assert checkpointer.list_checkpoints() == [first]
    assert entries(tmp_path) == [first.path.name]
    # A key absent from meta is no value, not a wrong one: the checkpoint is just not ranked.
    checkpointer.save_and_keep_only(meta={}, min_keys=["loss"], keep_recent=False)
    assert len(checkpointer.list_checkpoints()) == 2


def test_a_checkpoint_whose_ranking_value_is_not_a_number_is_left_out_with_a_warning(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    good = checkpointer.save_checkpoint(meta={"loss": 0.4})
    # One saved before the check existed, or by a plain save_checkpoint.
    poison = checkpointer.save_checkpoint(meta={"loss": None})
    folder = re.escape(str(poison.path))

    with pytest.warns(
        CheckpointWarning, match=rf"{folder}: meta 'loss' is None, not a number"
    ) as found:
        assert checkpointer.find_checkpoints(min_key="loss") == [good]
    with pytest.warns(CheckpointWarning, match=folder) as recovered:
        assert checkpointer.recover_if_possible(min_key="loss") == good
    with pytest.warns(CheckpointWarning, match=folder) as kept:
        newest = checkpointer.save_and_keep_only(meta={"loss": 0.3}, min_keys=["loss"])
    # Each warning points at the line that made the call.
    assert [caught[0].filename for caught in (found, recovered, kept)] == [__file__] * 3
    # The keep policy still works: the poison is not ranked by the loss, so recency alone
    # decides about it, and it goes, with the older loss; the new one is the best and newest.
    assert checkpointer.list_checkpoints() == [newest]


def test_negative_num_to_keep_is_refused_before_saving(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    with pytest.raises(ConfigurationError, match="num_to_keep"):
        checkpointer.save_and_keep_only(num_to_keep=-1)
    assert checkpointer.list_checkpoints() == []


def test_recovering_by_a_meta_key_no_checkpoint_has_warns_naming_the_keys_there(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpointer.recover_if_possible(min_key="loss") is None  # an empty folder: quiet
    checkpointer.save_checkpoint(meta={"loss": 0.5, "wer": 12.0})
    checkpointer.save_checkpoint(meta={"loss": 0.4})
    with pytest.warns(
        CheckpointWarning,
        match=r"none of the 2 checkpoints in .* has the meta key 'los' that min_key ranks by "
        r"\(their meta keys: 'loss', 'wer'\), so none is recovered",
    ):
        assert checkpointer.recover_if_possible(min_key="los") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one checkpoint with the key is enough
        assert checkpointer.recover_if_possible(max_key="wer") is not None


def test_recover_picks_the_best_by_min_key_and_the_newest_by_default(tmp_path: Path) -> None:
    counter = EpochCounter(10)
    checkpointer = Checkpointer(tmp_path, {"counter": counter})
    for epoch, loss in enumerate([0.5, 0.1, 0.3], start=1):
        counter.current = epoch
        checkpointer.save_checkpoint(meta={"loss": loss})
    restored = EpochCounter(10)
    other = Checkpointer(tmp_path, {"counter": restored})
    best = other.recover_if_possible(min_key="loss")
    assert best is not None
    assert best.meta == {"loss": 0.1}
    assert restored.current == 2
    assert other.recover_if_possible() is not None
    assert restored.current == 3


# A model of the keep policy written from SpeechBrain's rules, over (sequence, loss) pairs: for
# each key (the loss, recency) the checkpoints it ranks are candidates and its num_to_keep best
# are protected; the checkpoint just saved is always protected (typedbrain's addition).
def _model_survivors(
    existing: list[tuple[int, float | None]],
    num_to_keep: int,
    keep_recent: bool,
    use_loss: bool,
) -> set[int]:
    rankings: list[list[int]] = []
    if use_loss:
        with_loss = [(seq, loss) for seq, loss in existing if loss is not None]
        rankings.append([seq for seq, _ in sorted(with_loss, key=lambda p: (p[1], -p[0]))])
    if keep_recent:
        rankings.append(sorted((seq for seq, _ in existing), reverse=True))
    candidates = {seq for ranking in rankings for seq in ranking}
    protected = {seq for ranking in rankings for seq in ranking[:num_to_keep]}
    protected.add(max(seq for seq, _ in existing))
    return {seq for seq, _ in existing if seq not in candidates or seq in protected}


_saves = st.lists(
    st.tuples(
        st.none() | st.sampled_from([0.0, 1.0, 2.0]),  # loss (ties likely)
        st.integers(min_value=0, max_value=2),  # num_to_keep
        st.booleans(),  # keep_recent
        st.booleans(),  # min_keys=["loss"]
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=20, deadline=None)
@given(_saves)
def test_after_any_saves_the_newest_exists_and_the_policy_matches_the_model(
    saves: list[tuple[float | None, int, bool, bool]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        checkpointer = Checkpointer(directory, {"counter": EpochCounter(2)})
        model: list[tuple[int, float | None]] = []
        for loss, num_to_keep, keep_recent, use_loss in saves:
            saved = checkpointer.save_and_keep_only(
                meta={} if loss is None else {"loss": loss},
                num_to_keep=num_to_keep,
                keep_recent=keep_recent,
                min_keys=["loss"] if use_loss else (),
            )
            assert saved.path.is_dir()
            assert checkpointer.find_checkpoint() == saved
            model.append((saved.sequence, loss))
            survivors = _model_survivors(model, num_to_keep, keep_recent, use_loss)
            model = [(seq, loss) for seq, loss in model if seq in survivors]
            assert [c.sequence for c in checkpointer.list_checkpoints()] == sorted(survivors)


# ---------------------------------------------------------------------------- partial load


def test_a_registered_recoverable_missing_from_the_checkpoint_is_an_error_naming_it(
    tmp_path: Path,
) -> None:
    Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2)}).save_checkpoint()
    model, counter = torch.nn.Linear(2, 2), EpochCounter(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = Checkpointer(tmp_path, {"model": model, "counter": counter})
    (checkpoint,) = checkpointer.list_checkpoints()
    with pytest.raises(CheckpointError, match=r"has no recoverable 'counter'") as caught:
        checkpointer.recover_if_possible()
    assert str(checkpoint.path) in str(caught.value)
    # Nothing was loaded, not even the recoverables that were present.
    assert_state_equal(model.state_dict(), before)


def test_optional_load_skips_a_missing_recoverable(tmp_path: Path) -> None:
    saved_model = torch.nn.Linear(2, 2)
    Checkpointer(tmp_path, {"model": saved_model}).save_checkpoint()
    model, counter = torch.nn.Linear(2, 2), EpochCounter(3)
    counter.current = 2
    checkpointer = Checkpointer(tmp_path, {"model": model})
    checkpointer.add_recoverable("counter", counter, optional_load=True)
    assert checkpointer.recover_if_possible() is not None
    assert_state_equal(model.state_dict(), saved_model.state_dict())
    assert counter.current == 2


def test_allow_partial_load_skips_every_missing_recoverable(tmp_path: Path) -> None:
    saved_model = torch.nn.Linear(2, 2)
    Checkpointer(tmp_path, {"model": saved_model}).save_checkpoint()
    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(
        tmp_path, {"model": model, "counter": EpochCounter(3)}, allow_partial_load=True
    )
    assert checkpointer.recover_if_possible() is not None
    assert_state_equal(model.state_dict(), saved_model.state_dict())


def test_a_file_without_a_registered_recoverable_is_ignored(tmp_path: Path) -> None:
    counter = EpochCounter(3)
    counter.current = 1
    Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2), "counter": counter}).save_checkpoint()
    restored = EpochCounter(3)
    assert Checkpointer(tmp_path, {"counter": restored}).recover_if_possible() is not None
    assert restored.current == 1


def test_a_state_a_recoverable_refuses_is_an_error_naming_it_its_file_and_what_was_loaded(
    tmp_path: Path,
) -> None:
    counter = EpochCounter(3)
    counter.current = 2
    Checkpointer(tmp_path, {"counter": counter, "model": torch.nn.Linear(2, 2)}).save_checkpoint()
    restored, reshaped = EpochCounter(3), torch.nn.Linear(2, 3)  # the model changed since
    checkpointer = Checkpointer(tmp_path, {"counter": restored, "model": reshaped})
    (checkpoint,) = checkpointer.list_checkpoints()
    with pytest.raises(
        CheckpointError, match=r"recoverable 'model' did not take its state"
    ) as caught:
        checkpointer.recover_if_possible()
    message = str(caught.value)
    assert str(checkpoint.path / "model.ckpt") in message
    assert f"saved by typedbrain {checkpoint.typedbrain_version}" in message
    assert f"torch {checkpoint.torch_version}" in message
    assert "RuntimeError: Error(s) in loading state_dict" in message
    assert "size mismatch" in message
    assert "loaded before it keep the checkpoint's state: 'counter'" in message
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert restored.current == 2  # as the message says


def test_a_load_hook_that_fails_first_is_an_error_saying_nothing_was_changed(
    tmp_path: Path,
) -> None:
    class Refusing:
        def save(self, path: Path) -> None:
            path.write_text("{}")

        def load(self, path: Path, end_of_epoch: bool) -> None:
            raise ValueError("not my format")

    model = torch.nn.Linear(2, 2)
    saver = Checkpointer(tmp_path, {"model": model})
    saver.add_recoverable(
        "vocabulary", Refusing(), custom_save_hook=Refusing.save, custom_load_hook=Refusing.load
    )
    saver.save_checkpoint()
    loader = Checkpointer(tmp_path)
    loader.add_recoverable(
        "vocabulary", Refusing(), custom_save_hook=Refusing.save, custom_load_hook=Refusing.load
    )
    restored = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in restored.state_dict().items()}
    loader.add_recoverable("model", restored)
    with pytest.raises(CheckpointError, match=r"'vocabulary' did not take its state") as caught:
        loader.recover_if_possible()
    assert "ValueError: not my format (no recoverable was changed)" in str(caught.value)
    assert isinstance(caught.value.__cause__, ValueError)
    assert_state_equal(restored.state_dict(), before)


def test_a_failure_while_states_are_applied_never_falls_back_to_an_older_checkpoint(
    tmp_path: Path,
) -> None:
    """A damaged checkpoint is skipped before anything loads; once states are being handed out,
    an older checkpoint would mix with what the newer one already set, so the error stands."""
    raising = [False]

    def save(words: list[str], path: Path) -> None:
        path.write_text(json.dumps(words))

    def load(words: list[str], path: Path, end_of_epoch: bool) -> None:
        if raising[0]:  # as a hook that checks its own file might
            raise CorruptCheckpointError(path, "the hook does not like it")
        words[:] = json.loads(path.read_text())

    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(tmp_path, {"model": model})
    words = ["old"]
    checkpointer.add_recoverable("words", words, custom_save_hook=save, custom_load_hook=load)
    older = checkpointer.save_checkpoint()
    with torch.no_grad():
        model.weight.add_(1.0)
    words[:] = ["new"]
    newer = checkpointer.save_checkpoint()
    raising[0] = True
    with torch.no_grad():
        model.weight.zero_()
    with pytest.raises(CheckpointError, match="'words' did not take its state") as caught:
        checkpointer.recover_if_possible()
    assert not isinstance(caught.value, CorruptCheckpointError)
    assert str(newer.path) in str(caught.value)
    # The newer checkpoint's model stayed; the older checkpoint was not loaded over it.
    assert_state_equal(model.state_dict(), torch.load(newer.paramfiles["model"], weights_only=True))
    assert older.path.exists()


# ---------------------------------------------------------------------------- averaging


def _tensor(value: object) -> torch.Tensor:
    assert isinstance(value, torch.Tensor)
    return value


class _Versioned(torch.nn.Linear):
    """A module with an ``_extra_state`` entry (a dict, not a tensor) in its state dict."""

    def __init__(self, version: int) -> None:
        super().__init__(2, 2)
        self.version = version

    def get_extra_state(self) -> dict[str, int]:
        return {"version": self.version}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.version = state["version"]


def test_average_checkpoints_takes_entries_that_are_not_tensors_from_the_last(
    tmp_path: Path,
) -> None:
    layer = _Versioned(1)
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Sequential(layer)})
    saved = []
    for version, value in ((1, 1.0), (2, 3.0)):
        layer.version = version
        with torch.no_grad():
            layer.weight.fill_(value)
        saved.append(checkpointer.save_checkpoint())

    averaged = average_checkpoints(saved, "model")

    assert averaged["0._extra_state"] == {"version": 2}
    assert torch.equal(_tensor(averaged["0.weight"]), torch.full((2, 2), 2.0))
    fresh = _Versioned(0)
    torch.nn.Sequential(fresh).load_state_dict(averaged)
    assert fresh.version == 2
    assert torch.equal(fresh.weight, torch.full((2, 2), 2.0))


def test_average_checkpoints_refuses_an_entry_that_is_a_tensor_in_one_only(tmp_path: Path) -> None:
    with_tensor = Checkpointer(tmp_path / "a", {"model": torch.nn.Linear(2, 2)}).save_checkpoint()
    holder = _Holder({"weight": {"not": "a tensor"}, "bias": torch.zeros(2)})
    without = Checkpointer(tmp_path / "b", {"model": holder}).save_checkpoint()
    with pytest.raises(
        CheckpointError, match=r"'weight' is a dict there and torch.float32 \(2, 2\) in the first"
    ):
        average_checkpoints([with_tensor, without], "model")


def test_average_checkpoints_averages_floating_tensors_and_keeps_the_last_counters(
    tmp_path: Path,
) -> None:
    norm = torch.nn.BatchNorm1d(2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), norm)
    checkpointer = Checkpointer(tmp_path, {"model": model})
    saved = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(value)
        assert norm.num_batches_tracked is not None
        norm.num_batches_tracked.fill_(int(value))
        saved.append(checkpointer.save_checkpoint())

    averaged = average_checkpoints(saved, "model")

    assert set(averaged) == set(model.state_dict())
    assert torch.equal(_tensor(averaged["0.weight"]), torch.full((2, 2), 3.0))
    assert _tensor(averaged["0.weight"]).dtype == torch.float32
    assert torch.equal(_tensor(averaged["1.num_batches_tracked"]), torch.tensor(6))
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    fresh.load_state_dict(averaged)


def test_average_checkpoints_averages_complex_tensors_too(tmp_path: Path) -> None:
    class Spectral(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))

    model = Spectral()
    checkpointer = Checkpointer(tmp_path, {"model": model})
    saved = []
    for value in (1 + 2j, 3 - 4j):
        with torch.no_grad():
            model.weight.fill_(value)
        saved.append(checkpointer.save_checkpoint())
    averaged = _tensor(average_checkpoints(saved, "model")["weight"])
    assert averaged.dtype == torch.complex64
    assert torch.equal(averaged, torch.full((2,), 2 - 1j, dtype=torch.complex64))


def test_average_checkpoints_refuses_mismatched_state_dicts(tmp_path: Path) -> None:
    first = Checkpointer(tmp_path / "a", {"model": torch.nn.Linear(2, 2)}).save_checkpoint()
    wider = Checkpointer(tmp_path / "b", {"model": torch.nn.Linear(2, 3)}).save_checkpoint()
    other = Checkpointer(
        tmp_path / "c", {"model": torch.nn.Linear(2, 2, bias=False)}
    ).save_checkpoint()
    with pytest.raises(CheckpointError, match=r"'weight' is torch.float32 \(3, 2\)"):
        average_checkpoints([first, wider], "model")
    with pytest.raises(CheckpointError, match=r"keys differ \(\['bias'\]\)"):
        average_checkpoints([first, other], "model")
    with pytest.raises(CheckpointError, match="no recoverable 'encoder'"):
        average_checkpoints([first], "encoder")
    with pytest.raises(CheckpointError, match="at least one"):
        average_checkpoints([], "model")


# ---------------------------------------------------------------------------- commit order


def test_a_failure_before_the_manifest_rename_commits_nothing_and_the_previous_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typedbrain import _manifest

    model = torch.nn.Linear(3, 3)
    checkpointer = Checkpointer(tmp_path, {"model": model, "counter": EpochCounter(3)})
    good = checkpointer.save_checkpoint()
    good_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    real_write = _manifest.write_temp_manifest
    seen: list[Path] = []

    def write_then_crash(folder: Path, text: str) -> Path:
        # Every data file is complete before the manifest is written...
        for name in ("model", "counter"):
            assert (folder / f"{name}.ckpt").stat().st_size > 0
        assert not (folder / "MANIFEST.json").exists()
        real_write(folder, text)
        seen.append(folder)
        # ...and the process dies before the rename.
        raise OSError("simulated crash before the manifest rename")

    monkeypatch.setattr(_manifest, "write_temp_manifest", write_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        checkpointer.save_checkpoint()
    monkeypatch.undo()

    assert len(seen) == 1
    assert checkpointer.list_checkpoints() == [good]
    fresh = torch.nn.Linear(3, 3)
    recovered = Checkpointer(tmp_path, {"model": fresh, "counter": EpochCounter(3)})
    assert recovered.recover_if_possible() == good
    assert_state_equal(fresh.state_dict(), good_state)


def test_save_and_keep_only_does_not_delete_when_the_save_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typedbrain import _manifest

    checkpointer = Checkpointer(tmp_path, {"counter": EpochCounter(3)})
    good = checkpointer.save_and_keep_only()

    def crash(folder: Path, text: str) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(_manifest, "write_temp_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save_and_keep_only(num_to_keep=0)
    assert checkpointer.list_checkpoints() == [good]


def test_save_hook_callables_are_typed(tmp_path: Path) -> None:
    # A typed per-object hook pair type-checks against the object's type (checked by mypy).
    def save(obj: dict[str, int], path: Path) -> None:
        path.write_text(json.dumps(obj))

    def load(obj: dict[str, int], path: Path, end_of_epoch: bool) -> None:
        obj.update(json.loads(path.read_text()))

    saver: Callable[[dict[str, int], Path], None] = save
    state = {"a": 1}
    checkpointer = Checkpointer(tmp_path)
    checkpointer.add_recoverable("state", state, custom_save_hook=saver, custom_load_hook=load)
    checkpointer.save_checkpoint()
    state["a"] = 5
    checkpointer.recover_if_possible()
    assert state == {"a": 1}


def test_restoring_on_a_gpu_keeps_tensors_saved_on_the_cpu_there_and_moves_the_others() -> None:
    """An optimizer keeps its step counts on the CPU; a resumed run must too (see test_cuda)."""
    assert _map_location(None, keep_cpu=True) is None
    assert _map_location("cpu", keep_cpu=True) == torch.device("cpu")
    assert _map_location("cuda:0", keep_cpu=False) == torch.device("cuda", 0)  # averaging: all
    # torch restores CPU storages to "cpu" only; "cpu:0" is the same device to a user.
    assert _map_location("cpu:0", keep_cpu=False) == torch.device("cpu")
    assert _map_location(torch.device("cpu", 0), keep_cpu=True) == torch.device("cpu")
    place = _map_location("cuda:0", keep_cpu=True)
    assert callable(place)
    # torch annotates map_location with its legacy Storage class; torch.load passes these.
    storage = cast("Storage", torch.ones(2).untyped_storage())
    assert place(storage, "cpu") is storage
    if torch.cuda.is_available():
        assert place(storage, "cuda:0").device == torch.device("cuda", 0)
    else:  # sent to the device, which this machine lacks
        with pytest.raises(RuntimeError, match="CUDA"):
            place(storage, "cuda:0")


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0)])
def test_a_checkpoint_recovers_and_averages_onto_cpu_0(
    tmp_path: Path, device: str | torch.device
) -> None:
    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(tmp_path, {"model": model})
    saved = checkpointer.save_checkpoint()
    fresh = torch.nn.Linear(2, 2)
    assert Checkpointer(tmp_path, {"model": fresh}).recover_if_possible(device=device) == saved
    assert_state_equal(fresh.state_dict(), model.state_dict())
    averaged = average_checkpoints([saved], "model", device=device)
    assert_state_equal(averaged, model.state_dict())


# ---------------------------------------------------------------------------- refused at saving


class _Holder:
    """A recoverable whose state is whatever it is given."""

    def __init__(self, state: object) -> None:
        self.state = state

    def state_dict(self) -> object:
        return self.state

    def load_state_dict(self, state: object) -> None:
        self.state = state


class _ProxyCounter:
    """A ``Stateful`` whose ``state_dict`` returns a read-only mapping, not a dict."""

    def __init__(self, count: int) -> None:
        self.count = count

    def state_dict(self) -> Mapping[str, object]:
        return types.MappingProxyType({"count": self.count, "weights": torch.ones(2)})

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        self.count = state["count"]


def test_a_state_dict_that_is_a_mapping_but_not_a_dict_is_saved_as_a_dict(tmp_path: Path) -> None:
    saved: Stateful = _ProxyCounter(7)  # the protocol promises any Mapping: the case
    checkpoint = Checkpointer(tmp_path, {"counter": saved}).save_checkpoint()
    stored = torch.load(checkpoint.paramfiles["counter"], weights_only=True)
    assert type(stored) is dict
    assert_state_equal(stored, {"count": 7, "weights": torch.ones(2)})
    restored = _ProxyCounter(0)
    Checkpointer(tmp_path, {"counter": restored}).recover_if_possible()
    assert restored.count == 7


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            {"rng": ("MT19937", np.zeros(3, dtype=np.uint32))},
            r"recoverable 'holder': state\['rng'\]\[1\] is a ndarray .*loading with "
            r"weights_only=True refuses \(Unsupported global: GLOBAL numpy.*\), so no checkpoint "
            r"of it could be loaded; nothing was saved",
        ),
        ({"step": np.int64(3)}, r"state\['step'\] is a int64 "),
        (
            [1, 2],
            r"recoverable 'holder': its state_dict\(\) returned a list, not a mapping; "
            "nothing was saved",
        ),
    ],
)
def test_a_state_that_loading_would_refuse_is_refused_at_saving_and_the_previous_is_kept(
    tmp_path: Path, state: object, message: str
) -> None:
    holder = _Holder({"step": 1})
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2), "holder": holder})
    good = checkpointer.save_and_keep_only()
    holder.state = state
    with pytest.raises(CheckpointError, match=message):
        checkpointer.save_and_keep_only(num_to_keep=0)
    # Nothing half-written is left, nothing was deleted, and what is there still loads.
    assert entries(tmp_path) == [good.path.name]
    fresh = _Holder({})
    assert (
        Checkpointer(
            tmp_path, {"model": torch.nn.Linear(2, 2), "holder": fresh}
        ).recover_if_possible()
        == good
    )
    assert fresh.state == {"step": 1}


def test_an_error_from_a_state_dict_keeps_its_type_and_names_the_recoverable(
    tmp_path: Path,
) -> None:
    class Failing:
        def state_dict(self) -> dict[str, object]:
            raise RuntimeError("no state today")

        def load_state_dict(self, state: dict[str, object]) -> None:
            pass

    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(2, 2), "aux": Failing()})
    with pytest.raises(RuntimeError, match="no state today") as caught:
        checkpointer.save_checkpoint()
    assert caught.value.__notes__ == ["(while taking the state of recoverable 'aux')"]
    assert entries(tmp_path) == []


def test_an_error_from_a_save_hook_keeps_its_type_and_names_the_recoverable(
    tmp_path: Path,
) -> None:
    def save(obj: dict[str, int], path: Path) -> None:
        raise ValueError("cannot write that")

    def load(obj: dict[str, int], path: Path, end_of_epoch: bool) -> None:
        pass

    checkpointer = Checkpointer(tmp_path)
    checkpointer.add_recoverable("table", {"a": 1}, custom_save_hook=save, custom_load_hook=load)
    with pytest.raises(ValueError, match="cannot write that") as caught:
        checkpointer.save_checkpoint()
    assert caught.value.__notes__ == ["(while saving recoverable 'table' with its save hook)"]
    assert entries(tmp_path) == []


def test_a_full_disk_while_torch_save_writes_is_an_oserror_naming_the_file_and_recoverable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from typedbrain import _manifest

    checkpointer = Checkpointer(
        tmp_path, {"small": torch.nn.Linear(2, 2), "big": torch.nn.Linear(600, 600)}
    )
    good = checkpointer.save_checkpoint()
    real_write = _manifest.HashingWriter.write
    written = 0

    def write_until_full(
        self: _manifest.HashingWriter, data: bytes | bytearray | memoryview
    ) -> int:
        nonlocal written
        written += memoryview(data).nbytes
        if written > 500_000:  # in the middle of the big file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(_manifest.HashingWriter, "write", write_until_full)
    with pytest.raises(OSError, match=r"No space left on device \(recoverable 'big'\)") as caught:
        checkpointer.save_checkpoint()
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename is not None
    assert Path(caught.value.filename).name == "big.ckpt"
    assert checkpointer.list_checkpoints() == [good]
    assert entries(tmp_path) == [good.path.name]


# ---------------------------------------------------------------------------- refused at loading


def _save_with_a_hook_writing(folder: Path, text: str) -> None:
    """Save a checkpoint whose "model" file a custom save hook wrote as ``text``."""

    def save(obj: torch.nn.Module, path: Path) -> None:
        path.write_text(text)

    def load(obj: torch.nn.Module, path: Path, end_of_epoch: bool) -> None:
        pass

    checkpointer = Checkpointer(folder)
    checkpointer.add_recoverable(
        "model", torch.nn.Linear(1, 1), custom_save_hook=save, custom_load_hook=load
    )
    checkpointer.save_checkpoint()


def test_a_file_no_torch_save_wrote_is_refused_in_one_line_without_torchs_advice(
    tmp_path: Path,
) -> None:
    """A custom save hook's file, read back by the default loader once the hook is gone."""
    _save_with_a_hook_writing(tmp_path, "plain text, not a torch file")
    with pytest.raises(CheckpointError) as caught:
        Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1)}).recover_if_possible()
    message = str(caught.value)
    assert "model.ckpt" in message
    assert "Unsupported operand" in message
    assert "\x1b" not in message
    assert "weights_only` set to `False" not in message


def test_a_file_that_is_not_a_pickle_at_all_is_a_checkpoint_error_naming_it(
    tmp_path: Path,
) -> None:
    _save_with_a_hook_writing(tmp_path, "hello")  # torch.load raises a bare KeyError on this
    with pytest.raises(
        CheckpointError, match=r"cannot load model.ckpt of checkpoint .*not by torch.save"
    ):
        Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1)}).recover_if_possible()


# ---------------------------------------------------------------------------- the guide


def test_the_checkpoints_guide_examples_run_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    *single_process, distributed = python_blocks("docs/checkpoints.md")
    assert "local_rank" in distributed  # a fragment of a torchrun script: not run here
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for number, block in enumerate(single_process, 1):
        exec(compile(block, f"checkpoints.md, example {number}", "exec"), namespace)
    counter = namespace["counter"]
    assert isinstance(counter, EpochCounter)
    assert counter.current == counter.limit
    # The end-of-epoch checkpoint kept by the loop's policy, and the intra-epoch one saved by
    # the predicate example, which that policy does not count.
    kept = Checkpointer(tmp_path / "results" / "save").list_checkpoints()
    assert [checkpoint.end_of_epoch for checkpoint in kept] == [True, False]


def test_a_checkpoint_without_recoverables_holds_only_meta_and_is_recovered(
    tmp_path: Path,
) -> None:
    saved = Checkpointer(tmp_path).save_checkpoint(meta={"loss": 0.5})
    assert saved.files == {}
    recovered = Checkpointer(tmp_path).recover_if_possible()
    assert recovered is not None
    assert recovered == saved
    assert recovered.meta == {"loss": 0.5}


def test_hidden_entries_in_the_checkpoints_folder_are_ignored_without_a_warning(
    tmp_path: Path,
) -> None:
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1)})
    saved = checkpointer.save_checkpoint()
    (tmp_path / ".trash").mkdir()
    (tmp_path / ".trash" / "notes.txt").write_text("not a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Checkpointer(tmp_path).list_checkpoints() == [saved]
    assert (tmp_path / ".trash").is_dir()


def test_a_module_built_in_another_dtype_than_its_checkpoint_loads_with_a_resume_warning(
    tmp_path: Path,
) -> None:
    saved = torch.nn.Linear(2, 2).double()
    Checkpointer(tmp_path, {"model": saved}).save_checkpoint()
    other_dtype = torch.nn.Linear(2, 2)  # float32: another default dtype when it was built
    with pytest.warns(
        ResumeWarning,
        match=r"2 of its tensors .* \(first 'weight': torch.float64 into torch.float32",
    ):
        Checkpointer(tmp_path, {"model": other_dtype}).recover_if_possible()
    assert torch.equal(other_dtype.weight, saved.weight.float())  # cast, as torch does
    same_dtype = torch.nn.Linear(2, 2).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Checkpointer(tmp_path, {"model": same_dtype}).recover_if_possible()

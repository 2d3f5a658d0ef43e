"""Debug mode checkpoints into a throwaway folder unless ``debug_persistently`` is set."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest

import typedbrain as tb
from tests.fakes import RecordingCheckpointer
from tests.helpers import LOADER, examples, regression_brain

DEBUG: tb.RunOptionsDict = {"debug": True, "debug_batches": 3, "debug_epochs": 2}


def _committed(folder: Path) -> list[Path]:
    return list(folder.glob("*/MANIFEST.json")) if folder.is_dir() else []


def _train(checkpointer: tb.Checkpointer, run_opts: tb.RunOptionsDict) -> tb.Checkpointer:
    """A short fit that saves an intra-epoch checkpoint every batch and one of its own."""
    brain = regression_brain(
        run_opts={**run_opts, "ckpt_interval_steps": 1}, checkpointer=checkpointer
    )
    brain.fit(range(1, 3), examples(32), train_loader_kwargs=LOADER)
    checkpointer.save_checkpoint(meta={"by": "the recipe"})
    return checkpointer


def test_a_debug_run_writes_nothing_to_the_real_checkpoint_folder(tmp_path: Path) -> None:
    real = tmp_path / "save"
    checkpointer = _train(tb.Checkpointer(real), DEBUG)
    assert checkpointer.checkpoints_dir != real
    assert checkpointer.checkpoints_dir.parent == tmp_path
    assert checkpointer.checkpoints_dir.name.startswith(".save-debug-")
    assert len(_committed(checkpointer.checkpoints_dir)) == 2  # the brain's and the recipe's
    assert _committed(real) == []


def test_a_debug_run_does_not_recover_from_the_real_checkpoint_folder(tmp_path: Path) -> None:
    real = tmp_path / "save"
    finished = tb.EpochCounter(limit=2)
    earlier = tb.Checkpointer(real, {"counter": finished})
    regression_brain(checkpointer=earlier).fit(finished, examples(16), train_loader_kwargs=LOADER)
    earlier.save_checkpoint()  # as a recipe's on_stage_end would
    assert _committed(real)

    counter = tb.EpochCounter(limit=2)
    brain = regression_brain(
        run_opts=DEBUG, checkpointer=tb.Checkpointer(real, {"counter": counter})
    )
    brain.fit(counter, examples(32), train_loader_kwargs=LOADER)
    # Recovering the finished run would have left no epoch to train.
    assert brain.optimizer_step == 2 * 3  # debug_epochs x debug_batches, from scratch
    assert counter.current == 2


def test_a_second_brain_on_the_same_checkpointer_gets_a_folder_beside_the_real_one(
    tmp_path: Path,
) -> None:
    checkpointer = tb.Checkpointer(tmp_path / "save")
    first = regression_brain(run_opts=DEBUG, checkpointer=checkpointer)
    first_folder = checkpointer.checkpoints_dir
    second = regression_brain(run_opts=DEBUG, checkpointer=checkpointer)
    assert checkpointer.checkpoints_dir != first_folder
    assert checkpointer.checkpoints_dir.parent == tmp_path
    assert checkpointer.checkpoints_dir.name.startswith(".save-debug-")
    assert first is not second


def test_the_debug_folder_is_removed_when_brain_and_checkpointer_are_collected(
    tmp_path: Path,
) -> None:
    checkpointer = tb.Checkpointer(tmp_path / "save")
    brain = regression_brain(run_opts=DEBUG, checkpointer=checkpointer)
    brain.fit(range(1, 2), examples(16), train_loader_kwargs=LOADER)
    temporary = checkpointer.checkpoints_dir
    checkpointer.save_checkpoint()
    assert temporary.is_dir()
    del brain
    gc.collect()
    assert temporary.is_dir()  # the checkpointer still uses it
    del checkpointer
    gc.collect()
    assert not temporary.exists()


def test_debug_persistently_keeps_the_checkpoints_in_the_real_folder(tmp_path: Path) -> None:
    real = tmp_path / "save"
    checkpointer = tb.Checkpointer(real)
    options: tb.RunOptionsDict = {**DEBUG, "debug_persistently": True}
    _train(checkpointer, options)
    assert checkpointer.checkpoints_dir == real
    assert _committed(real)
    assert [entry.name for entry in tmp_path.iterdir()] == ["save"]


def test_without_debug_mode_the_checkpointer_is_left_where_it_points(tmp_path: Path) -> None:
    real = tmp_path / "save"
    checkpointer = tb.Checkpointer(real)
    _train(checkpointer, {})
    assert checkpointer.checkpoints_dir == real
    assert _committed(real)


def test_a_checkpointer_that_cannot_be_redirected_is_warned_about(tmp_path: Path) -> None:
    with pytest.warns(
        UserWarning, match="debug mode cannot send the checkpoints of a RecordingCheckpointer"
    ) as caught:
        regression_brain(run_opts=DEBUG, checkpointer=RecordingCheckpointer())
    assert Path(caught[0].filename).name == "helpers.py"  # points at the Brain(...) call


def test_a_debug_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    real = tmp_path / "results" / "save"
    checkpointer = tb.Checkpointer(real)  # (a Checkpointer under a file is refused itself)
    (tmp_path / "results").write_text("a file where the experiment folder should be")
    expected = f"could not create a temporary checkpoint folder beside {real}"
    with pytest.raises(tb.CheckpointError, match=re.escape(expected)):
        regression_brain(run_opts=DEBUG, checkpointer=checkpointer)


@pytest.mark.parametrize(
    ("built_with", "change"),
    [
        ({}, {"debug": True}),
        (DEBUG, {"debug": False}),
        (DEBUG, {"debug_persistently": True}),
        ({"debug": True, "debug_persistently": True}, {"debug_persistently": False}),
    ],
)
def test_a_change_that_would_move_the_checkpoints_is_refused_once_the_brain_is_built(
    tmp_path: Path, built_with: tb.RunOptionsDict, change: dict[str, bool]
) -> None:
    checkpointer = tb.Checkpointer(tmp_path / "save")
    brain = regression_brain(run_opts=built_with, checkpointer=checkpointer)
    folder = checkpointer.checkpoints_dir
    name, value = next(iter(change.items()))
    with pytest.raises(tb.ConfigurationError, match=r"cannot be set once the brain is built"):
        setattr(brain, name, value)
    assert getattr(brain, name) is not value
    assert checkpointer.checkpoints_dir == folder


def test_debug_changes_that_move_no_checkpoints_are_allowed(tmp_path: Path) -> None:
    brain = regression_brain(checkpointer=tb.Checkpointer(tmp_path / "save"))
    brain.debug_persistently = True  # not in debug mode: nothing moves
    brain.debug = True  # debug, persistently: the real folder still
    assert brain.debug
    assert brain.debug_persistently
    without = regression_brain()  # no checkpointer: nothing to move
    without.debug = True
    assert without.debug

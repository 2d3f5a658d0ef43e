"""A Brain whose Checkpointer commits in the background: fit waits, fails and stops as it must.

The checkpointer's side of the mode is tested in the checkpoint tests; these are about ``fit``:
it lets the last commit end before it returns or raises, raises a commit's failure, and
notes one on an error of its own. The disk is ``os.fsync`` patched (see :class:`Disk`): it
holds or fails the sync of one checkpoint's model file, which the commit's thread does.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import warnings
from pathlib import Path

import attrs
import pytest
from torch import Tensor, nn

import typedbrain as sb
from tests import resume_harness
from tests.helpers import LOADER, Batch, RegressionBrain, examples, sgd
from tests.resume_harness import HarnessBrain, RunConfig, differences, final_state, run
from typedbrain import Checkpointer, Phase, Stage, _brain, _checkpoint

_real_fsync = os.fsync

# No interval checkpoints: the run saves once per epoch, at the end of its validation.
TWO_SAVES = RunConfig(data_seed=2, ckpt_interval_steps=100, commit_in_background=True)


class Disk:
    """``os.fsync`` for a checkpoints folder: it can fail or hold one checkpoint's model file.

    The ``n``-th checkpoint's ``model.ckpt`` is the ``n``-th synced (commits never overlap).

    Args:
        folder: the checkpoints folder.
        fail: the sync of this checkpoint's model file (from 1) raises ENOSPC.
        hold: the sync of this checkpoint's model file waits until :attr:`released` is set.
        release_after: then set :attr:`released` this many seconds after the sync began.
    """

    def __init__(
        self,
        folder: Path,
        *,
        fail: int | None = None,
        hold: int | None = None,
        release_after: float | None = None,
    ) -> None:
        self.folder = folder
        self.fail = fail
        self.hold = hold
        self.release_after = release_after
        self.synced: list[Path] = []  # the model files synced (or failing), in order
        self.raised: OSError | None = None
        self.held_in = ""  # the name of the thread whose sync was held
        self.entered = threading.Event()  # the held sync began
        self.released = threading.Event()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make this the ``os.fsync`` the library calls."""
        monkeypatch.setattr(os, "fsync", self.fsync)

    def fsync(self, descriptor: int) -> None:
        """Sync ``descriptor``, failing or holding it first if it is the chosen model file."""
        path = self._model_file(descriptor)
        if path is not None:
            self.synced.append(path)
            if len(self.synced) == self.fail:
                self.raised = OSError(errno.ENOSPC, "No space left on device")
                raise self.raised
            if len(self.synced) == self.hold:
                self.held_in = threading.current_thread().name
                self.entered.set()
                if self.release_after is not None:
                    threading.Timer(self.release_after, self.released.set).start()
                self.released.wait(timeout=30)  # a bug must not hang the suite
        _real_fsync(descriptor)

    def _model_file(self, descriptor: int) -> Path | None:
        """The ``model.ckpt`` of a checkpoint in the folder that ``descriptor`` is open on."""
        opened = os.fstat(descriptor)
        if not stat.S_ISREG(opened.st_mode):
            return None
        for candidate in self.folder.glob("*/model.ckpt"):
            try:
                found = candidate.stat()
            except FileNotFoundError:  # deleted by a keep policy as we looked
                continue
            if (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino):
                return candidate
        return None


def committed(folder: Path) -> list[Path]:
    """The checkpoint folders in ``folder`` with a manifest, read from the disk directly."""
    return sorted(manifest.parent for manifest in folder.glob("*/MANIFEST.json"))


def folders_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir())


def record_brains(monkeypatch: pytest.MonkeyPatch) -> list[HarnessBrain]:
    """The brains the harness's ``run`` builds from now on (to look at one that raised)."""
    built: list[HarnessBrain] = []
    real_build = resume_harness.build

    def build(
        config: RunConfig, folder: Path, *, seed: int
    ) -> tuple[HarnessBrain, sb.EpochCounter]:
        brain, counter = real_build(config, folder, seed=seed)
        built.append(brain)
        return brain, counter

    monkeypatch.setattr(resume_harness, "build", build)
    return built


def test_fit_returns_once_its_last_checkpoint_is_committed_and_ends_as_in_the_default_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Interval checkpoints too: their keep policy's deletions run in the background as well.
    config = RunConfig(data_seed=2, ckpt_interval_steps=2)
    counting = Disk(tmp_path / "default")
    counting.install(monkeypatch)
    expected = final_state(run(config, tmp_path / "default"))
    saves = len(counting.synced)
    assert saves > 2

    folder = tmp_path / "background"
    disk = Disk(folder, hold=saves)  # the commit of the last checkpoint fit saves
    disk.install(monkeypatch)
    outcome: list[HarnessBrain | BaseException] = []

    def fit() -> None:
        try:
            outcome.append(run(attrs.evolve(config, commit_in_background=True), folder))
        except BaseException as error:  # handed to the test's thread
            outcome.append(error)

    fitting = threading.Thread(target=fit)
    fitting.start()
    try:
        assert disk.entered.wait(timeout=30)
        fitting.join(timeout=0.3)
        assert fitting.is_alive()  # the last save returned; fit waits for its commit
    finally:
        disk.released.set()
        fitting.join(timeout=60)
    [brain] = outcome
    assert isinstance(brain, HarnessBrain)
    state = final_state(brain)
    assert disk.held_in.startswith("typedbrain-commit")  # it was committed in the background
    assert len(disk.synced) == saves
    last = disk.synced[-1].parent
    assert last in committed(folder)
    assert last in [checkpoint.path for checkpoint in Checkpointer(folder).list_checkpoints()]
    assert brain.phase is Phase.IDLE
    assert differences(expected, state) == []


@pytest.mark.parametrize(
    "failing", [1, 2], ids=["raised by the next save", "raised by the wait at the end"]
)
def test_a_commit_failing_during_fit_is_raised_by_fit_which_fails_and_removes_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    built = record_brains(monkeypatch)
    disk = Disk(tmp_path, fail=failing)
    disk.install(monkeypatch)
    with pytest.raises(OSError, match="No space left on device") as caught:
        run(TWO_SAVES, tmp_path)
    error = caught.value
    assert error.__cause__ is disk.raised  # the failure, naming the file (see naming_file)
    assert error.errno == errno.ENOSPC
    failed = disk.synced[-1]
    assert error.filename == str(failed)
    notes = getattr(error, "__notes__", [])
    assert f"(while committing checkpoint {failed.parent} in the background" in notes[-1]
    assert not any("committing a checkpoint in the background failed" in n for n in notes)
    [brain] = built
    assert brain.phase is Phase.FAILED
    # The failed folder is gone; no save went on after it (the next one raised as it began).
    assert len(disk.synced) == failing
    kept = [model.parent for model in disk.synced[:-1]]
    assert folders_in(tmp_path) == committed(tmp_path) == kept
    brain.ckpt.wait()  # raised once


def test_a_stop_by_signal_commits_its_checkpoint_before_fit_raises_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "stopped"
    config = attrs.evolve(TWO_SAVES, signal_at=3)  # in the first epoch's training
    disk = Disk(folder, hold=1, release_after=0.5)  # the stop's checkpoint, committed slowly
    disk.install(monkeypatch)
    with pytest.raises(sb.TrainingInterruptedError) as caught:
        run(config, folder)
    assert disk.released.is_set()  # fit raised once the commit could go on: it waited
    assert committed(folder) == [disk.synced[0].parent]
    assert caught.value.checkpoint_saved
    assert disk.held_in.startswith("typedbrain-commit")
    monkeypatch.undo()
    [saved] = Checkpointer(folder).list_checkpoints()
    assert (saved.meta, saved.phase) == ({sb.INTRA_EPOCH_CKPT_FLAG: True}, "CHECKPOINT")
    resumed = final_state(run(attrs.evolve(config, signal_at=None), folder))
    straight = attrs.evolve(config, signal_at=None, commit_in_background=False)
    expected = final_state(run(straight, tmp_path / "straight"))
    assert differences(expected, resumed) == []


@pytest.mark.parametrize("background", [False, True], ids=["default", "background"])
def test_a_stop_whose_keep_policy_warning_is_made_an_error_raises_it_as_in_the_default_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    def refused(checkpoint: sb.Checkpoint) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(checkpoint.path))

    monkeypatch.setattr(_checkpoint, "_delete_folder", refused)
    folder = tmp_path / "stopped"
    # A checkpoint after step 2; the stop's, after step 3, cannot delete it.
    config = attrs.evolve(
        TWO_SAVES, ckpt_interval_steps=2, signal_at=3, commit_in_background=background
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", sb.CheckpointWarning)
        with pytest.raises(sb.CheckpointWarning, match="could not delete checkpoint"):
            run(config, folder)
    assert len(committed(folder)) == 2  # the stop's checkpoint was committed all the same


class _LossFailsAtStep3(RegressionBrain):
    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        if stage is Stage.TRAIN and self.step == 3:
            raise RuntimeError("the loss of step 3 cannot be computed")
        return super().compute_objectives(predictions, batch, stage)


def _failing_at_step3(folder: Path) -> tuple[_LossFailsAtStep3, Checkpointer]:
    """A brain saving every 2 steps into ``folder``, in the background, failing at step 3."""
    model = nn.Linear(4, 2)
    checkpointer = Checkpointer(folder, {"model": model}, commit_in_background=True)
    brain = _LossFailsAtStep3(
        modules={"model": model},
        opt_class=sgd(),
        run_opts={"noprogressbar": True, "ckpt_interval_steps": 2},
        checkpointer=checkpointer,
    )
    return brain, checkpointer


def test_an_error_of_fit_carries_a_note_when_a_commit_in_the_background_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(tmp_path, fail=1)  # the checkpoint saved after step 2
    disk.install(monkeypatch)
    brain, checkpointer = _failing_at_step3(tmp_path)
    with pytest.raises(RuntimeError, match="step 3 cannot be computed") as caught:
        brain.fit(range(1, 3), examples(16), train_loader_kwargs=LOADER)
    assert type(caught.value) is RuntimeError  # the original error, not the commit's
    [note] = caught.value.__notes__
    assert note.startswith("(and committing a checkpoint in the background failed: OSError: ")
    assert "No space left on device" in note
    assert str(disk.synced[0]) in note
    assert brain.phase is Phase.FAILED
    assert folders_in(tmp_path) == []  # the uncommitted folder was removed
    checkpointer.wait()  # the failure was handed over once, in the note


def test_a_stop_whose_commit_fails_says_that_no_checkpoint_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "stopped"
    disk = Disk(folder, fail=1)  # the stop's checkpoint: its commit meets a full disk
    disk.install(monkeypatch)
    with pytest.raises(sb.TrainingInterruptedError) as caught:
        run(attrs.evolve(TWO_SAVES, signal_at=3), folder)
    assert not caught.value.checkpoint_saved
    assert "no checkpoint was saved" in str(caught.value)
    cause = caught.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.errno == errno.ENOSPC
    [note] = caught.value.__notes__
    assert note.startswith("(its checkpoint was not committed: OSError: ")
    assert committed(folder) == []


def test_an_interrupt_while_a_failing_fit_waits_for_its_commit_leaves_the_brain_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(checkpointer: Checkpointer) -> BaseException | None:
        raise KeyboardInterrupt  # a second Ctrl-C, while fit waits on its way out

    monkeypatch.setattr(_brain, "finish_background_commit", interrupted)
    brain, checkpointer = _failing_at_step3(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        brain.fit(range(1, 3), examples(16), train_loader_kwargs=LOADER)
    assert brain.phase is Phase.FAILED
    checkpointer.wait()
    assert len(committed(tmp_path)) == 1  # the checkpoint after step 2

"""Killed (SIGKILL) or stopped (SIGTERM) in a separate process, a run resumes exactly."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import pytest
import torch
from torch import Tensor

import typedbrain as sb
from tests.helpers import LOADER, Batch, RegressionBrain, examples, sgd
from tests.resume_harness import (
    RunConfig,
    SimulatedCrashError,
    differences,
    final_state,
    run,
)
from typedbrain._checkpoint import Checkpointer
from typedbrain._state import converter

ROOT = Path(__file__).resolve().parent.parent

# Long enough to be killed part way (about 150 batches and 50 checkpoints), short enough to
# run several times.
LONG = RunConfig(
    data_seed=7,
    samples=200,
    batch_size=4,
    epochs=3,
    accumulation=2,
    dropout=0.3,
    augment=True,
    ckpt_interval_steps=3,
)


def start(
    config: RunConfig, folder: Path, out: Path, *, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The resume worker on ``folder`` in a new process (with ``env`` added to this one's)."""
    config_path = folder.parent / "config.json"
    config_path.write_text(json.dumps(converter.unstructure(config)))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.resume_worker", str(config_path), str(folder), str(out)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr.decode(errors="replace")


def committed(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/MANIFEST.json")) if folder.exists() else []


def saves_so_far(folder: Path) -> int:
    """The sequence number of the newest committed checkpoint in ``folder`` (0 if none)."""
    sequences = [0]
    for manifest in committed(folder):
        try:
            sequences.append(int(json.loads(manifest.read_text())["sequence"]))
        except (OSError, ValueError, KeyError):
            continue  # deleted or being replaced as we read it
    return max(sequences)


def kill_after_saves(
    process: subprocess.Popen[bytes], folder: Path, saves: int, jitter: float
) -> bool:
    """SIGKILL ``process`` ``jitter`` seconds after ``saves`` more checkpoints are committed.

    Progress, not elapsed time, decides when, so the kill lands inside the run however fast
    the machine is. Returns False when the process ended first.
    """
    target = saves_so_far(folder) + saves
    while saves_so_far(folder) < target:
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    time.sleep(jitter)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def load(path: Path) -> dict[str, object]:
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict)
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final state of the LONG run never stopped (computed once for the tests below)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    code, stderr = finish(start(LONG, folder / "ckpt", folder / "straight.pt"))
    assert code == 0, stderr
    return folder / "straight.pt"


# Committing in the background changes no saved value: the uninterrupted reference is the
# same. A kill then also lands while a commit runs in its thread, after the save returned.
BACKGROUND = pytest.mark.parametrize(
    "background", [False, True], ids=["commit in save", "commit in background"]
)


@BACKGROUND
def test_run_killed_many_times_at_random_moments_ends_identical(
    tmp_path: Path, uninterrupted: Path, background: bool
) -> None:
    config = attrs.evolve(LONG, commit_in_background=background)
    chooser = random.Random(20261125)
    folder = tmp_path / "killed" / "ckpt"
    folder.parent.mkdir()
    out = tmp_path / "killed.pt"
    kills = 0
    while kills < 8:
        process = start(config, folder, out)
        # Anywhere after 1 to 4 more saves: between batches, in validation, inside a save.
        if not kill_after_saves(process, folder, chooser.randint(1, 4), chooser.uniform(0, 0.05)):
            finish(process)
            break
        kills += 1
    code, stderr = finish(start(config, folder, out)) if not out.exists() else (0, "")
    assert code == 0, stderr
    assert kills == 8, "the run finished before it could be killed 8 times"
    assert differences(load(uninterrupted), load(out)) == []


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one_exactly(
    tmp_path: Path, uninterrupted: Path
) -> None:
    folder = tmp_path / "killed" / "ckpt"
    folder.parent.mkdir()
    out = tmp_path / "killed.pt"
    code, _ = finish(start(attrs.evolve(LONG, kill_at_save=5), folder, out))
    assert code == -signal.SIGKILL
    half_written = [
        path for path in folder.iterdir() if path.is_dir() and not (path / "MANIFEST.json").exists()
    ]
    assert len(half_written) == 1
    assert sorted(p.name for p in half_written[0].iterdir()) == [
        "counter.ckpt",
        "log.ckpt",
        "model.ckpt",
    ]
    assert len(committed(folder)) >= 1
    code, stderr = finish(start(LONG, folder, out))
    assert code == 0, stderr
    assert half_written[0].name in stderr  # reported as uncommitted, and skipped
    assert differences(load(uninterrupted), load(out)) == []


@BACKGROUND
def test_sigterm_saves_a_checkpoint_and_exits_143_then_the_run_resumes_exactly(
    tmp_path: Path, uninterrupted: Path, background: bool
) -> None:
    config = attrs.evolve(LONG, commit_in_background=background)
    folder = tmp_path / "stopped" / "ckpt"
    folder.parent.mkdir()
    out = tmp_path / "stopped.pt"
    process = start(config, folder, out)
    deadline = time.monotonic() + 120
    while not committed(folder) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    code, stderr = finish(process)
    assert code == 128 + signal.SIGTERM, stderr
    assert "training stopped by signal 15; a checkpoint was saved" in stderr
    assert not out.exists()
    # The stop's checkpoint, as every other, was committed before the process exited.
    folders = sorted(path for path in folder.iterdir() if path.is_dir())
    assert [path / "MANIFEST.json" for path in folders] == committed(folder)
    code, stderr = finish(start(config, folder, out))
    assert code == 0, stderr
    assert differences(load(uninterrupted), load(out)) == []


def test_a_signal_in_training_stops_after_the_batch_with_a_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    config = RunConfig(data_seed=1, ckpt_interval_steps=100, signal_at=3)  # no interval saves
    with pytest.raises(sb.TrainingInterruptedError) as caught, caplog.at_level(logging.INFO):
        run(config, tmp_path / "stopped")
    assert (caught.value.signal, caught.value.code) == (signal.SIGTERM, 143)
    assert caught.value.checkpoint_saved
    assert signal.getsignal(signal.SIGTERM) is before  # fit put the handler back
    checkpoints = Checkpointer(tmp_path / "stopped").list_checkpoints()
    assert [c.meta for c in checkpoints] == [{"typedbrain_intra_epoch": True}]
    assert checkpoints[0].phase == "CHECKPOINT"
    # The folder a restart resumes from is named (intra-epoch saves are logged at DEBUG).
    assert f"saved a checkpoint to stop: {checkpoints[0].path}" in caplog.messages
    resumed = run(attrs.evolve(config, signal_at=None), tmp_path / "stopped")
    expected = run(attrs.evolve(config, signal_at=None), tmp_path / "straight")
    assert differences(final_state(expected), final_state(resumed)) == []


def test_a_recipes_except_exception_does_not_swallow_a_stop(tmp_path: Path) -> None:
    # A catch-all around fit, to log and go on, must let a preemption through, as it lets
    # KeyboardInterrupt and SystemExit through.
    config = RunConfig(data_seed=1, ckpt_interval_steps=100, signal_at=3)

    def recipe() -> str:
        try:
            run(config, tmp_path / "stopped")
        except Exception:  # the recipe's catch-all: the case
            return "went on"
        return "finished"

    with pytest.raises(sb.TrainingInterruptedError):
        recipe()
    assert not issubclass(sb.TrainingInterruptedError, Exception)
    assert issubclass(sb.TrainingInterruptedError, SystemExit)


def test_a_signal_in_validation_stops_after_the_batch_without_a_new_checkpoint(
    tmp_path: Path,
) -> None:
    # 24 samples in batches of 4: 6 training passes, then validation from pass 7 on.
    config = RunConfig(data_seed=1, ckpt_interval_steps=100, signal_at=8)
    with pytest.raises(sb.TrainingInterruptedError) as caught:
        run(config, tmp_path / "stopped")
    assert not caught.value.checkpoint_saved
    assert "resumes from the last committed checkpoint" in str(caught.value)
    assert Checkpointer(tmp_path / "stopped").list_checkpoints() == []


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_checkpoint_saved_from_on_fit_batch_end_resumes_exactly(
    accumulation: int, tmp_path: Path
) -> None:
    # 24 samples in batches of 4: 6 training passes per epoch. The recipe saves after pass 3
    # (mid-accumulation with 2) and the run crashes at pass 5.
    config = RunConfig(
        data_seed=3, ckpt_interval_steps=100, accumulation=accumulation, user_save_at=3
    )
    with pytest.raises(SimulatedCrashError):
        run(config, tmp_path / "crashed", stop_at=5)
    saved = Checkpointer(tmp_path / "crashed").list_checkpoints()
    assert [c.meta for c in saved] == [{"by": "on_fit_batch_end"}]
    resumed = run(config, tmp_path / "crashed")
    expected = run(config, tmp_path / "straight")
    assert differences(final_state(expected), final_state(resumed)) == []


class _SignalsAtTheEnd(RegressionBrain):
    """Sends itself SIGTERM in the last hook of fit, once no batch is left to see it."""

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is sb.Stage.VALID and epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_after_the_last_batch_still_ends_fit_with_the_interruption() -> None:
    brain = _SignalsAtTheEnd(
        modules={"model": torch.nn.Linear(4, 2)},
        opt_class=sgd(),
        run_opts={"noprogressbar": True},
    )
    with pytest.raises(sb.TrainingInterruptedError) as caught:
        brain.fit(range(1, 3), examples(8), examples(4), train_loader_kwargs=LOADER)
    assert caught.value.signal == signal.SIGTERM
    assert not caught.value.checkpoint_saved
    assert brain.optimizer_step == 2 * 2  # both epochs trained in full


class _SignalsInBatch2(RegressionBrain):
    def compute_forward(self, batch: Batch, stage: sb.Stage) -> Tensor:
        if stage is sb.Stage.TRAIN and self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().compute_forward(batch, stage)


class _SignalsTwiceInBatch2(RegressionBrain):
    def compute_forward(self, batch: Batch, stage: sb.Stage) -> Tensor:
        if stage is sb.Stage.TRAIN and self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return super().compute_forward(batch, stage)


def test_a_second_sigterm_while_stopping_says_so_and_the_stop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    brain = _SignalsTwiceInBatch2(
        modules={"model": torch.nn.Linear(4, 2)}, opt_class=sgd(), run_opts={"noprogressbar": True}
    )
    with (
        caplog.at_level("WARNING", logger="typedbrain"),
        pytest.raises(sb.TrainingInterruptedError),
    ):
        brain.fit(range(1, 3), examples(8), train_loader_kwargs=LOADER)
    assert "received SIGTERM again: already stopping after the current batch" in caplog.text
    assert brain.optimizer_step == 2


class _CountsSaves:
    saves = 0

    def state_dict(self) -> dict[str, object]:
        self.saves += 1
        return {}

    def load_state_dict(self, state: Mapping[str, object], /) -> None:
        del state


def test_a_signal_in_a_batch_that_ends_with_an_interval_checkpoint_saves_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counted = _CountsSaves()
    brain = _SignalsInBatch2(
        modules={"model": torch.nn.Linear(4, 2)},
        opt_class=sgd(),
        run_opts={"noprogressbar": True, "ckpt_interval_steps": 2},
        checkpointer=Checkpointer(tmp_path, {"counted": counted}),
    )
    with pytest.raises(sb.TrainingInterruptedError) as caught, caplog.at_level(logging.INFO):
        brain.fit(range(1, 3), examples(8), train_loader_kwargs=LOADER)
    assert caught.value.checkpoint_saved
    assert counted.saves == 1
    [saved] = Checkpointer(tmp_path).list_checkpoints()
    assert f"saved a checkpoint to stop: {saved.path}" in caplog.messages
    assert [c.meta for c in Checkpointer(tmp_path).list_checkpoints()] == [
        {sb.INTRA_EPOCH_CKPT_FLAG: True}
    ]


def test_with_stop_on_signals_off_the_brain_leaves_signals_alone(tmp_path: Path) -> None:
    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        config = RunConfig(data_seed=1, signal_at=2, stop_on_signals=False)
        brain = run(config, tmp_path / "run")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert received == [signal.SIGTERM]
    assert brain.counter.current == config.epochs  # it trained to the end


class _SigintAtBatch(RegressionBrain):
    """Sends itself SIGINT in its second training batch (twice with ``twice``)."""

    twice = False
    trained = 0

    def compute_forward(self, batch: Batch, stage: sb.Stage) -> Tensor:
        if stage is sb.Stage.TRAIN:
            self.trained += 1
            if self.trained == 2:
                os.kill(os.getpid(), signal.SIGINT)
                if self.twice:
                    os.kill(os.getpid(), signal.SIGINT)
        return super().compute_forward(batch, stage)


def test_an_ignored_sigint_stays_ignored_during_fit() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `job &` in a shell script
    try:
        brain = _SigintAtBatch(
            modules={"model": torch.nn.Linear(4, 2)},
            opt_class=sgd(),
            run_opts={"noprogressbar": True},
        )
        brain.fit(range(1, 3), examples(8), train_loader_kwargs=LOADER)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert brain.optimizer_step == 2 * 2  # it trained to the end


_SECOND_SIGINT_WITH_SIG_DFL = """
import signal, sys, torch
sys.path.insert(0, {root!r})
from tests.helpers import LOADER, examples, sgd
from tests.test_crash_resume import _SigintAtBatch

signal.signal(signal.SIGINT, signal.SIG_DFL)
brain = _SigintAtBatch(
    modules={{"model": torch.nn.Linear(4, 2)}}, opt_class=sgd(), run_opts={{"noprogressbar": True}}
)
brain.twice = True
brain.fit(range(1, 3), examples(8), train_loader_kwargs=LOADER)
print("still running after the second SIGINT")
"""


def test_a_second_sigint_ends_the_process_when_the_previous_handler_was_the_default() -> None:
    script = _SECOND_SIGINT_WITH_SIG_DFL.format(root=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == -signal.SIGINT, result.stderr
    assert "still running" not in result.stdout

"""Resumes outside the property test's set-up: alternating optimizers, randomness drawn in
``on_stage_start``, a user's loader with workers. Each run is interrupted (as SIGKILL would:
nothing saved at that moment), resumed with fresh objects under another global seed, and
compared with the uninterrupted run bit for bit."""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.utils.data import BatchSampler, DataLoader

import typedbrain as tb
from tests.helpers import Batch, ReadyBatches, call, examples
from typedbrain import Stage


class CrashError(Exception):
    """Stops a run at a chosen forward pass; nothing is saved."""


class CountingBrain(tb.Brain[Batch, Tensor]):
    """A two-layer regression brain that can crash at its n-th training forward pass."""

    crash_at: int | None = None
    passes = 0

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        if stage is Stage.TRAIN:
            type(self).passes += 1
            if type(self).passes == self.crash_at:
                raise CrashError
        return call(self.modules["second"], call(self.modules["first"], batch[0]))

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        return torch.nn.functional.mse_loss(predictions, batch[1])


class AlternatingBrain(CountingBrain):
    """Two optimizers stepped on alternate steps: each keeps its gradients until it steps."""

    def init_optimizers(self) -> None:
        self.optimizers_dict = {
            "first": torch.optim.Adam(self.modules["first"].parameters(), lr=0.01),
            "second": torch.optim.SGD(self.modules["second"].parameters(), lr=0.1, momentum=0.9),
        }
        assert self.checkpointer is not None
        for name, optimizer in self.optimizers_dict.items():
            self.checkpointer.add_recoverable(f"optimizer_{name}", optimizer)

    def freeze_optimizers(
        self, optimizers: Mapping[str, torch.optim.Optimizer]
    ) -> Mapping[str, torch.optim.Optimizer]:
        name = "first" if self.optimizer_step % 2 == 0 else "second"
        return {name: optimizers[name]}


class StageNoiseBrain(CountingBrain):
    """Draws a per-epoch noise level in ``on_stage_start`` and uses it in every forward pass."""

    noise = 0.0

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        if stage is Stage.TRAIN:
            self.noise = float(torch.rand(()))

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        return super().compute_forward(batch, stage) * (1.0 + self.noise)


class StageLog:
    """The stage losses seen so far: a registered recoverable, like a training log."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, int | None, float]] = []

    def state_dict(self) -> dict[str, object]:
        return {"entries": [list(entry) for entry in self.entries]}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        entries = state["entries"]
        assert isinstance(entries, list)
        self.entries = [(str(s), e, float(v)) for s, e, v in entries]


class SaveAfterTrainingBrain(CountingBrain):
    """Saves between training and validation; a plateau scheduler follows the validation loss.

    ``crash_valid_at`` crashes the n-th validation forward pass.
    """

    crash_valid_at: int | None = None
    valid_passes = 0
    save_in: Stage = Stage.TRAIN  # on_stage_end(TRAIN), or on_stage_start(VALID)
    valid_shift = 0.0

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        predictions = super().compute_forward(batch, stage)
        if stage is Stage.VALID:
            type(self).valid_passes += 1
            if type(self).valid_passes == self.crash_valid_at:
                raise CrashError
            # Validation that draws random numbers: resumed, it must draw the same.
            predictions = predictions + 0.01 * torch.rand(predictions.shape) + self.valid_shift
        return predictions

    def _save(self, loss: float) -> None:
        assert isinstance(self.checkpointer, tb.Checkpointer)
        self.checkpointer.save_and_keep_only(meta={"loss": loss}, num_to_keep=2)

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        if stage is Stage.VALID:
            self.valid_shift = 0.01 * float(torch.rand(()))  # drawn before the save below
            if self.save_in is Stage.VALID:
                self._save(0.0)

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        log = self.hparams["log"]
        assert isinstance(log, StageLog)
        log.entries.append((stage.value, epoch, stage_loss))
        if stage is Stage.TRAIN and self.save_in is Stage.TRAIN:
            self._save(stage_loss)
        elif stage is Stage.VALID:
            scheduler = self.hparams["scheduler"]
            assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            scheduler.step(stage_loss)


def _adam(params: ParamsT) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01)


def _state(brain: CountingBrain) -> dict[str, object]:
    state: dict[str, object] = {
        name: value.detach().clone() for name, value in brain.modules.state_dict().items()
    }
    for name, optimizer in brain.optimizers_dict.items():
        for index, values in optimizer.state_dict()["state"].items():
            for key, value in values.items():
                state[f"{name}.{index}.{key}"] = value
    state["optimizer_step"] = brain.optimizer_step
    return state


def _assert_identical(resumed: dict[str, object], straight: dict[str, object]) -> None:
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        if isinstance(value, Tensor):
            other = resumed[key]
            assert isinstance(other, Tensor)
            assert torch.equal(other, value), key
        else:
            assert resumed[key] == value, key


def _run(
    cls: type[CountingBrain],
    folder: Path,
    data: Callable[[], tb.DataSource],
    *,
    crash_at: int | None,
    opt_class: tb.OptimizerFactory | None = _adam,
    script_seed: int = 0,
    run_opts: tb.RunOptionsDict | None = None,
) -> CountingBrain:
    torch.manual_seed(0)
    modules = {"first": torch.nn.Linear(4, 4), "second": torch.nn.Linear(4, 2)}
    torch.manual_seed(script_seed)  # a restarted script may seed itself otherwise
    random.seed(script_seed)
    np.random.seed(script_seed)
    checkpointer = tb.Checkpointer(folder, dict(modules))
    counter = tb.EpochCounter(3)
    checkpointer.add_recoverable("counter", counter)
    brain = cls(
        modules,
        opt_class,
        run_opts={"noprogressbar": True, "ckpt_interval_steps": 2, **(run_opts or {})},
        checkpointer=checkpointer,
    )
    cls.passes = 0
    brain.crash_at = crash_at
    brain.fit(counter, data(), train_loader_kwargs={"batch_size": 4, "shuffle": True})
    return brain


def _resume_matches(
    cls: type[CountingBrain],
    tmp_path: Path,
    data: Callable[[], tb.DataSource],
    crash_at: int,
    opt_class: tb.OptimizerFactory | None = _adam,
    run_opts: tb.RunOptionsDict | None = None,
) -> None:
    straight = _run(
        cls, tmp_path / "straight", data, crash_at=None, opt_class=opt_class, run_opts=run_opts
    )
    with pytest.raises(CrashError):
        _run(
            cls,
            tmp_path / "broken",
            data,
            crash_at=crash_at,
            opt_class=opt_class,
            run_opts=run_opts,
        )
    resumed = _run(
        cls,
        tmp_path / "broken",
        data,
        crash_at=None,
        opt_class=opt_class,
        script_seed=99,
        run_opts=run_opts,
    )
    _assert_identical(_state(resumed), _state(straight))


@pytest.mark.parametrize("crash_at", [4, 8, 11])
def test_alternating_optimizers_resume_with_the_gradients_each_keeps(
    tmp_path: Path, crash_at: int
) -> None:
    # Six batches an epoch, a checkpoint every two: the crashes fall in epochs 1 and 2, after
    # checkpoints taken while the optimizer left out of the last step held its gradients.
    _resume_matches(AlternatingBrain, tmp_path, lambda: examples(24), crash_at, opt_class=None)


class AlternatingSavingAtEpochEnd(AlternatingBrain):
    """Steps "second" on every third batch, "first" on the others; saves as training ends.

    With three batches an epoch, the epoch's last batch steps "second", and its zero_grad
    (and the epoch's) clear "second" only: "first" holds its gradients across the save.
    """

    def freeze_optimizers(
        self, optimizers: Mapping[str, torch.optim.Optimizer]
    ) -> Mapping[str, torch.optim.Optimizer]:
        name = "second" if self.step % 3 == 0 else "first"
        return {name: optimizers[name]}

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is Stage.TRAIN:
            assert isinstance(self.checkpointer, tb.Checkpointer)
            self.checkpointer.save_checkpoint()


@pytest.mark.parametrize("crash_at", [4, 5, 7])  # epoch 2's first two batches, epoch 3's first
def test_an_optimizer_left_out_keeps_its_gradients_across_an_epoch_checkpoint(
    tmp_path: Path, crash_at: int
) -> None:
    # Three batches an epoch and no intra-epoch checkpoint: the restart resumes from the one
    # saved as the epoch ended, when the optimizer left out of the last step still held its
    # gradients, which it adds to until it steps (in the next epoch).
    _resume_matches(
        AlternatingSavingAtEpochEnd,
        tmp_path,
        lambda: examples(12),
        crash_at,
        opt_class=None,
        run_opts={"ckpt_interval_steps": 0},
    )


@pytest.mark.parametrize("crash_at", [9, 10, 15])
def test_randomness_drawn_in_on_stage_start_is_drawn_again_on_reentry(
    tmp_path: Path, crash_at: int
) -> None:
    _resume_matches(StageNoiseBrain, tmp_path, lambda: examples(24), crash_at)


@pytest.mark.parametrize("save_in", [Stage.TRAIN, Stage.VALID], ids=["train end", "valid start"])
@pytest.mark.parametrize("crash_valid_at", [1, 3, 5])
def test_a_checkpoint_saved_between_training_and_validation_validates_again_on_resume(
    tmp_path: Path, crash_valid_at: int, save_in: Stage
) -> None:
    # Two validation batches an epoch: the crashes fall in the validations of epochs 1-3,
    # each after the checkpoint that on_stage_end(TRAIN) saved.
    def run(folder: Path, crash: int | None, script_seed: int = 0) -> dict[str, object]:
        torch.manual_seed(0)
        modules = {"first": torch.nn.Linear(4, 4), "second": torch.nn.Linear(4, 2)}
        optimizer = torch.optim.SGD([p for m in modules.values() for p in m.parameters()], lr=0.1)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        log = StageLog()
        counter = tb.EpochCounter(3)
        torch.manual_seed(script_seed)
        checkpointer = tb.Checkpointer(
            folder,
            {**modules, "scheduler": scheduler, "log": log, "counter": counter},
        )
        brain = SaveAfterTrainingBrain(
            modules,
            lambda _: optimizer,
            hparams={"scheduler": scheduler, "log": log},
            run_opts={"noprogressbar": True},
            checkpointer=checkpointer,
        )
        SaveAfterTrainingBrain.valid_passes = 0
        brain.crash_valid_at = crash
        brain.save_in = save_in
        brain.fit(
            counter,
            examples(24, seed=1),
            examples(8, seed=2),
            train_loader_kwargs={"batch_size": 4, "shuffle": True},
            valid_loader_kwargs={"batch_size": 4},
        )
        state = _state(brain)
        state["log"] = log.entries
        state["lr"] = optimizer.param_groups[0]["lr"]
        state["scheduler"] = scheduler.state_dict()
        return state

    straight = run(tmp_path / "straight", None)
    with pytest.raises(CrashError):
        run(tmp_path / "broken", crash_valid_at)
    if save_in is Stage.VALID:
        # Interrupted again, in the validation the restart runs again (after its new save).
        with pytest.raises(CrashError):
            run(tmp_path / "broken", 2, script_seed=98)
    resumed = run(tmp_path / "broken", None, script_seed=99)
    _assert_identical(resumed, straight)


class SaveAtEpochStartBrain(StageNoiseBrain):
    """Saves in ``on_stage_start(Stage.TRAIN)``, after drawing the epoch's noise."""

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        super().on_stage_start(stage, epoch)
        if stage is Stage.TRAIN:
            assert isinstance(self.checkpointer, tb.Checkpointer)
            self.checkpointer.save_and_keep_only(num_to_keep=1)


@pytest.mark.parametrize("crash_at", [1, 7, 13])
def test_a_checkpoint_saved_as_an_epoch_starts_trains_that_epoch_on_resume(
    tmp_path: Path, crash_at: int
) -> None:
    # Six batches an epoch: each crash comes at the first batch of epochs 1-3, when the newest
    # checkpoint is the one saved as the epoch started.
    _resume_matches(SaveAtEpochStartBrain, tmp_path, lambda: examples(24), crash_at)


def _with_a_nan_example() -> list[Batch]:
    data = examples(24)
    data[5] = (torch.full((4,), math.nan), data[5][1])  # one non-finite loss an epoch
    return data


def test_a_checkpoint_saved_as_an_epoch_starts_holds_that_epochs_non_finite_count(
    tmp_path: Path,
) -> None:
    # One NaN batch an epoch and a patience of 1: a checkpoint saved in on_stage_start that
    # held the previous epoch's count would make the resumed epoch fail at its NaN batch.
    _resume_matches(
        SaveAtEpochStartBrain,
        tmp_path,
        _with_a_nan_example,
        7,
        run_opts={"nonfinite_patience": 1, "max_grad_norm": 0.0},
    )


def _two_stages(folder: Path, *, crash_at: int | None, script_seed: int = 0) -> CountingBrain:
    """A recipe that trains twice (two fits, two counters, one checkpointer): 2 then 3 epochs."""
    torch.manual_seed(0)
    modules = {"first": torch.nn.Linear(4, 4), "second": torch.nn.Linear(4, 2)}
    torch.manual_seed(script_seed)
    checkpointer = tb.Checkpointer(folder, dict(modules))
    first_stage, second_stage = tb.EpochCounter(2), tb.EpochCounter(3)
    checkpointer.add_recoverables({"first_stage": first_stage, "second_stage": second_stage})
    brain = CountingBrain(
        modules,
        _adam,
        run_opts={"noprogressbar": True, "ckpt_interval_steps": 1},
        checkpointer=checkpointer,
    )
    CountingBrain.passes = 0
    brain.crash_at = crash_at
    loader: tb.LoaderKwargs = {"batch_size": 4, "shuffle": True}
    brain.fit(first_stage, examples(16, seed=1), train_loader_kwargs=loader)
    brain.fit(second_stage, examples(20, seed=2), train_loader_kwargs=loader)
    return brain


@pytest.mark.parametrize("crash_at", [3, 11, 15])  # stage 1 epoch 1; stage 2 epochs 1 and 2
def test_a_two_stage_recipe_resumes_each_interrupted_epoch_in_its_own_stage(
    tmp_path: Path, crash_at: int
) -> None:
    # 4 batches an epoch in the first stage, 5 in the second. An interrupted epoch of the
    # second stage was once re-entered by the first fit (whose finished counter had the same
    # epoch number) and trained on the first stage's data.
    straight = _two_stages(tmp_path / "straight", crash_at=None)
    with pytest.raises(CrashError):
        _two_stages(tmp_path / "broken", crash_at=crash_at)
    resumed = _two_stages(tmp_path / "broken", crash_at=None, script_seed=99)
    _assert_identical(_state(resumed), _state(straight))


def _crash_two_batches_into_a_window_of_four(folder: Path) -> None:
    """Train with grad_accumulation_factor=4 until a crash after the checkpoint at batch 2."""
    with pytest.raises(CrashError):
        _run(
            CountingBrain,
            folder,
            lambda: examples(32),
            crash_at=3,
            run_opts={"grad_accumulation_factor": 4},
        )


@pytest.mark.parametrize("now", [2, 1])
def test_a_changed_accumulation_factor_warns_and_steps_the_saved_window(
    tmp_path: Path, now: int
) -> None:
    # Saved after batch 2 of epoch 1 with a factor of 4: two backward passes in the window.
    _crash_two_batches_into_a_window_of_four(tmp_path)
    stepped: list[int] = []

    class Recording(CountingBrain):
        def optimizers_step(self) -> None:
            stepped.append(self.step)
            super().optimizers_step()

    with pytest.warns(
        tb.ResumeWarning,
        match=rf"grad_accumulation_factor=4, which is {now} now: epoch 1 continues after batch "
        r"2 with the new factor; the 2 batches of its open window are stepped now",
    ):
        brain = _run(
            Recording,
            tmp_path,
            lambda: examples(32),
            crash_at=None,
            run_opts={"grad_accumulation_factor": now},
        )
    assert stepped[0] == 2  # the saved window, before this process's first batch
    # Every step counted was taken by this process (the checkpoint was saved before any).
    assert brain.optimizer_step == len(stepped)


def test_under_a_process_group_an_accumulation_factor_change_mid_window_is_refused(
    tmp_path: Path,
) -> None:
    # The window's gradients are the process's own until the window's sync: stepping them at
    # once would leave the replicas apart, so the restart is refused with the way out.
    import torch.distributed as dist

    from tests.test_ddp import free_port

    _crash_two_batches_into_a_window_of_four(tmp_path)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        with pytest.raises(
            tb.ConfigurationError,
            match=r"2 batches into an accumulation window of grad_accumulation_factor=4, which "
            r"is 2 now: under torch.distributed .* restart with grad_accumulation_factor=4",
        ):
            _run(
                CountingBrain,
                tmp_path,
                lambda: examples(32),
                crash_at=None,
                run_opts={"grad_accumulation_factor": 2, "distributed_backend": "gloo"},
            )
    finally:
        gc.collect()  # the brain, before its group (see tests.test_ddp.one_process_group)
        dist.destroy_process_group()


class SavingAsEpochsEnd(CountingBrain):
    """Saves as each epoch's training ends; crashes right after the save of ``crash_epoch``."""

    crash_epoch: int | None = None
    stage_ends: list[int | None]

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        self.stage_ends.append(epoch)
        assert isinstance(self.checkpointer, tb.Checkpointer)
        self.checkpointer.save_checkpoint()
        if epoch == self.crash_epoch:
            raise CrashError


def _limited_run(folder: Path, crash_epoch: int | None) -> tuple[SavingAsEpochsEnd, int]:
    """Three epochs of 8 batches, stopped by optimizer_step_limit=12 in epoch 2."""
    torch.manual_seed(0)
    modules = {"first": torch.nn.Linear(4, 4), "second": torch.nn.Linear(4, 2)}
    counter = tb.EpochCounter(3)
    checkpointer = tb.Checkpointer(folder, {**modules, "counter": counter})
    brain = SavingAsEpochsEnd(
        modules,
        _adam,
        run_opts={"noprogressbar": True, "optimizer_step_limit": 12},
        checkpointer=checkpointer,
    )
    brain.stage_ends = []
    brain.crash_epoch = crash_epoch
    brain.fit(counter, examples(32), train_loader_kwargs={"batch_size": 4})
    return brain, counter.current


def test_a_restart_after_the_step_limit_ended_the_run_runs_no_further_epoch(
    tmp_path: Path,
) -> None:
    straight, straight_epoch = _limited_run(tmp_path / "straight", crash_epoch=None)
    assert straight.stage_ends == [1, 2]
    with pytest.raises(CrashError):  # after epoch 2's save: the run was over but for leaving
        _limited_run(tmp_path / "broken", crash_epoch=2)
    resumed, resumed_epoch = _limited_run(tmp_path / "broken", crash_epoch=None)
    assert resumed.stage_ends == []  # no epoch 3, not even an empty one
    assert resumed_epoch == straight_epoch == 2
    assert len(tb.Checkpointer(tmp_path / "broken").list_checkpoints()) == 2
    _assert_identical(_state(resumed), _state(straight))


@pytest.mark.parametrize("crash_at", [None, 11], ids=["finished", "interrupted-in-epoch-3"])
def test_a_restart_with_a_lower_epoch_limit_trains_nothing_and_evaluates(
    tmp_path: Path, crash_at: int | None
) -> None:
    data = examples(16)  # 4 batches an epoch; pass 11 is epoch 3's third batch
    if crash_at is None:
        _run(CountingBrain, tmp_path, lambda: data, crash_at=None)
    else:
        with pytest.raises(CrashError):
            _run(CountingBrain, tmp_path, lambda: data, crash_at=crash_at)
    modules = {"first": torch.nn.Linear(4, 4), "second": torch.nn.Linear(4, 2)}
    counter = tb.EpochCounter(2)
    checkpointer = tb.Checkpointer(tmp_path, {**modules, "counter": counter})
    brain = CountingBrain(
        modules, _adam, run_opts={"noprogressbar": True}, checkpointer=checkpointer
    )
    CountingBrain.passes = 0
    brain.fit(counter, data, train_loader_kwargs={"batch_size": 4})
    assert CountingBrain.passes == 0
    assert counter.current == 3  # where the checkpoint left it, past the limit
    assert math.isfinite(brain.evaluate(examples(4)))


class NoRecoveryBrain(CountingBrain):
    """Starts every fit afresh: its ``on_fit_start`` recovers nothing."""

    trained: list[int]

    def on_fit_start(self) -> None:
        self.init_optimizers()

    def on_fit_batch_start(self, batch: Batch, should_step: bool) -> None:
        self.trained.append(self.step)


def test_evaluate_leaves_no_recovered_run_state_for_a_later_fit(tmp_path: Path) -> None:
    """``evaluate`` recovers a whole checkpoint, the brain's run state included; what it did
    not apply is dropped, so a later fit that recovers nothing does not continue the
    checkpoint's interrupted epoch."""
    data = examples(16)
    with pytest.raises(CrashError):  # an intra-epoch checkpoint after batch 2 of 4
        _run(CountingBrain, tmp_path, lambda: data, crash_at=3)
    modules = {"first": torch.nn.Linear(4, 4), "second": torch.nn.Linear(4, 2)}
    counter = tb.EpochCounter(2)
    checkpointer = tb.Checkpointer(tmp_path, {**modules, "counter": counter})
    brain = NoRecoveryBrain(
        modules, _adam, run_opts={"noprogressbar": True}, checkpointer=checkpointer
    )
    brain.evaluate(examples(4))  # the counter is back at epoch 1, as saved
    brain.trained = []
    # This fit recovers nothing: the optimizer it builds is not the checkpoint's, and it says so.
    with pytest.warns(tb.ResumeWarning, match="'optimizer' registered with the checkpointer after"):
        brain.fit(counter, data, train_loader_kwargs={"batch_size": 4})
    assert brain.trained == [1, 2, 3, 4]  # epoch 2, whole; not the rest of epoch 1


class DrawsAtTestBrain(CountingBrain):
    """Notes what torch, Python and NumPy draw first as its test stage starts."""

    drawn: tuple[list[float], float, float] | None = None

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        if stage is Stage.TEST:
            self.drawn = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))


class EpochEndSavingBrain(CountingBrain):
    """Saves a checkpoint at the end of each epoch, as recipes do: the newest is one of those."""

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is Stage.TRAIN and isinstance(self.checkpointer, tb.Checkpointer):
            self.checkpointer.save_checkpoint(end_of_epoch=True)


@pytest.mark.parametrize(
    ("saved_by", "crash_at"),
    [(CountingBrain, 7), (EpochEndSavingBrain, None)],
    ids=["intra-epoch", "end-of-epoch"],
)
def test_evaluate_tests_with_the_random_generators_of_the_checkpoint_it_recovers(
    tmp_path: Path, saved_by: type[CountingBrain], crash_at: int | None
) -> None:
    """Whatever the generators held before ``evaluate``, its test stage draws the same."""
    data = examples(16)
    if crash_at is None:
        _run(saved_by, tmp_path, lambda: data, crash_at=None)
    else:
        with pytest.raises(CrashError):  # the newest: an intra-epoch checkpoint, epoch 2
            _run(saved_by, tmp_path, lambda: data, crash_at=crash_at)
    newest = tb.Checkpointer(tmp_path).find_checkpoint()
    assert newest is not None
    assert newest.end_of_epoch is (crash_at is None)
    drawn = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        modules = {"first": torch.nn.Linear(4, 4), "second": torch.nn.Linear(4, 2)}
        checkpointer = tb.Checkpointer(tmp_path, {**modules, "counter": tb.EpochCounter(3)})
        brain = DrawsAtTestBrain(
            modules, _adam, run_opts={"noprogressbar": True}, checkpointer=checkpointer
        )
        brain.evaluate(examples(4))
        drawn.append(brain.drawn)
    assert drawn[0] == drawn[1]


def _one_epoch(
    folder: Path,
    data: tb.DataSource,
    *,
    crash_at: int | None,
    loader_kwargs: tb.LoaderKwargs | None = None,
) -> CountingBrain:
    """One epoch of ``data`` with a checkpoint every 2 batches, crashing at pass ``crash_at``."""
    torch.manual_seed(0)
    modules = {"first": torch.nn.Linear(4, 4), "second": torch.nn.Linear(4, 2)}
    brain = CountingBrain(
        modules,
        _adam,
        run_opts={"noprogressbar": True, "ckpt_interval_steps": 2},
        checkpointer=tb.Checkpointer(folder, dict(modules)),
    )
    CountingBrain.passes = 0
    brain.crash_at = crash_at
    brain.fit(range(1, 2), data, train_loader_kwargs=loader_kwargs)
    return brain


def _batch_sampler_run(folder: Path, size: int, *, crash_at: int | None) -> CountingBrain:
    data = examples(16)
    sampler = tb.ResumableSampler(data, shuffle=True, seed=3)
    loader = DataLoader(ReadyBatches(data), batch_sampler=BatchSampler(sampler, size, False))
    return _one_epoch(folder, loader, crash_at=crash_at)


def test_a_restart_with_another_size_in_the_users_batch_sampler_warns_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """The batch size saved is the ``BatchSampler``'s (the loader's own is None then)."""
    with pytest.raises(CrashError):  # the checkpoint after batch 2: 8 of 16 samples used
        _batch_sampler_run(tmp_path, 4, crash_at=3)
    with pytest.warns(tb.ResumeWarning, match="batch size was 4 .* is 8 now"):
        _batch_sampler_run(tmp_path, 8, crash_at=None)
    assert CountingBrain.passes == 1  # the other 8 samples, in one batch of 8


@pytest.mark.parametrize(("before", "after"), [(0, 1), (1, 0)])
def test_a_restart_that_turns_loader_workers_on_or_off_warns(
    tmp_path: Path, before: int, after: int
) -> None:
    def run(workers: int, crash_at: int | None) -> None:
        kwargs: tb.LoaderKwargs = {"batch_size": 4, "num_workers": workers}
        _one_epoch(tmp_path, examples(16), crash_at=crash_at, loader_kwargs=kwargs)

    with pytest.raises(CrashError):
        run(before, crash_at=3)
    with pytest.warns(tb.ResumeWarning, match=f"num_workers={before} when the checkpoint"):
        run(after, crash_at=None)


def test_a_mid_epoch_restart_over_a_training_set_of_another_size_warns(tmp_path: Path) -> None:
    def run(size: int, crash_at: int | None) -> None:
        _one_epoch(tmp_path, examples(size), crash_at=crash_at, loader_kwargs={"batch_size": 4})

    with pytest.raises(CrashError):
        run(20, crash_at=3)
    with pytest.warns(tb.ResumeWarning, match="training set had 20 items .* has 21 now"):
        run(21, crash_at=None)

"""fit and evaluate walk the phase table: exact sequences, re-entrance, failures, observers."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor

from tests.helpers import Batch, RegressionBrain, batches, examples, ready_loader, sgd
from typedbrain import (
    TRANSITIONS,
    ConfigurationError,
    EpochCounter,
    LoaderKwargs,
    Phase,
    PhaseTransitionError,
    ReentrantCallError,
    Stage,
)

LOADER: LoaderKwargs = {"batch_size": 4}


class PhaseLog:
    def __init__(self) -> None:
        self.changes: list[tuple[Phase, Phase]] = []

    def on_phase_change(self, old: Phase, new: Phase) -> None:
        assert new in TRANSITIONS[old]
        self.changes.append((old, new))

    @property
    def walk(self) -> list[Phase]:
        return [self.changes[0][0], *(new for _, new in self.changes)] if self.changes else []


class PhaseSeeingBrain(RegressionBrain):
    """Records the phase the brain reports inside each stage hook."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(
            modules={"model": torch.nn.Linear(4, 2)},
            opt_class=sgd(),
            run_opts={"noprogressbar": True},
        )
        self.seen: list[tuple[str, Stage, Phase]] = []

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        self.seen.append(("start", stage, self.phase))

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        self.seen.append(("end", stage, self.phase))


def observed(brain: RegressionBrain) -> PhaseLog:
    log = PhaseLog()
    brain.add_phase_observer(log)
    return log


def test_new_brain_is_in_init() -> None:
    assert PhaseSeeingBrain().phase is Phase.INIT


def test_fit_with_valid_set_walks_train_valid_per_epoch_then_idle() -> None:
    brain = PhaseSeeingBrain()
    log = observed(brain)
    brain.fit(range(1, 3), examples(8), examples(4), train_loader_kwargs=LOADER)
    assert log.walk == [
        Phase.INIT,
        Phase.FIT_START,
        Phase.TRAIN,
        Phase.VALID,
        Phase.TRAIN,
        Phase.VALID,
        Phase.IDLE,
    ]
    assert brain.phase is Phase.IDLE


def test_fit_without_valid_set_moves_train_to_train_between_epochs() -> None:
    brain = PhaseSeeingBrain()
    log = observed(brain)
    brain.fit(range(1, 4), examples(8), train_loader_kwargs=LOADER)
    assert log.walk == [
        Phase.INIT,
        Phase.FIT_START,
        Phase.TRAIN,
        Phase.TRAIN,
        Phase.TRAIN,
        Phase.IDLE,
    ]


def test_fit_with_no_epochs_goes_from_fit_start_to_idle() -> None:
    brain = PhaseSeeingBrain()
    log = observed(brain)
    brain.fit(range(0), examples(8))
    assert log.walk == [Phase.INIT, Phase.FIT_START, Phase.IDLE]


def test_evaluate_walks_test_then_idle_and_can_follow_fit() -> None:
    brain = PhaseSeeingBrain()
    log = observed(brain)
    brain.evaluate(examples(4))
    brain.fit(range(1, 2), examples(4))
    brain.evaluate(examples(4))
    assert log.walk == [
        Phase.INIT,
        Phase.TEST,
        Phase.IDLE,
        Phase.FIT_START,
        Phase.TRAIN,
        Phase.IDLE,
        Phase.TEST,
        Phase.IDLE,
    ]


def test_stage_hooks_see_the_phase_of_their_stage() -> None:
    brain = PhaseSeeingBrain()
    brain.fit(range(1, 2), examples(4), examples(4))
    brain.evaluate(examples(4))
    assert brain.seen == [
        ("start", Stage.TRAIN, Phase.TRAIN),
        ("end", Stage.TRAIN, Phase.TRAIN),
        ("start", Stage.VALID, Phase.VALID),
        ("end", Stage.VALID, Phase.VALID),
        ("start", Stage.TEST, Phase.TEST),
        ("end", Stage.TEST, Phase.TEST),
    ]


class ReentrantBrain(RegressionBrain):
    def __init__(self, call_from: Stage, entry_point: str) -> None:
        torch.manual_seed(0)
        super().__init__(
            modules={"model": torch.nn.Linear(4, 2)},
            opt_class=sgd(),
            run_opts={"noprogressbar": True},
        )
        self.call_from = call_from
        self.entry_point = entry_point

    def run_outer_call(self) -> None:
        if self.call_from is Stage.TEST:
            self.evaluate(examples(4))
        else:
            self.fit(range(1, 2), examples(4), examples(4))

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is self.call_from:
            if self.entry_point == "fit":
                self.fit(range(1, 2), examples(4))
            else:
                self.evaluate(examples(4))


@pytest.mark.parametrize(
    ("call_from", "entry_point", "phase"),
    [
        (Stage.TRAIN, "fit", Phase.TRAIN),
        (Stage.VALID, "evaluate", Phase.VALID),
        (Stage.TEST, "evaluate", Phase.TEST),
        (Stage.TEST, "fit", Phase.TEST),
    ],
)
def test_calling_an_entry_point_from_a_hook_is_refused_and_fails_the_outer_call(
    call_from: Stage, entry_point: str, phase: Phase
) -> None:
    brain = ReentrantBrain(call_from, entry_point)
    with pytest.raises(ReentrantCallError) as caught:
        brain.run_outer_call()
    error = caught.value
    assert isinstance(error, PhaseTransitionError)
    assert error.entry_point == entry_point
    assert error.current is phase
    assert error.allowed == TRANSITIONS[phase]
    assert f"{entry_point}() was called while the brain is running (phase {phase.name})" in str(
        error
    )
    assert brain.phase is Phase.FAILED


class FailingBrain(RegressionBrain):
    fail = True

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        if self.fail:
            raise RuntimeError("boom")
        return super().compute_objectives(predictions, batch, stage)


def test_an_exception_in_a_hook_moves_to_failed_and_fit_can_run_again() -> None:
    torch.manual_seed(0)
    brain = FailingBrain({"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True})
    log = observed(brain)
    with pytest.raises(RuntimeError, match="boom"):
        brain.fit(range(1, 3), ready_loader(batches(2, 4)))
    assert brain.phase is Phase.FAILED
    brain.fail = False
    brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    assert log.walk == [
        Phase.INIT,
        Phase.FIT_START,
        Phase.TRAIN,
        Phase.FAILED,
        Phase.FIT_START,
        Phase.TRAIN,
        Phase.IDLE,
    ]


def test_keyboard_interrupt_also_moves_to_failed() -> None:
    class Interrupted(RegressionBrain):
        def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
            raise KeyboardInterrupt

    brain = Interrupted({"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True})
    with pytest.raises(KeyboardInterrupt):
        brain.fit(range(1, 2), examples(4))
    assert brain.phase is Phase.FAILED


class RaisingObserver:
    def __init__(self, on: Phase) -> None:
        self.on = on

    def on_phase_change(self, old: Phase, new: Phase) -> None:
        if new is self.on:
            raise ValueError(f"observer refuses {new.name}")


def test_observer_error_fails_the_entry_point() -> None:
    brain = PhaseSeeingBrain()
    brain.add_phase_observer(RaisingObserver(Phase.VALID))
    with pytest.raises(ValueError, match="observer refuses VALID"):
        brain.fit(range(1, 2), examples(4), examples(4))
    assert brain.phase is Phase.FAILED


def test_observer_error_on_the_last_move_to_idle_reaches_the_caller_in_idle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    brain = PhaseSeeingBrain()
    brain.add_phase_observer(RaisingObserver(Phase.IDLE))
    with pytest.raises(ValueError, match="observer refuses IDLE"):
        brain.fit(range(1, 2), examples(4))
    assert brain.phase is Phase.IDLE
    with pytest.raises(ValueError, match="observer refuses IDLE"):
        brain.evaluate(examples(4))
    assert brain.phase is Phase.IDLE
    assert "FAILED" not in caplog.text  # nothing claims a move that did not happen


def test_observer_error_on_failed_is_logged_and_original_error_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    brain = PhaseSeeingBrain()
    brain.add_phase_observer(RaisingObserver(Phase.TRAIN))
    brain.add_phase_observer(RaisingObserver(Phase.FAILED))
    with (
        caplog.at_level(logging.ERROR, logger="typedbrain"),
        pytest.raises(ValueError, match="observer refuses TRAIN"),
    ):
        brain.fit(range(1, 2), examples(4))
    assert brain.phase is Phase.FAILED
    assert "a phase observer raised while the brain moved to FAILED" in caplog.text


def test_removed_observer_is_no_longer_called() -> None:
    brain = PhaseSeeingBrain()
    log = observed(brain)
    brain.remove_phase_observer(log)
    brain.evaluate(examples(4))
    assert log.changes == []
    with pytest.raises(ValueError, match=r"the phase observer .*PhaseLog.* is not subscribed"):
        brain.remove_phase_observer(log)


def test_fit_retried_after_a_failed_epoch_runs_that_epoch_again() -> None:
    class FailsInEpochTwo(PhaseSeeingBrain):
        fail = True
        epochs: list[int]

        def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
            if stage is Stage.TRAIN and epoch is not None:
                self.epochs.append(epoch)
                if epoch == 2 and self.fail:
                    self.fail = False
                    raise RuntimeError("boom")

    brain = FailsInEpochTwo()
    brain.epochs = []
    counter = EpochCounter(3)
    with pytest.raises(RuntimeError, match="boom"):
        brain.fit(counter, examples(4))
    assert counter.current == 1  # epoch 2 was drawn but did not finish
    brain.fit(counter, examples(4))
    assert brain.epochs == [1, 2, 2, 3]


class CallsInto:
    """An observer that calls ``evaluate`` on the brain when it hears of ``on``."""

    def __init__(self, brain: RegressionBrain, on: Phase) -> None:
        self.brain, self.on = brain, on

    def on_phase_change(self, old: Phase, new: Phase) -> None:
        if new is self.on:
            self.brain.evaluate(examples(4))


@pytest.mark.parametrize("on", [Phase.IDLE, Phase.FAILED])
def test_an_observer_calling_an_entry_point_is_refused_and_the_others_hear_in_order(
    on: Phase,
) -> None:
    """Even in a resting phase: the outer call is still on the stack while observers hear."""
    brain = FailingBrain({"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True})
    brain.fail = on is Phase.FAILED
    brain.add_phase_observer(CallsInto(brain, on))
    log = observed(brain)
    with pytest.raises((ReentrantCallError, RuntimeError)) as raised:
        brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    if on is Phase.IDLE:
        assert isinstance(raised.value, ReentrantCallError)
        # Not "allowed from IDLE: ..., TEST", which the refusal would contradict.
        assert str(raised.value) == (
            "evaluate() was called while the brain is running (phase IDLE); fit() and evaluate() "
            "cannot be called from inside a hook or a phase observer: make the second call once "
            "the first has returned"
        )
    else:  # the hook's error goes on; the observer's refusal is logged
        assert str(raised.value) == "boom"
    assert log.walk == [Phase.INIT, Phase.FIT_START, Phase.TRAIN, on]
    assert brain.phase is on


def test_an_observer_raising_keyboard_interrupt_does_not_stop_the_others_hearing() -> None:
    class Interrupting:
        def on_phase_change(self, old: Phase, new: Phase) -> None:
            if new is Phase.TRAIN:
                raise KeyboardInterrupt

    brain = PhaseSeeingBrain()
    brain.add_phase_observer(Interrupting())
    log = observed(brain)
    with pytest.raises(KeyboardInterrupt):
        brain.fit(range(1, 2), examples(4))
    assert log.walk == [Phase.INIT, Phase.FIT_START, Phase.TRAIN, Phase.FAILED]


def test_fit_refuses_arguments_of_the_wrong_kind_before_any_hook_runs() -> None:
    brain = PhaseSeeingBrain()
    with pytest.raises(ConfigurationError, match="epoch_counter must yield the epoch numbers"):
        brain.fit(3, examples(4))  # type: ignore[arg-type]  # the mistake under test
    with pytest.raises(ConfigurationError, match="train_set is None"):
        brain.fit(range(1, 2), None)  # type: ignore[arg-type]  # the mistake under test
    assert brain.phase is Phase.INIT
    assert brain.seen == []

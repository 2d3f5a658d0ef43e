"""A plain training step runs the default hooks' logic inline; it must end where the calls end.

When no per-batch hook is overridden, the brain runs ``fit_batch`` -> ``check_loss_isfinite`` ->
``optimizers_step`` -> ``check_gradients`` -> ``update_average`` inline (see
``Brain._inline_step``). Overriding any of them, even with the base behaviour, makes it call the
hooks. Both ways must end bit for bit in the same state, whatever happens on the way.
"""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests.helpers import Batch, RegressionBrain, batches, ready_loader
from typedbrain import NonFiniteLossError, OptimizerFactory, Precision, RunOptionsDict, Stage


@attrs.frozen
class Scenario:
    batch_count: int
    batch_size: int
    epochs: int
    poisoned: frozenset[int]
    max_grad_norm: float
    step_limit: int | None
    debug_batches: int | None
    patience: int
    optimizer: str
    precision: Precision
    seed: int


scenarios = st.builds(
    Scenario,
    batch_count=st.integers(1, 6),
    batch_size=st.integers(1, 4),
    epochs=st.integers(1, 3),
    poisoned=st.frozensets(st.integers(1, 6), max_size=3),
    max_grad_norm=st.sampled_from([0.0, 0.05, 5.0]),
    step_limit=st.none() | st.integers(1, 8),
    debug_batches=st.none() | st.integers(1, 4),
    patience=st.integers(0, 3),
    optimizer=st.sampled_from(["sgd", "adamw"]),
    precision=st.sampled_from(["fp32", "bf16"]),
    seed=st.integers(0, 2**16),
)

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


class PoisonedBrain(RegressionBrain):
    """Gives non-finite losses at the listed steps; records every stage's mean loss."""

    def __init__(self, scenario: Scenario) -> None:
        options: RunOptionsDict = {
            "noprogressbar": True,
            "max_grad_norm": scenario.max_grad_norm,
            "optimizer_step_limit": scenario.step_limit,
            "nonfinite_patience": scenario.patience,
            "precision": scenario.precision,
        }
        if scenario.debug_batches is not None:
            options |= {"debug": True, "debug_batches": scenario.debug_batches, "debug_epochs": 9}
        torch.manual_seed(scenario.seed)
        super().__init__(
            {"model": torch.nn.Linear(4, 2)}, OPTIMIZERS[scenario.optimizer], run_opts=options
        )
        self.poisoned = scenario.poisoned
        self.stage_losses: list[float] = []

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        loss = super().compute_objectives(predictions, batch, stage)
        return loss * math.inf if self.step in self.poisoned else loss

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        self.stage_losses.append(stage_loss)


class HookCallingBrain(PoisonedBrain):
    """The same brain, but it calls the per-batch hooks (one is overridden, doing nothing new)."""

    def on_fit_batch_end(
        self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
    ) -> None:
        super().on_fit_batch_end(batch, outputs, loss, should_step)


@attrs.frozen
class Outcome:
    parameters: dict[str, Tensor]
    optimizer_state: dict[str, object]
    counters: tuple[int, int, float]
    stage_losses: list[float]
    error: tuple[int | None, int, int] | None
    inline: bool


def run(brain: PoisonedBrain, scenario: Scenario) -> Outcome:
    error = None
    try:
        brain.fit(
            range(1, scenario.epochs + 1),
            ready_loader(batches(scenario.batch_count, scenario.batch_size, seed=scenario.seed)),
        )
    except NonFiniteLossError as raised:
        error = (raised.epoch, raised.step, raised.count)
    return Outcome(
        parameters={n: p.detach().clone() for n, p in brain.modules.named_parameters()},
        optimizer_state=brain.optimizer.state_dict(),
        counters=(brain.optimizer_step, brain.nonfinite_count, brain.avg_train_loss),
        stage_losses=brain.stage_losses,
        error=error,
        inline=brain._current_plan().inline_steps,
    )


def assert_same_tensors(left: object, right: object) -> None:
    """Deep equality where tensors must be equal bit for bit."""
    if isinstance(left, Tensor):
        assert isinstance(right, Tensor)
        torch.testing.assert_close(left, right, rtol=0, atol=0, equal_nan=True)
    elif isinstance(left, dict):
        assert isinstance(right, dict)
        assert left.keys() == right.keys()
        for key in left:
            assert_same_tensors(left[key], right[key])
    elif isinstance(left, list | tuple):
        assert isinstance(right, list | tuple)
        assert len(left) == len(right)
        for a, b in zip(left, right, strict=True):
            assert_same_tensors(a, b)
    else:
        assert left == right


@given(scenarios)
@settings(max_examples=40)
def test_inline_steps_end_exactly_where_calling_the_hooks_ends(scenario: Scenario) -> None:
    inline = run(PoisonedBrain(scenario), scenario)
    called = run(HookCallingBrain(scenario), scenario)
    assert inline.inline  # both ways were really taken
    assert not called.inline
    assert inline.error == called.error
    assert inline.counters == called.counters
    assert inline.stage_losses == called.stage_losses
    assert_same_tensors(inline.parameters, called.parameters)
    assert_same_tensors(inline.optimizer_state, called.optimizer_state)


@pytest.mark.parametrize(
    ("run_opts", "inline"),
    [
        ({}, True),
        ({"max_grad_norm": 0.0, "precision": "bf16"}, True),
        ({"grad_accumulation_factor": 2}, False),
        ({"precision": "fp16"}, False),  # a grad scaler
        ({"skip_nonfinite_grads": True}, False),
    ],
)
def test_only_plain_steps_run_inline(run_opts: RunOptionsDict, inline: bool) -> None:
    brain = RegressionBrain({"model": torch.nn.Linear(4, 2)}, run_opts=run_opts)
    assert brain._current_plan().inline_steps is inline


@pytest.mark.parametrize(
    "hook",
    [
        "fit_batch",
        "on_fit_batch_start",
        "on_fit_batch_end",
        "check_loss_isfinite",
        "optimizers_step",
        "freeze_optimizers",
        "check_gradients",
        "update_average",
    ],
)
def test_overriding_any_per_batch_hook_makes_the_brain_call_the_hooks(hook: str) -> None:
    subclass = type("Overriding", (RegressionBrain,), {hook: getattr(RegressionBrain, hook)})
    assert subclass({"model": torch.nn.Linear(4, 2)})._current_plan().inline_steps is True
    overriding = type("Overriding", (RegressionBrain,), {hook: lambda self, *args: None})
    assert overriding({"model": torch.nn.Linear(4, 2)})._current_plan().inline_steps is False


def test_a_hook_set_on_the_instance_makes_the_brain_call_the_hooks() -> None:
    brain = RegressionBrain({"model": torch.nn.Linear(4, 2)})
    calls: list[bool] = []
    brain.on_fit_batch_start = lambda batch, should_step: calls.append(should_step)  # type: ignore[method-assign]  # a spy
    brain.fit(range(1, 2), ready_loader(batches(2, 4)), progressbar=False)
    assert calls == [True, True]


class _NanAtStep1(RegressionBrain):
    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        loss = super().compute_objectives(predictions, batch, stage)
        return loss * math.nan if stage is Stage.TRAIN and self.step == 1 else loss


def test_a_non_finite_loss_on_the_inline_path_keeps_no_graph_alive() -> None:
    brain = _NanAtStep1({"model": torch.nn.Linear(4, 2)}, OPTIMIZERS["sgd"])
    brain.noprogressbar = True
    assert brain._current_plan().inline_steps
    brain.fit(range(1, 2), ready_loader(batches(3, 2)))
    held = [
        value
        for value in vars(brain).values()
        if isinstance(value, Tensor) and value.grad_fn is not None
    ]
    assert held == []

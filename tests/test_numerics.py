"""The numerics of a training step: accumulation, clipping, non-finite values, precision."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.utils.data import DataLoader

from tests.helpers import (
    Batch,
    RegressionBrain,
    batches,
    call,
    parameters_of,
    ready_loader,
    regression_brain,
    sgd,
    unsized_loader,
)
from typedbrain import (
    Brain,
    ConfigurationError,
    HookContractError,
    NonFiniteLossError,
    OptimizerFactory,
    RunOptionsDict,
    Stage,
)


def concatenated(ready: Sequence[Batch], group: int) -> list[Batch]:
    """Merge consecutive runs of ``group`` batches into one (the last run may be shorter)."""
    merged: list[Batch] = []
    for start in range(0, len(ready), group):
        run = ready[start : start + group]
        merged.append((torch.cat([b[0] for b in run]), torch.cat([b[1] for b in run])))
    return merged


def trained(
    ready: Sequence[Batch],
    *,
    epochs: int = 1,
    run_opts: RunOptionsDict | None = None,
    momentum: float = 0.9,
    unsized: bool = False,
) -> Mapping[str, Tensor]:
    torch.manual_seed(0)
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)},
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=momentum),
        run_opts={"noprogressbar": True, "max_grad_norm": 0.0, **(run_opts or {})},
    )
    loader = unsized_loader(ready) if unsized else ready_loader(ready)
    brain.fit(range(1, epochs + 1), loader)
    return parameters_of(brain)


def assert_close(left: Mapping[str, Tensor], right: Mapping[str, Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------
# Gradient accumulation


@given(
    factor=st.integers(min_value=1, max_value=4),
    steps=st.integers(min_value=1, max_value=3),
    size=st.integers(min_value=1, max_value=3),
    seed=st.integers(min_value=0, max_value=2**16),
)
@settings(max_examples=25)
def test_accumulating_k_batches_equals_one_batch_k_times_larger(
    factor: int, steps: int, size: int, seed: int
) -> None:
    small = batches(factor * steps, size, seed=seed)
    accumulated = trained(small, epochs=2, run_opts={"grad_accumulation_factor": factor})
    large = trained(concatenated(small, factor), epochs=2)
    assert_close(accumulated, large)


@pytest.mark.parametrize("unsized", [False, True], ids=["known-length", "unknown-length"])
def test_leftover_batches_at_epoch_end_are_stepped_as_a_smaller_batch(unsized: bool) -> None:
    small = batches(5, 2, seed=3)
    accumulated = trained(
        small, epochs=2, run_opts={"grad_accumulation_factor": 2}, unsized=unsized
    )
    # Batches [1, 2], [3, 4] and [5]: the last step uses the mean gradient of batch 5 alone.
    large = trained(concatenated(small, 2), epochs=2)
    assert_close(accumulated, large)


def test_leftover_batches_change_the_weights_rather_than_being_dropped() -> None:
    small = batches(3, 2, seed=4)
    with_leftover = trained(small, run_opts={"grad_accumulation_factor": 2})
    without_leftover = trained(small[:2], run_opts={"grad_accumulation_factor": 2})
    assert not torch.equal(with_leftover["model.weight"], without_leftover["model.weight"])


# --------------------------------------------------------------------------------------------
# Clipping


class TwoGroupBrain(RegressionBrain):
    """Puts the weight and the bias in separate optimizer groups, plain SGD with lr 1."""

    def init_optimizers(self) -> None:
        model = self.modules["model"]
        assert isinstance(model, torch.nn.Linear)
        groups: list[dict[str, object]] = [{"params": [model.weight]}, {"params": [model.bias]}]
        self.optimizer = torch.optim.SGD(groups, lr=1.0)
        self.optimizers_dict = {"sgd": self.optimizer}


def one_step_update(max_grad_norm: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The weight change of one step, and the raw gradient that step would have applied."""
    torch.manual_seed(0)
    brain = TwoGroupBrain(
        {"model": torch.nn.Linear(4, 2)},
        run_opts={"noprogressbar": True, "max_grad_norm": max_grad_norm},
    )
    batch = batches(1, 8, seed=5)[0]
    reference = TwoGroupBrain({"model": torch.nn.Linear(4, 2)})
    reference.modules.load_state_dict(brain.modules.state_dict())
    predictions = reference.compute_forward(batch, Stage.TRAIN)
    torch.autograd.backward(reference.compute_objectives(predictions, batch, Stage.TRAIN))
    grads = {
        name: p.grad.clone()
        for name, p in reference.modules.named_parameters()
        if p.grad is not None
    }
    before = parameters_of(brain)
    brain.fit(range(1, 2), ready_loader([batch]))
    after = parameters_of(brain)
    return {name: before[name] - after[name] for name in before}, grads


def test_clipping_uses_the_norm_over_every_parameter_group() -> None:
    update, grads = one_step_update(max_grad_norm=0.1)
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    assert total > 0.1  # clipping must actually happen for this test to mean anything
    for name, grad in grads.items():
        torch.testing.assert_close(update[name], grad * (0.1 / total), rtol=1e-4, atol=1e-7)
    update_norm = math.sqrt(sum(float(u.pow(2).sum()) for u in update.values()))
    assert update_norm == pytest.approx(0.1, rel=1e-4)


@pytest.mark.parametrize("max_grad_norm", [0.0, -1.0])
def test_max_grad_norm_of_zero_or_less_disables_clipping(max_grad_norm: float) -> None:
    update, grads = one_step_update(max_grad_norm=max_grad_norm)
    for name, grad in grads.items():
        torch.testing.assert_close(update[name], grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Non-finite losses and gradients


def ADAMW(params: ParamsT) -> torch.optim.Optimizer:
    """AdamW with weight decay: it would move the weights even with zero gradients."""
    return torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)


class PoisonedBrain(RegressionBrain):
    """Returns a non-finite loss for the batches (1-based, per epoch) listed in ``poisoned``."""

    def __init__(
        self,
        poisoned: set[int],
        run_opts: RunOptionsDict | None = None,
        opt_class: OptimizerFactory = ADAMW,
    ) -> None:
        torch.manual_seed(0)
        super().__init__(
            {"model": torch.nn.Linear(4, 2)},
            opt_class,
            run_opts={"noprogressbar": True, **(run_opts or {})},
        )
        self.poisoned = poisoned

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        loss = super().compute_objectives(predictions, batch, stage)
        if stage is Stage.TRAIN and self.step in self.poisoned:
            return loss * math.nan
        return loss


def test_nan_loss_leaves_weights_and_optimizer_state_unchanged() -> None:
    brain = PoisonedBrain({1})
    before = parameters_of(brain)
    brain.fit(range(1, 2), ready_loader(batches(1, 4)))
    assert all(torch.equal(before[n], p) for n, p in parameters_of(brain).items())
    assert brain.optimizer.state_dict()["state"] == {}  # AdamW never stepped
    assert brain.optimizer_step == 0
    assert brain.nonfinite_count == 1


def test_nan_loss_among_finite_ones_is_left_out_of_the_step_and_the_average() -> None:
    finite = batches(1, 4, seed=6)[0]
    # SGD, not Adam: Adam's update hardly depends on the gradient's scale.
    poisoned = PoisonedBrain({2}, {"grad_accumulation_factor": 2}, sgd())
    poisoned.fit(range(1, 2), ready_loader([finite, finite]))
    clean = PoisonedBrain(set(), {"grad_accumulation_factor": 1}, sgd())
    clean.fit(range(1, 2), ready_loader([finite]))
    assert_close(parameters_of(poisoned), parameters_of(clean))
    assert poisoned.optimizer_step == 1


def test_nonfinite_patience_exhausted_raises_with_epoch_and_step() -> None:
    brain = PoisonedBrain({1, 3, 4}, {"nonfinite_patience": 2})
    before = parameters_of(brain)
    with pytest.raises(NonFiniteLossError) as caught:
        brain.fit(range(1, 3), ready_loader(batches(5, 4)))
    error = caught.value
    assert (error.epoch, error.step, error.count, error.patience) == (1, 4, 3, 2)
    assert str(error) == (
        "non-finite loss at epoch 1, step 4: 3 non-finite losses this epoch, more than "
        "nonfinite_patience=2 allows; no such loss was applied to the weights"
    )
    # Only batch 2 reached the weights.
    assert not torch.equal(before["model.weight"], parameters_of(brain)["model.weight"])


def test_nonfinite_count_starts_again_each_epoch(caplog: pytest.LogCaptureFixture) -> None:
    brain = PoisonedBrain({1}, {"nonfinite_patience": 1})
    with caplog.at_level(logging.WARNING, logger="typedbrain"):
        brain.fit(range(1, 4), ready_loader(batches(2, 4)))
    assert caplog.text.count("non-finite loss at epoch") == 3
    assert "(1 of 1 tolerated this epoch)" in caplog.text


def test_nonfinite_training_losses_are_left_out_of_the_average() -> None:
    class Recording(PoisonedBrain):
        averages: list[float]

        def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
            self.averages.append(stage_loss)

    brain = Recording({2}, {"max_grad_norm": 0.0})
    brain.averages = []
    reference = RegressionBrain({"model": torch.nn.Linear(4, 2)})
    ready = batches(3, 4)
    brain.modules.load_state_dict(reference.modules.state_dict())
    first_loss = float(reference.evaluate_batch(ready[0], Stage.TRAIN))
    brain.fit(range(1, 2), ready_loader(ready))
    assert math.isfinite(brain.averages[0])
    assert brain.averages[0] != pytest.approx(first_loss)  # batch 3 was averaged in too


class NanGradientBrain(RegressionBrain):
    """A finite loss whose gradient is NaN: d/dw sqrt(0 * w) at 0 is 0 * inf."""

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        loss = super().compute_objectives(predictions, batch, stage)
        return loss + torch.sqrt((predictions * 0).sum())


def nan_gradient_brain(run_opts: RunOptionsDict) -> NanGradientBrain:
    torch.manual_seed(0)
    return NanGradientBrain(
        {"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True, **run_opts}
    )


@pytest.mark.parametrize("max_grad_norm", [5.0, 0.0])
def test_skip_nonfinite_grads_skips_the_step(max_grad_norm: float) -> None:
    brain = nan_gradient_brain({"skip_nonfinite_grads": True, "max_grad_norm": max_grad_norm})
    before = parameters_of(brain)
    brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    assert all(torch.equal(before[n], p) for n, p in parameters_of(brain).items())
    assert brain.optimizer_step == 0


def test_without_skip_nonfinite_grads_nonfinite_grads_are_applied() -> None:
    brain = nan_gradient_brain({"max_grad_norm": 0.0})
    brain.fit(range(1, 2), ready_loader(batches(1, 4)))
    assert not torch.isfinite(parameters_of(brain)["model.weight"]).all()
    assert brain.optimizer_step == 1


def test_loss_that_is_not_a_scalar_is_a_clear_error() -> None:
    class VectorLoss(RegressionBrain):
        def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
            return (predictions - batch[1]).pow(2).mean(dim=0)

    brain = VectorLoss({"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True})
    with pytest.raises(HookContractError, match=r"one-element tensor \(the loss\), got \(2,\)"):
        brain.fit(range(1, 2), ready_loader(batches(1, 4)))


def test_nonfinite_validation_losses_are_counted_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NanValid(RegressionBrain):
        def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
            loss = super().compute_objectives(predictions, batch, stage)
            return loss * math.nan if stage is Stage.TEST and self.step == 1 else loss

    brain = NanValid({"model": torch.nn.Linear(4, 2)}, run_opts={"noprogressbar": True})
    with caplog.at_level(logging.WARNING, logger="typedbrain"):
        loss = brain.evaluate(ready_loader(batches(3, 4)))
    assert math.isfinite(loss)
    assert "TEST: 1 non-finite losses were left out of the mean loss" in caplog.text


def test_update_average_called_by_the_user_divides_by_self_step_and_leaves_out_nonfinite() -> None:
    brain = regression_brain()
    average = 0.0
    for value in [1.0, 2.0, math.nan, 6.0]:
        brain.step += 1
        average = brain.update_average(torch.tensor(value), average)
    # As SpeechBrain's: the non-finite value is left out, but self.step counted its batch.
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, math.nan, 6.0], start=1):
        if math.isfinite(value):
            expected += (value - expected) / step
    assert average == pytest.approx(expected)
    assert average == pytest.approx((1.0 + 2.0) / 2 + (6.0 - 1.5) / 4)


def test_update_average_called_by_the_user_before_any_batch_names_self_step() -> None:
    brain = regression_brain()
    with pytest.raises(HookContractError, match=r"self\.step is 0"):
        brain.update_average(torch.tensor(1.0), 0.0)


class OwnMeanBrain(RegressionBrain):
    """Keeps a running mean of its own (ten times the loss) with ``update_average``."""

    own_means: list[tuple[Stage, float]]
    stage_losses: list[tuple[Stage, float]]

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        self.own = 0.0

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        loss = super().compute_objectives(predictions, batch, stage)
        if stage is not Stage.TRAIN:
            self.own = self.update_average(loss.detach() * 10, self.own)
        return loss

    def on_fit_batch_end(
        self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
    ) -> None:
        self.own = self.update_average(loss * 10, self.own)

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        self.own_means.append((stage, self.own))
        self.stage_losses.append((stage, stage_loss))


def test_a_mean_the_recipe_keeps_with_update_average_leaves_the_stage_loss_alone() -> None:
    """The loop counts its own losses: a recipe's calls neither shift the stage's mean nor
    share its count (both means are the plain means of their batches' values)."""
    ready = batches(4, 3)
    brain = OwnMeanBrain(
        {"model": torch.nn.Linear(4, 2)}, sgd(0.0), run_opts={"noprogressbar": True}
    )
    brain.own_means, brain.stage_losses = [], []
    brain.fit(range(1, 2), ready_loader(ready), ready_loader(ready))
    plain = RegressionBrain(dict(brain.modules))
    with torch.no_grad():
        losses = [
            float(plain.compute_objectives(plain.compute_forward(b, Stage.VALID), b, Stage.VALID))
            for b in ready
        ]
    mean = sum(losses) / len(losses)
    assert [stage for stage, _ in brain.stage_losses] == [Stage.TRAIN, Stage.VALID]
    for _, stage_loss in brain.stage_losses:
        assert stage_loss == pytest.approx(mean, rel=1e-6)
    for _, own in brain.own_means:
        assert own == pytest.approx(10 * mean, rel=1e-6)


@pytest.mark.parametrize("stage", [Stage.TRAIN, Stage.VALID, Stage.TEST])
def test_a_stage_without_batches_gets_nan_and_warns(stage: Stage) -> None:
    seen: list[tuple[Stage, float]] = []

    class Recording(RegressionBrain):
        def on_stage_end(self, s: Stage, stage_loss: float, epoch: int | None = None) -> None:
            seen.append((s, stage_loss))

    brain = Recording({"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True})
    some, empty = ready_loader(batches(2, 3)), ready_loader([])
    train, valid = (empty, some) if stage is Stage.TRAIN else (some, empty)
    run = (
        (lambda: brain.evaluate(empty))
        if stage is Stage.TEST
        else (lambda: brain.fit(range(1, 2), train, valid))
    )
    with pytest.warns(UserWarning, match=f"the {stage.name} stage had no batches"):
        run()
    assert [s for s, loss in seen if math.isnan(loss)] == [stage]


# --------------------------------------------------------------------------------------------
# Precision


class AutocastSeeingBrain(RegressionBrain):
    seen: list[tuple[Stage, bool, torch.dtype]]

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        self.seen.append((stage, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return super().compute_forward(batch, stage)


def precision_brain(run_opts: RunOptionsDict) -> AutocastSeeingBrain:
    torch.manual_seed(0)
    brain = AutocastSeeingBrain(
        {"model": torch.nn.Linear(4, 2)},
        sgd(0.05),
        run_opts={"noprogressbar": True, "device": "cpu", **run_opts},
    )
    brain.seen = []
    return brain


def losses_over_epochs(brain: RegressionBrain, epochs: int) -> list[float]:
    recorded: list[float] = []
    ready = ready_loader(batches(8, 8))
    for _ in range(epochs):
        brain.fit(range(1, 2), ready)
        recorded.append(brain.evaluate(ready))
    return recorded


def test_bf16_training_runs_under_cpu_autocast_and_learns() -> None:
    brain = precision_brain({"precision": "bf16"})
    losses = losses_over_epochs(brain, 4)
    assert not brain.scaler.is_enabled()  # bf16 needs no loss scaling
    assert (Stage.TRAIN, True, torch.bfloat16) in brain.seen
    assert {enabled for stage, enabled, _ in brain.seen if stage is Stage.TEST} == {False}
    assert losses[-1] < losses[0] * 0.8


def test_eval_precision_applies_to_evaluation_only() -> None:
    brain = precision_brain({"precision": "fp32", "eval_precision": "bf16"})
    brain.fit(range(1, 2), ready_loader(batches(1, 4)))
    brain.evaluate(ready_loader(batches(1, 4)))
    assert [(stage, enabled) for stage, enabled, _ in brain.seen] == [
        (Stage.TRAIN, False),
        (Stage.TEST, True),
    ]


def test_fp16_training_uses_a_grad_scaler_and_learns() -> None:
    brain = precision_brain({"precision": "fp16"})
    assert brain.scaler.is_enabled()
    losses = losses_over_epochs(brain, 4)
    assert (Stage.TRAIN, True, torch.float16) in brain.seen
    assert brain.optimizer_step > 0
    assert losses[-1] < losses[0] * 0.8


# --------------------------------------------------------------------------------------------
# Limits and optimizer set-up


def test_optimizer_step_limit_stops_training() -> None:
    brain = regression_brain(run_opts={"optimizer_step_limit": 3})
    seen: list[int] = []
    brain.on_fit_batch_end = lambda batch, outputs, loss, should_step: seen.append(brain.step)  # type: ignore[method-assign]  # a spy
    brain.fit(range(1, 4), ready_loader(batches(5, 4)))
    assert brain.optimizer_step == 3
    assert seen == [1, 2, 3]


def test_remove_vector_weight_decay_puts_vectors_in_a_group_without_decay() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    brain = RegressionBrain(
        {"model": model},
        lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.3),
        run_opts={"remove_vector_weight_decay": True, "noprogressbar": True},
    )
    brain.fit(range(1, 2), ready_loader(batches(1, 4)))
    groups = brain.optimizer.param_groups
    assert [len(group["params"]) for group in groups] == [2, 4]
    assert all(p.ndim == 2 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"])
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.3, 0.0)


class AlternatingBrain(RegressionBrain):
    """Two optimizers, one per layer, stepped on alternate steps."""

    def init_optimizers(self) -> None:
        self.optimizers_dict = {
            "first": torch.optim.SGD(self.modules["first"].parameters(), lr=0.1),
            "second": torch.optim.SGD(self.modules["second"].parameters(), lr=0.1),
        }

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        hidden = call(self.modules["first"], batch[0])
        return call(self.modules["second"], hidden)

    def freeze_optimizers(
        self, optimizers: Mapping[str, torch.optim.Optimizer]
    ) -> Mapping[str, torch.optim.Optimizer]:
        name = "first" if self.optimizer_step % 2 == 0 else "second"
        return {name: optimizers[name]}


def test_several_optimizers_are_stepped_as_freeze_optimizers_chooses() -> None:
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    brain = AlternatingBrain({"first": first, "second": second}, run_opts={"noprogressbar": True})
    first_before, second_before = first.weight.detach().clone(), second.weight.detach().clone()
    brain.fit(range(1, 2), ready_loader(batches(1, 4)))
    assert not torch.equal(first_before, first.weight)
    assert torch.equal(second_before, second.weight)
    brain.fit(range(1, 2), ready_loader(batches(1, 4)))
    assert not torch.equal(second_before, second.weight)
    assert brain.optimizer_step == 2


def alternating_by_hand(
    ready: Sequence[Batch], first: torch.nn.Module, second: torch.nn.Module, *, k: int, clip: float
) -> None:
    """AlternatingBrain's run as the docs describe it: each step applies its window's mean
    gradient and clips its own optimizer's parameters; the other optimizer's gradients are
    held, untouched, and add up until it steps."""
    optimizers = [
        torch.optim.SGD(first.parameters(), lr=0.1),
        torch.optim.SGD(second.parameters(), lr=0.1),
    ]
    for start in range(0, len(ready), k):
        window = ready[start : start + k]
        for x, y in window:
            loss = torch.nn.functional.mse_loss(second(first(x)), y) / len(window)
            torch.autograd.backward(loss)
        steps = start // k
        stepping = optimizers[steps % 2]
        parameters = [p for group in stepping.param_groups for p in group["params"]]
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        stepping.step()
        stepping.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("k", "clip"), [(1, 0.05), (3, 0.0), (3, 0.05)])
def test_alternating_optimizers_clip_and_average_only_what_the_step_applies(
    k: int, clip: float
) -> None:
    """Clipping covers the stepping optimizer's parameters, and the epoch's short last window
    (4 batches, k=3) is the mean of its own batches: the held gradients of the optimizer left
    out are neither clipped nor rescaled."""
    ready = batches(4, 3)
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    first_ref, second_ref = copy.deepcopy(first), copy.deepcopy(second)
    brain = AlternatingBrain(
        {"first": first, "second": second},
        run_opts={"noprogressbar": True, "grad_accumulation_factor": k, "max_grad_norm": clip},
    )
    brain.fit(range(1, 2), ready_loader(ready))
    alternating_by_hand(ready, first_ref, second_ref, k=k, clip=clip)
    for mine, theirs in [(first, first_ref), (second, second_ref)]:
        for name, parameter in mine.named_parameters():
            torch.testing.assert_close(
                parameter, dict(theirs.named_parameters())[name], rtol=0, atol=1e-7
            )


class GrowingScaleBrain(AlternatingBrain):
    """fp16 with a grad scaler whose scale doubles after every step it takes."""

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.scaler.is_enabled():
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1)


@pytest.mark.parametrize("growing", [False, True])
def test_fp16_alternating_optimizers_step_like_fp32(growing: bool) -> None:
    """The held gradients of the optimizer left out are in the grad scaler's units: they are
    neither clipped with the stepping optimizer's unscaled ones nor left in an old scale's
    units when the scale changes (both made fp16 runs step far from fp32 ones)."""
    ready = batches(6, 3)
    moved: dict[str, list[Tensor]] = {}
    for precision in ("fp32", "fp16"):
        torch.manual_seed(0)
        first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        before = [p.detach().clone() for p in [*first.parameters(), *second.parameters()]]
        kind = GrowingScaleBrain if growing else AlternatingBrain
        brain = kind(
            {"first": first, "second": second},
            # Clipping would hide a rescaling error: test it without (growing) and with.
            run_opts={
                "noprogressbar": True,
                "precision": precision,
                "max_grad_norm": 0.0 if growing else 0.2,
            },
        )
        if precision == "fp16" and not growing:
            brain.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        brain.fit(range(1, 2), ready_loader(ready))
        assert brain.optimizer_step == 6  # no step was skipped for overflowing gradients
        after = [p.detach() for p in [*first.parameters(), *second.parameters()]]
        moved[precision] = [a - b for a, b in zip(after, before, strict=True)]
    for fp16, fp32 in zip(moved["fp16"], moved["fp32"], strict=True):
        torch.testing.assert_close(fp16, fp32, rtol=0.02, atol=2e-4)


def test_optimizer_property_explains_when_there_is_none() -> None:
    brain = RegressionBrain({"model": torch.nn.Linear(4, 2)})
    with pytest.raises(ConfigurationError, match="this brain has no optimizer: pass opt_class"):
        _ = brain.optimizer


# Recent torch releases deprecate TorchScript (DeprecationWarning in 2.13, FutureWarning in
# 2.14; older ones do not warn): the warning is torch's, not what this test is about.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_jit_scripts_the_named_modules_and_trains() -> None:
    brain = regression_brain(run_opts={"jit": True, "jit_module_keys": ("model",)})
    before = parameters_of(brain)
    brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    assert isinstance(brain.modules["model"], torch.jit.ScriptModule)
    assert not torch.equal(before["model.weight"], parameters_of(brain)["model.weight"])


def test_compile_names_must_be_modules() -> None:
    brain = regression_brain(run_opts={"compile": True, "compile_module_keys": ("encoder",)})
    with pytest.raises(
        ConfigurationError,
        match=r"run option 'compile_module_keys' names 'encoder', which is not one of the "
        r"modules \(model\)",
    ):
        brain.fit(range(1, 2), ready_loader(batches(1, 4)))


@pytest.mark.slow
# torch.compile's first use imports parts of torch that call torch.jit.script_method, which
# torch 2.13 deprecates: torch's warning about its own code, not about this test's.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_compiles_the_named_modules_and_trains() -> None:
    brain = regression_brain(run_opts={"compile": True, "compile_module_keys": ["model"]})
    before = parameters_of(brain)
    brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    compiled = brain.modules["model"]
    assert type(compiled).__name__ == "OptimizedModule"
    assert not torch.equal(before["model.weight"], parameters_of(brain)["model._orig_mod.weight"])


def test_data_parallel_backend_wraps_trainable_modules() -> None:
    torch.manual_seed(0)
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2), "frozen": torch.nn.Linear(2, 2).requires_grad_(False)},
        sgd(),
        run_opts={"data_parallel_backend": True, "noprogressbar": True},
    )
    brain.fit(range(1, 2), ready_loader(batches(1, 4)))
    assert isinstance(brain.modules["model"], torch.nn.DataParallel)
    assert isinstance(brain.modules["frozen"], torch.nn.Linear)


class Undercounted(torch.utils.data.IterableDataset[Tensor]):
    """Eight ones, while ``len`` says four (an estimate, as some streamed datasets give)."""

    def __iter__(self) -> Iterator[Tensor]:
        return iter([torch.ones(1)] * 8)

    def __len__(self) -> int:
        return 4


class SumBrain(Brain[Tensor, Tensor]):
    """The loss is the model's output: with input 1, every batch's gradient is 1."""

    def compute_forward(self, batch: Tensor, stage: Stage) -> Tensor:
        return call(self.modules["model"], batch)

    def compute_objectives(self, predictions: Tensor, batch: Tensor, stage: Stage) -> Tensor:
        return predictions.sum()


# torch warns that the loader yielded more than its length: the case under test.
@pytest.mark.filterwarnings("ignore:Length of IterableDataset")
def test_windows_past_a_length_that_undercounts_still_step_their_mean_gradient() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    brain = SumBrain(
        {"model": model},
        sgd(1.0),
        run_opts={"noprogressbar": True, "grad_accumulation_factor": 4, "max_grad_norm": 0.0},
    )
    brain.fit(range(1, 2), DataLoader(Undercounted(), batch_size=None))
    assert brain.optimizer_step == 2
    assert model.weight.item() == pytest.approx(-2.0)  # two steps of the mean gradient, 1


@pytest.mark.parametrize("max_grad_norm", [0.0, -1.0])
def test_skip_nonfinite_grads_does_not_clip_finite_gradients_when_clipping_is_off(
    max_grad_norm: float,
) -> None:
    ready = batches(2, 4, seed=3)
    checked = trained(
        ready, run_opts={"skip_nonfinite_grads": True, "max_grad_norm": max_grad_norm}
    )
    plain = trained(ready, run_opts={"max_grad_norm": max_grad_norm})
    assert_close(checked, plain)


def test_a_step_skipped_for_nonfinite_gradients_is_logged_with_epoch_and_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    brain = nan_gradient_brain({"skip_nonfinite_grads": True})
    with caplog.at_level(logging.WARNING, logger="typedbrain"):
        brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    for step in (1, 2):
        assert (
            f"non-finite gradients at epoch 1, step {step}: optimizer step skipped" in caplog.text
        )


def test_check_gradients_given_a_nonfinite_loss_refuses_the_step_and_counts_it() -> None:
    # The style of older recipes: a fit_batch of their own calls check_gradients(loss).
    brain = regression_brain()
    assert brain.check_gradients(torch.tensor(math.nan)) is False
    assert brain.nonfinite_count == 1
    assert brain.check_gradients(torch.tensor(1.0)) is True
    assert brain.nonfinite_count == 1


def test_fit_batch_returns_the_loss_detached() -> None:
    brain = regression_brain()
    brain.init_optimizers()
    brain.step = 1
    loss = brain.fit_batch(batches(1, 4)[0])
    assert not loss.requires_grad
    assert loss.grad_fn is None
    assert loss.is_cpu


def test_optimizer_step_limit_reached_at_an_epochs_end_starts_no_further_epoch() -> None:
    brain = regression_brain(run_opts={"optimizer_step_limit": 4})
    stages: list[tuple[Stage, int | None]] = []
    brain.on_stage_start = lambda stage, epoch=None: stages.append((stage, epoch))  # type: ignore[method-assign]  # a spy
    brain.fit(range(1, 4), ready_loader(batches(2, 4)), valid_set=ready_loader(batches(1, 4)))
    assert brain.optimizer_step == 4
    assert stages == [
        (Stage.TRAIN, 1),
        (Stage.VALID, 1),
        (Stage.TRAIN, 2),
        (Stage.VALID, 2),
    ]


def test_check_gradients_drops_nonfinite_gradients_when_it_refuses_the_step() -> None:
    brain = nan_gradient_brain({"skip_nonfinite_grads": True})
    brain.init_optimizers()
    batch = batches(1, 4)[0]
    predictions = brain.compute_forward(batch, Stage.TRAIN)
    torch.autograd.backward(brain.compute_objectives(predictions, batch, Stage.TRAIN))
    assert brain.check_gradients() is False
    assert all(p.grad is None for p in brain.modules.parameters())

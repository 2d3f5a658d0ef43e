"""The loop at its edges: optimizers assigned by hand, skipped fp16 steps, all-NaN stages,
a run after a failed one, and options changed on a built brain."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import typedbrain as tb
import typedbrain._brain
from tests.helpers import (
    Batch,
    ReadyBatches,
    RegressionBrain,
    batches,
    examples,
    parameters_of,
    ready_loader,
    sgd,
)
from typedbrain import (
    Checkpointer,
    ConfigurationError,
    HookContractError,
    LoaderKwargs,
    Phase,
    Precision,
    ResumeWarning,
    RunOptionsDict,
    Stage,
)
from typedbrain._sampler import loader_seed


class AssigningBrain(RegressionBrain):
    """Builds its optimizer by assigning ``self.optimizer``, as older recipes do."""

    def init_optimizers(self) -> None:
        self.optimizer = torch.optim.SGD(self.modules.parameters(), lr=0.1)


def brain_of(cls: type[RegressionBrain], run_opts: RunOptionsDict | None = None) -> RegressionBrain:
    torch.manual_seed(0)
    return cls(
        {"model": torch.nn.Linear(4, 2)},
        sgd(),
        run_opts={"noprogressbar": True, **(run_opts or {})},
    )


def test_an_optimizer_assigned_in_init_optimizers_is_stepped() -> None:
    brain = brain_of(AssigningBrain)
    before = parameters_of(brain)
    brain.fit(range(1, 2), ready_loader(batches(3, 4)))
    assert brain.optimizers_dict == {"opt_class": brain.optimizer}
    assert brain.optimizer_step == 3
    after = parameters_of(brain)
    assert all(not torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in brain.modules.parameters())


def test_fit_warns_when_opt_class_was_given_but_no_optimizer_was_built() -> None:
    class SkipsSuper(RegressionBrain):
        def on_fit_start(self) -> None:  # forgets super().on_fit_start()
            pass

    brain = brain_of(SkipsSuper)
    before = parameters_of(brain)
    with pytest.warns(UserWarning, match=r"fit\(\) trains with no optimizer: opt_class was given"):
        brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    after = parameters_of(brain)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_assigning_the_optimizer_keeps_the_optimizers_a_recipe_listed() -> None:
    class Listing(RegressionBrain):
        def init_optimizers(self) -> None:
            weight, bias = self.modules["model"].parameters()
            first = torch.optim.SGD([weight], lr=0.1)
            self.optimizers_dict = {"weights": first, "biases": torch.optim.SGD([bias], lr=0.1)}
            self.optimizer = first

    brain = brain_of(Listing)
    brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    assert list(brain.optimizers_dict) == ["weights", "biases"]


def test_reassigning_the_optimizer_replaces_the_default_one() -> None:
    class Replacing(RegressionBrain):
        def init_optimizers(self) -> None:
            super().init_optimizers()
            self.optimizer = torch.optim.Adam(self.modules.parameters(), lr=0.01)

    brain = brain_of(Replacing)
    brain.fit(range(1, 2), ready_loader(batches(2, 4)))
    assert brain.optimizers_dict == {"opt_class": brain.optimizer}
    assert isinstance(brain.optimizer, torch.optim.Adam)


def test_fp16_steps_that_the_grad_scaler_skips_are_not_counted() -> None:
    torch.manual_seed(0)
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)},
        lambda params: torch.optim.Adam(params, lr=0.01),
        run_opts={"noprogressbar": True, "precision": "fp16"},
    )
    brain.fit(range(1, 2), ready_loader(batches(6, 4)))
    scaler = brain.scaler
    assert scaler.is_enabled()
    weight = brain.modules["model"].weight
    assert isinstance(weight, Tensor)
    taken = int(brain.optimizer.state[weight]["step"])
    assert scaler.get_scale() < 2.0**16  # the scaler did skip steps (it starts at 2**16) ...
    assert 0 < taken < 6
    assert brain.optimizer_step == taken  # ... and only the steps taken are counted


class StageLosses(RegressionBrain):
    """Records ``on_stage_end``'s loss; its validation and test losses are NaN from batch 2."""

    nan_from = 1
    seen: list[tuple[Stage, float]]

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        loss = super().compute_objectives(predictions, batch, stage)
        if stage is not Stage.TRAIN and self.step >= self.nan_from:
            return loss * math.nan
        return loss

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        self.seen.append((stage, stage_loss))


def stage_losses(nan_from: int) -> StageLosses:
    brain = brain_of(StageLosses)
    assert isinstance(brain, StageLosses)
    brain.nan_from, brain.seen = nan_from, []
    return brain


def test_a_stage_whose_every_loss_is_non_finite_ends_with_nan_not_zero() -> None:
    brain = stage_losses(nan_from=1)
    brain.fit(range(1, 2), ready_loader(batches(2, 4)), ready_loader(batches(3, 4)))
    test_loss = brain.evaluate(ready_loader(batches(3, 4)))
    (train, train_loss), (valid, valid_loss), (test, _) = brain.seen
    assert (train, valid, test) == (Stage.TRAIN, Stage.VALID, Stage.TEST)
    assert math.isfinite(train_loss)
    assert math.isnan(valid_loss)
    assert math.isnan(test_loss)


def test_a_stage_with_some_finite_losses_averages_those() -> None:
    brain = stage_losses(nan_from=2)
    test_loss = brain.evaluate(ready_loader(batches(3, 4)))
    assert math.isfinite(test_loss)
    assert test_loss > 0


class FailingOnce(RegressionBrain):
    """Raises in the third training batch of its first fit; records every step it sees."""

    failed = False
    steps: list[int]

    def on_fit_batch_end(
        self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
    ) -> None:
        self.steps.append(self.step)
        if self.step == 3 and not self.failed:
            self.failed = True
            raise RuntimeError("boom")


def test_a_fit_after_a_failed_one_counts_its_batches_from_one() -> None:
    brain = brain_of(FailingOnce)
    assert isinstance(brain, FailingOnce)
    brain.steps = []
    with pytest.raises(RuntimeError, match="boom"):
        brain.fit(range(1, 2), ready_loader(batches(4, 4)))
    assert brain.phase is Phase.FAILED
    brain.steps = []
    brain.fit(range(1, 2), ready_loader(batches(4, 4)))
    assert brain.steps == [1, 2, 3, 4]


def test_an_evaluate_after_a_failed_one_runs_its_debug_batches() -> None:
    class FailingEvaluation(RegressionBrain):
        fail = True
        calls = 0

        def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
            self.calls += 1
            if self.fail and self.step == 2:
                raise RuntimeError("boom")
            return super().compute_objectives(predictions, batch, stage)

    brain = brain_of(FailingEvaluation, {"debug": True, "debug_batches": 3})
    assert isinstance(brain, FailingEvaluation)
    with pytest.raises(RuntimeError, match="boom"):
        brain.evaluate(ready_loader(batches(5, 4)))
    brain.fail, brain.calls = False, 0
    brain.evaluate(ready_loader(batches(5, 4)))
    assert brain.calls == 3


def test_a_loss_that_is_not_a_tensor_in_evaluation_is_a_hook_contract_error() -> None:
    class FloatLoss(RegressionBrain):
        def compute_objectives(  # type: ignore[override]  # returns a float on purpose
            self, predictions: Tensor, batch: Batch, stage: Stage
        ) -> float:
            return 0.5

    brain = brain_of(FloatLoss)
    with pytest.raises(HookContractError, match=r"one-element tensor .*got float"):
        brain.evaluate(ready_loader(batches(1, 4)))


@pytest.mark.parametrize(
    ("built", "assigned"), [("fp32", "fp16"), ("fp16", "fp32"), ("bf16", "fp16")]
)
def test_precision_cannot_change_to_or_from_fp16_once_the_brain_is_built(
    built: Precision, assigned: Precision
) -> None:
    brain = brain_of(RegressionBrain, {"precision": built})
    with pytest.raises(ConfigurationError, match=f"from '{built}' to '{assigned}'"):
        brain.precision = assigned
    assert brain.precision == built


def test_precision_may_change_between_fp32_and_bf16() -> None:
    brain = brain_of(RegressionBrain)
    brain.precision = "bf16"
    brain.fit(range(1, 2), ready_loader(batches(1, 4)))
    brain.precision = "fp32"
    assert brain.run_opts.precision == "fp32"


def test_an_override_that_renames_a_keyword_the_loop_passes_is_refused_when_built() -> None:
    class RenamedKeys(RegressionBrain):
        def on_evaluate_start(
            self, max_metric: str | None = None, min_metric: str | None = None
        ) -> None:
            del max_metric, min_metric

    class RenamedFlag(RegressionBrain):
        def zero_grad(self, to_none: bool = False) -> None:
            del to_none

    with pytest.raises(
        HookContractError,
        match=r"RenamedKeys.on_evaluate_start must accept max_key, min_key by name",
    ):
        brain_of(RenamedKeys)
    with pytest.raises(HookContractError, match=r"zero_grad\(set_to_none=...\)"):
        brain_of(RenamedFlag)


def test_overrides_with_the_keywords_or_kwargs_are_accepted() -> None:
    class KeepsNames(RegressionBrain):
        def on_evaluate_start(self, max_key: str | None = None, min_key: str | None = None) -> None:
            super().on_evaluate_start(max_key, min_key)

    class TakesAnything(RegressionBrain):
        def zero_grad(self, *args: object, **kwargs: object) -> None:
            super().zero_grad()

    for brain_class in (KeepsNames, TakesAnything):
        brain = brain_of(brain_class)
        brain.fit(range(1, 2), ready_loader(batches(1, 4)))
        brain.evaluate(ready_loader(batches(1, 4)))


class ScalerStyleBrain(RegressionBrain):
    """A ``fit_batch`` written for SpeechBrain 1.x, which always has ``self.scaler``."""

    def fit_batch(self, batch: Batch) -> Tensor:
        outputs = self.compute_forward(batch, Stage.TRAIN)
        loss = self.compute_objectives(outputs, batch, Stage.TRAIN)
        torch.autograd.backward(self.scaler.scale(loss))
        self.scaler.unscale_(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        self.optimizer_step += 1
        return loss.detach().cpu()


def test_a_fit_batch_using_the_scaler_runs_unscaled_outside_fp16() -> None:
    options: RunOptionsDict = {"max_grad_norm": 0.0}
    styled = brain_of(ScalerStyleBrain, options)
    plain = brain_of(RegressionBrain, options)
    assert not styled.scaler.is_enabled()
    for brain in (styled, plain):
        brain.fit(range(1, 3), ready_loader(batches(4, 4)))
    assert styled.optimizer_step == plain.optimizer_step == 8
    for name, value in parameters_of(plain).items():
        assert torch.equal(parameters_of(styled)[name], value), name


def _checkpointed(run_opts: RunOptionsDict, folder: Path) -> RegressionBrain:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return RegressionBrain(
        {"model": model},
        sgd(),
        run_opts={"noprogressbar": True, **run_opts},
        checkpointer=Checkpointer(folder, {"model": model}),
    )


def test_a_checkpoint_of_another_precision_loads_without_the_grad_scaler(tmp_path: Path) -> None:
    trained = _checkpointed({"precision": "fp32"}, tmp_path)
    trained.fit(range(1, 2), ready_loader(batches(2, 4)))
    assert isinstance(trained.checkpointer, Checkpointer)
    trained.checkpointer.save_checkpoint()
    fp16 = _checkpointed({"precision": "fp16"}, tmp_path)
    fp16.evaluate(ready_loader(batches(2, 4)))  # recovers the fp32 checkpoint: no 'scaler'
    assert torch.equal(parameters_of(fp16)["model.weight"], parameters_of(trained)["model.weight"])
    assert fp16.scaler.get_scale() == 2.0**16  # a fresh scaler


def test_a_checkpoint_without_the_brains_run_state_loads_and_fit_warns(tmp_path: Path) -> None:
    torch.manual_seed(1)
    saved = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(saved.parameters(), lr=0.1)
    # Saved by a plain checkpointer, not by a brain: no 'brain' entry.
    Checkpointer(tmp_path, {"model": saved, "optimizer": optimizer}).save_checkpoint()
    evaluated = _checkpointed({}, tmp_path)
    evaluated.evaluate(ready_loader(batches(2, 4)))
    assert torch.equal(parameters_of(evaluated)["model.weight"], saved.weight)

    trained = _checkpointed({}, tmp_path)
    with pytest.warns(ResumeWarning, match="holds no run state of a brain") as caught:
        trained.fit(range(1, 2), ready_loader(batches(2, 4)))
    assert caught[0].filename == __file__
    assert trained.optimizer_step == 2  # the run started afresh from the saved weights


class EpochSizedBatches:
    """A batch sampler that makes its batches in ``set_epoch``: more of them in later epochs."""

    def __init__(self, items: int, per_epoch: Mapping[int, int]) -> None:
        self.items = items
        self.per_epoch = per_epoch
        self.batches: list[list[int]] = []
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        count = self.per_epoch[epoch]
        self.batches = [list(range(self.items))[i::count] for i in range(count)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


class StepRecorder(RegressionBrain):
    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        self.stepped_after: list[int] = []

    def on_fit_batch_start(self, batch: Batch, should_step: bool) -> None:
        if should_step:
            self.stepped_after.append(self.step)

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        self.epochs = {**getattr(self, "epochs", {}), epoch: (self.step, self.stepped_after)}


def test_the_epochs_own_batch_count_closes_the_accumulation_window_of_a_batch_sampler() -> None:
    # The batch sampler knows an epoch's batches once set_epoch is called: the loop must ask
    # its length after that, or it closes a window at the previous epoch's last batch.
    sampler = EpochSizedBatches(24, {0: 9, 1: 9, 2: 10, 3: 12})
    loader: DataLoader[object] = DataLoader(
        cast(Dataset[object], examples(24)), batch_sampler=sampler
    )
    brain = brain_of(StepRecorder, {"grad_accumulation_factor": 4})
    brain.fit(range(1, 4), loader)
    assert cast(StepRecorder, brain).epochs == {
        1: (9, [4, 8, 9]),
        2: (10, [4, 8, 10]),
        3: (12, [4, 8, 12]),
    }


def test_an_error_reading_the_loss_is_not_reported_as_a_wrong_shape() -> None:
    """Reading a one-element loss can fail on its device (here: the meta device, which holds
    no values; on a GPU, an asynchronous kernel error): that error goes on as it is."""
    brain = RegressionBrain({"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"device": "meta"})
    with pytest.raises(RuntimeError, match="meta"):  # not HookContractError, a TypeError
        brain.fit(range(1, 2), ready_loader(batches(1, 4)))


@pytest.mark.parametrize("hooked", [False, True])
def test_without_an_optimizer_no_step_is_counted(hooked: bool) -> None:
    class Hooked(RegressionBrain):
        def on_fit_batch_end(
            self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
        ) -> None:
            pass

    kind = Hooked if hooked else RegressionBrain  # the inline step, and the general one
    brain = kind({"model": torch.nn.Linear(4, 2)}, run_opts={"noprogressbar": True})
    brain.fit(range(1, 2), ready_loader(batches(3, 4)))
    assert brain.optimizer_step == 0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"ckpt_interval_steps": 2}, "ckpt_interval_steps=2"),
        ({"ckpt_interval_minutes": 1.5}, "ckpt_interval_minutes=1.5"),
    ],
)
def test_a_checkpoint_interval_without_a_checkpointer_warns(
    options: RunOptionsDict, named: str
) -> None:
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True, **options}
    )
    with pytest.warns(UserWarning, match=f"{named} saves nothing: this brain has no checkpointer"):
        brain.fit(range(1, 2), ready_loader(batches(2, 4)))


@pytest.mark.parametrize("stage", [Stage.TRAIN, Stage.VALID])
def test_a_users_loader_with_persistent_workers_warns_that_resumes_are_not_exact(
    stage: Stage,
) -> None:
    persistent = DataLoader(
        ReadyBatches(batches(2, 4)),
        batch_size=None,
        num_workers=1,
        persistent_workers=True,
    )
    plain = ready_loader(batches(2, 4))
    train, valid = (persistent, plain) if stage is Stage.TRAIN else (plain, persistent)
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True}
    )
    with pytest.warns(ResumeWarning, match=f"the {stage.value} DataLoader keeps its workers"):
        brain.fit(range(1, 2), train, valid)


def test_loader_options_given_with_a_ready_dataloader_warn_that_they_are_ignored() -> None:
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True}
    )
    with pytest.warns(UserWarning, match=r"the train loader options \['batch_size'\] are ignored"):
        brain.fit(range(1, 2), ready_loader(batches(2, 4)), train_loader_kwargs={"batch_size": 2})


def test_a_seed_in_the_loader_options_is_taken_under_a_process_group_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It was passed twice to make_dataloader there (a TypeError): the given one is used."""

    def no_draw() -> int:
        raise AssertionError("a seed was given: none is drawn")

    monkeypatch.setattr(typedbrain._brain, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(typedbrain._brain, "seed_from_main", no_draw)
    brain = RegressionBrain({"model": torch.nn.Linear(4, 2)})
    options = cast(LoaderKwargs, {"seed": 7, "batch_size": 2})  # seed: make_dataloader's own
    loader = brain.make_dataloader(examples(8), Stage.TRAIN, **options)
    assert loader_seed(loader) == 7
    assert len(loader) == 2  # this rank's half of the 8 examples, in batches of 2


def test_a_misspelt_seed_in_the_loader_options_is_named_with_a_suggestion() -> None:
    brain = RegressionBrain({"model": torch.nn.Linear(4, 2)})
    options = cast(LoaderKwargs, {"sed": 7})
    with pytest.raises(
        ConfigurationError, match="unknown DataLoader option 'sed'; did you mean 'seed'"
    ):
        brain.make_dataloader(examples(8), Stage.TRAIN, **options)


class OrderSeeingBrain(RegressionBrain):
    """Records the first target value of each validation batch, per epoch."""

    orders: dict[int, list[float]]
    epoch = 0

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        self.epoch = epoch or 0

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        if stage is Stage.VALID:
            self.orders.setdefault(self.epoch, []).extend(batch[1][:, 0].tolist())
        return super().compute_forward(batch, stage)


def validation_orders() -> dict[int, list[float]]:
    torch.manual_seed(0)
    brain = OrderSeeingBrain(
        {"model": torch.nn.Linear(4, 2)}, sgd(), run_opts={"noprogressbar": True}
    )
    brain.orders = {}
    brain.fit(
        range(1, 4),
        examples(8),
        examples(16, seed=1),
        train_loader_kwargs={"batch_size": 4},
        valid_loader_kwargs={"batch_size": 4, "shuffle": True},
    )
    return brain.orders


def test_a_shuffled_validation_set_is_shuffled_each_epoch_as_a_function_of_it() -> None:
    orders = validation_orders()
    assert sorted(orders) == [1, 2, 3]
    assert len({tuple(order) for order in orders.values()}) == 3  # torch's shuffle=True does so
    assert validation_orders() == orders  # and a run again sees the same orders


class NonFiniteTraining(RegressionBrain):
    """Every training loss is NaN; records the losses ``on_stage_end`` gets."""

    seen: list[tuple[Stage, float]]

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        loss = super().compute_objectives(predictions, batch, stage)
        return loss * math.nan if stage is Stage.TRAIN else loss

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        self.seen.append((stage, stage_loss))


@pytest.mark.parametrize("run_opts", [{}, {"grad_accumulation_factor": 2}])
def test_a_training_stage_whose_every_loss_is_non_finite_ends_with_nan_and_had_batches(
    run_opts: RunOptionsDict,
) -> None:
    brain = brain_of(NonFiniteTraining, {"nonfinite_patience": 10, **run_opts})
    assert isinstance(brain, NonFiniteTraining)
    brain.seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        brain.fit(range(1, 2), ready_loader(batches(3, 4)))
    ((stage, train_loss),) = brain.seen
    assert stage is Stage.TRAIN
    assert math.isnan(train_loss)
    assert brain.nonfinite_count == 3
    assert not [w for w in caught if "had no batches" in str(w.message)]


def test_evaluate_with_use_current_weights_recovers_no_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    brain = RegressionBrain(
        {"model": model},
        sgd(),
        run_opts={"noprogressbar": True},
        checkpointer=tb.Checkpointer(tmp_path, {"model": model}),
    )
    assert isinstance(brain.checkpointer, tb.Checkpointer)
    brain.checkpointer.save_checkpoint()
    with torch.no_grad():
        model.weight.add_(1.0)
    current = model.weight.clone()
    brain.evaluate(ready_loader(batches(1, 4)), use_current_weights=True)
    assert torch.equal(model.weight, current)
    brain.evaluate(ready_loader(batches(1, 4)))  # the default recovers the checkpoint
    assert not torch.equal(model.weight, current)

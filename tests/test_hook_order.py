"""The order in which fit and evaluate call the hooks, asserted as exact lists."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import Unpack

from tests.helpers import (
    Batch,
    RegressionBrain,
    batches,
    examples,
    ready_loader,
    regression_brain,
    sgd,
    unsized_loader,
)
from typedbrain import DataSource, LoaderKwargs, RunOptionsDict, Stage

Call = tuple[object, ...]


class RecordingBrain(RegressionBrain):
    """Records every hook call with the arguments that identify it."""

    def __init__(self, run_opts: RunOptionsDict | None = None) -> None:
        torch.manual_seed(0)
        super().__init__(
            modules={"model": torch.nn.Linear(4, 2)},
            opt_class=sgd(),
            run_opts={"noprogressbar": True, **(run_opts or {})},
        )
        self.calls: list[Call] = []

    def make_dataloader(
        self,
        dataset: DataSource,
        stage: Stage,
        ckpt_prefix: str | None = "dataloader-",
        **loader_kwargs: Unpack[LoaderKwargs],
    ) -> DataLoader[object]:
        self.calls.append(("make_dataloader", stage))
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def on_fit_start(self) -> None:
        self.calls.append(("on_fit_start",))
        super().on_fit_start()

    def init_optimizers(self) -> None:
        self.calls.append(("init_optimizers",))
        super().init_optimizers()

    def on_evaluate_start(self, max_key: str | None = None, min_key: str | None = None) -> None:
        self.calls.append(("on_evaluate_start", max_key, min_key))
        super().on_evaluate_start(max_key, min_key)

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        self.calls.append(("on_stage_start", stage, epoch))

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        self.calls.append(("on_stage_end", stage, epoch))

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.calls.append(("zero_grad", set_to_none))
        super().zero_grad(set_to_none)

    def move_batch(self, batch: Batch) -> Batch:
        self.calls.append(("move_batch",))
        return super().move_batch(batch)

    def fit_batch(self, batch: Batch) -> Tensor:
        self.calls.append(("fit_batch",))
        return super().fit_batch(batch)

    def on_fit_batch_start(self, batch: Batch, should_step: bool) -> None:
        self.calls.append(("on_fit_batch_start", should_step))

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        self.calls.append(("compute_forward", stage))
        return super().compute_forward(batch, stage)

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        self.calls.append(("compute_objectives", stage))
        return super().compute_objectives(predictions, batch, stage)

    def check_loss_isfinite(self, loss: Tensor) -> bool:
        self.calls.append(("check_loss_isfinite",))
        return super().check_loss_isfinite(loss)

    def optimizers_step(self) -> None:
        self.calls.append(("optimizers_step",))
        super().optimizers_step()

    def freeze_optimizers(
        self, optimizers: Mapping[str, torch.optim.Optimizer]
    ) -> Mapping[str, torch.optim.Optimizer]:
        self.calls.append(("freeze_optimizers",))
        return super().freeze_optimizers(optimizers)

    def check_gradients(self, loss: Tensor | None = None) -> bool:
        self.calls.append(("check_gradients",))
        return super().check_gradients(loss)

    def on_fit_batch_end(
        self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
    ) -> None:
        self.calls.append(("on_fit_batch_end", should_step))

    def evaluate_batch(self, batch: Batch, stage: Stage) -> Tensor:
        self.calls.append(("evaluate_batch", stage))
        return super().evaluate_batch(batch, stage)

    def update_average(self, loss: Tensor | float, avg_loss: float) -> float:
        self.calls.append(("update_average",))
        return super().update_average(loss, avg_loss)


LOADER: LoaderKwargs = {"batch_size": 4}

FIT_START: list[Call] = [
    ("on_fit_start",),
    ("init_optimizers",),
]


def optimizer_step() -> list[Call]:
    return [("optimizers_step",), ("freeze_optimizers",), ("check_gradients",)]


def train_batch(should_step: bool) -> list[Call]:
    return [
        ("move_batch",),
        ("fit_batch",),
        ("on_fit_batch_start", should_step),
        ("compute_forward", Stage.TRAIN),
        ("compute_objectives", Stage.TRAIN),
        ("check_loss_isfinite",),
        *(optimizer_step() if should_step else []),
        ("on_fit_batch_end", should_step),
        ("update_average",),
    ]


def train_stage_start(epoch: int) -> list[Call]:
    return [("on_stage_start", Stage.TRAIN, epoch), ("zero_grad", False), ("freeze_optimizers",)]


def train_stage_end(epoch: int) -> list[Call]:
    return [("zero_grad", True), ("freeze_optimizers",), ("on_stage_end", Stage.TRAIN, epoch)]


def eval_stage(stage: Stage, epoch: int | None, count: int) -> list[Call]:
    per_batch: list[Call] = [
        ("move_batch",),
        ("evaluate_batch", stage),
        ("compute_forward", stage),
        ("compute_objectives", stage),
        ("update_average",),
    ]
    return [("on_stage_start", stage, epoch), *per_batch * count, ("on_stage_end", stage, epoch)]


def test_fit_without_valid_set_calls_hooks_in_speechbrain_order() -> None:
    brain = RecordingBrain()
    brain.fit(range(1, 3), examples(12), train_loader_kwargs=LOADER)
    epoch: list[Call]
    expected: list[Call] = [("make_dataloader", Stage.TRAIN), *FIT_START]
    for epoch_number in (1, 2):
        epoch = [
            *train_stage_start(epoch_number),
            *train_batch(True) * 3,
            *train_stage_end(epoch_number),
        ]
        expected += epoch
    assert brain.calls == expected


def test_fit_with_valid_set_validates_after_each_epoch() -> None:
    brain = RecordingBrain()
    brain.fit(
        range(1, 3),
        examples(8),
        examples(6, seed=1),
        train_loader_kwargs=LOADER,
        valid_loader_kwargs={"batch_size": 3},
    )
    expected: list[Call] = [
        ("make_dataloader", Stage.TRAIN),
        ("make_dataloader", Stage.VALID),
        *FIT_START,
    ]
    for epoch in (1, 2):
        expected += [
            *train_stage_start(epoch),
            *train_batch(True) * 2,
            *train_stage_end(epoch),
            *eval_stage(Stage.VALID, epoch, 2),
        ]
    assert brain.calls == expected


def test_accumulation_steps_every_factor_batches_and_on_the_last_batch() -> None:
    brain = RecordingBrain({"grad_accumulation_factor": 2})
    brain.fit(range(1, 2), ready_loader(batches(5, 4)))
    assert brain.calls == [
        *FIT_START,
        *train_stage_start(1),
        *train_batch(False),
        *train_batch(True),
        *train_batch(False),
        *train_batch(True),
        *train_batch(True),  # the last batch closes the short window
        *train_stage_end(1),
    ]
    assert brain.optimizer_step == 3


def test_accumulation_with_unknown_length_steps_leftover_after_the_loop() -> None:
    brain = RecordingBrain({"grad_accumulation_factor": 2})
    brain.fit(range(1, 2), unsized_loader(batches(3, 4)))
    assert brain.calls == [
        *FIT_START,
        *train_stage_start(1),
        *train_batch(False),
        *train_batch(True),
        *train_batch(False),
        *optimizer_step(),  # the leftover batch is stepped, not dropped
        *train_stage_end(1),
    ]
    assert brain.optimizer_step == 2


def test_debug_mode_limits_batches_per_stage_and_epochs_per_fit() -> None:
    brain = RecordingBrain({"debug": True, "debug_batches": 2, "debug_epochs": 2})
    brain.fit(range(1, 6), ready_loader(batches(5, 4)), ready_loader(batches(4, 4, seed=1)))
    expected: list[Call] = [*FIT_START]
    for epoch in (1, 2):
        expected += [
            *train_stage_start(epoch),
            *train_batch(True) * 2,
            *train_stage_end(epoch),
            *eval_stage(Stage.VALID, epoch, 2),
        ]
    assert brain.calls == expected


def test_evaluate_calls_hooks_in_speechbrain_order() -> None:
    brain = RecordingBrain()
    loss = brain.evaluate(examples(6), max_key="accuracy", test_loader_kwargs={"batch_size": 2})
    assert brain.calls == [
        ("make_dataloader", Stage.TEST),
        ("on_evaluate_start", "accuracy", None),
        *eval_stage(Stage.TEST, None, 3),
    ]
    assert loss > 0


def test_test_only_makes_fit_return_without_calling_any_hook() -> None:
    brain = RecordingBrain({"test_only": True})
    brain.fit(range(1, 3), examples(8), train_loader_kwargs=LOADER)
    assert brain.calls == []


def test_debug_mode_with_fewer_batches_than_debug_batches_steps_on_the_last_batch() -> None:
    brain = regression_brain(
        run_opts={"debug": True, "debug_batches": 5, "grad_accumulation_factor": 2}
    )
    flags: list[bool] = []
    brain.on_fit_batch_start = lambda batch, should_step: flags.append(should_step)  # type: ignore[method-assign]  # a spy
    brain.fit(range(1, 2), ready_loader(batches(3, 4)))
    assert flags == [False, True, True]
    assert brain.optimizer_step == 2

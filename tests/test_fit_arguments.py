"""fit and evaluate refuse arguments that type-check but are no data set, before anything runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Unpack

import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import (
    Batch,
    ReadyBatches,
    RegressionBrain,
    batches,
    examples,
    ready_loader,
    sgd,
    unsized_loader,
)
from typedbrain import ConfigurationError, LoaderKwargs, Phase, Stage


@pytest.mark.parametrize("text", ["data/train.csv", b"data/train.csv", bytearray(b"data")])
def test_fit_refuses_a_file_name_given_as_the_train_set(text: str | bytes) -> None:
    # str and bytes are Sequences, so mypy accepts them where a dataset goes.
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)},
        opt_class=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    with pytest.raises(ConfigurationError) as caught:
        brain.fit(range(1), text, progressbar=False)
    assert str(caught.value) == (
        f"fit(): train_set is the {type(text).__name__} {text!r}, not a dataset: load the data "
        "it names and give a DataLoader or a dataset"
    )
    assert brain.phase is Phase.INIT  # refused before the fit started


def _counting_brain() -> tuple[RegressionBrain, list[Stage]]:
    """A regression brain that records the stage of every forward pass it runs."""
    stages: list[Stage] = []

    class Counting(RegressionBrain):
        def compute_forward(self, batch: Batch, stage: Stage) -> torch.Tensor:
            stages.append(stage)
            return super().compute_forward(batch, stage)

    brain = Counting({"model": torch.nn.Linear(4, 2)}, opt_class=sgd())
    return brain, stages


def _generator() -> Iterator[Batch]:
    yield from examples(4)


# (what is given, the end of the message after "is ")
NOT_DATASETS: list[tuple[Callable[[], object], str]] = [
    (lambda: "data/valid.csv", "the str 'data/valid.csv', not a dataset: load the data it names"),
    (lambda: 5, "an int 5, not a dataset: give a DataLoader or a dataset"),
    (lambda: {"x": 1}, "a dict (a mapping) whose keys are not the indices 0, 1, 2..."),
    (_generator, "a generator <generator object"),
    (lambda: ReadyBatches, "the class ReadyBatches, not a dataset: give an instance of it"),
]


@pytest.mark.parametrize(("make", "message"), NOT_DATASETS)
def test_fit_refuses_a_valid_set_that_is_no_data_set_before_training(
    make: Callable[[], object], message: str
) -> None:
    # Without the check, the valid loader fails when first read: after a whole training epoch.
    brain, stages = _counting_brain()
    with pytest.raises(ConfigurationError) as caught:
        brain.fit(range(1, 3), examples(4), valid_set=make(), progressbar=False)  # type: ignore[arg-type]  # the mistake under test
    assert str(caught.value).startswith(f"fit(): valid_set is {message}")
    assert stages == []
    assert brain.phase is Phase.INIT  # refused before the fit started


@pytest.mark.parametrize(("make", "message"), NOT_DATASETS[1:])
def test_fit_refuses_a_train_set_that_is_no_data_set_before_training(
    make: Callable[[], object], message: str
) -> None:
    brain, stages = _counting_brain()
    with pytest.raises(ConfigurationError) as caught:
        brain.fit(range(1, 3), make(), progressbar=False)  # type: ignore[arg-type]  # the mistake under test
    assert str(caught.value).startswith(f"fit(): train_set is {message}")
    assert stages == []
    assert brain.phase is Phase.INIT


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda: None, "None: give a DataLoader or a dataset"), *NOT_DATASETS],
)
def test_evaluate_refuses_a_test_set_that_is_no_data_set_before_testing(
    make: Callable[[], object], message: str
) -> None:
    brain, stages = _counting_brain()
    with pytest.raises(ConfigurationError) as caught:
        brain.evaluate(make(), progressbar=False)  # type: ignore[arg-type]  # the mistake under test
    assert str(caught.value).startswith(f"evaluate(): test_set is {message}")
    assert stages == []
    assert brain.phase is Phase.INIT


def test_fit_and_evaluate_take_datasets_of_every_kind_a_dataloader_reads() -> None:
    brain, stages = _counting_brain()
    for data in (
        examples(2),  # a list
        tuple(examples(2)),
        ReadyBatches(batches(1, 2)),  # a torch Dataset
        ready_loader(batches(1, 2)),  # a DataLoader
        unsized_loader(batches(1, 2)),
    ):
        stages.clear()
        brain.fit(range(1, 2), data, valid_set=data, progressbar=False)
        brain.evaluate(data, progressbar=False)
        assert list(dict.fromkeys(stages)) == [Stage.TRAIN, Stage.VALID, Stage.TEST]


@pytest.mark.parametrize("counter", ["10", b"10", bytearray(b"10")])
def test_fit_refuses_a_str_epoch_counter_by_name(counter: str | bytes) -> None:
    # A str is iterable: without the check it fails at its first "epoch", "1", not naming it.
    brain, stages = _counting_brain()
    with pytest.raises(ConfigurationError) as caught:
        brain.fit(counter, examples(4), progressbar=False)  # type: ignore[arg-type]  # the mistake under test
    assert str(caught.value) == (
        "fit(): epoch_counter must yield the epoch numbers (range(1, 11), or an EpochCounter), "
        f"not {type(counter).__name__} {counter!r}"
    )
    assert stages == []
    assert brain.phase is Phase.INIT


class ReadsFilesBrain(RegressionBrain):
    """Its make_dataloader reads sources of its own: a file name, as SpeechBrain recipes do."""

    read: list[object]

    def make_dataloader(
        self,
        dataset: object,
        stage: Stage,
        ckpt_prefix: str | None = "dataloader-",
        **loader_kwargs: Unpack[LoaderKwargs],
    ) -> DataLoader[object]:
        self.read.append(dataset)
        if isinstance(dataset, str):  # "the file" holds 4 examples
            dataset = examples(4)
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)  # type: ignore[arg-type]  # narrowed above


def test_a_make_dataloader_override_is_given_its_own_kind_of_source_unchecked() -> None:
    brain = ReadsFilesBrain({"model": torch.nn.Linear(4, 2)}, opt_class=sgd())
    brain.read = []
    brain.fit(range(1, 2), "train.csv", valid_set="valid.csv", progressbar=False)
    brain.evaluate("test.csv", progressbar=False)
    assert brain.read == ["train.csv", "valid.csv", "test.csv"]

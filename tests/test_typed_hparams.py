"""structure_hparams over the field and class kinds a typed recipe declares.

Protocols and TypedDicts as field types, dataclasses and TypedDicts as the class built, abstract
collection types, and field types that cannot be resolved or structured (a clear error naming
the class and the field, never a bare NameError or cattrs error).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, LiteralString, Protocol, TypedDict

import attrs
import pytest

from typedbrain import (
    CheckpointerLike,
    ConfigurationError,
    EpochCounter,
    HparamsError,
    TrainLogger,
    load_hparams,
    structure_hparams,
)

if TYPE_CHECKING:
    from decimal import Decimal  # for a class whose annotation cannot be resolved at run time


def _problems(caught: pytest.ExceptionInfo[HparamsError]) -> list[str]:
    return [str(problem) for problem in caught.value.problems]


# Protocols ------------------------------------------------------------------------------------


class FakeLogger:
    def log_stats(self, *args: object, **kwargs: object) -> None:
        """Takes any stats."""


class FakeCheckpointer:
    def add_recoverable(self, *args: object, **kwargs: object) -> None:
        """Takes any recoverable."""

    def recover_if_possible(self, *args: object, **kwargs: object) -> None:
        """Recovers nothing."""

    def save_and_keep_only(self, *args: object, **kwargs: object) -> None:
        """Saves nothing."""


@attrs.frozen
class WithProtocols:
    train_logger: TrainLogger
    checkpointer: CheckpointerLike | None = None


def test_a_field_typed_with_a_library_protocol_takes_an_object_with_its_members() -> None:
    logger, checkpointer = FakeLogger(), FakeCheckpointer()
    built = structure_hparams({"train_logger": logger, "checkpointer": checkpointer}, WithProtocols)
    assert built.train_logger is logger
    assert built.checkpointer is checkpointer
    assert structure_hparams({"train_logger": logger}, WithProtocols).checkpointer is None


def test_a_field_typed_with_a_protocol_refuses_an_object_without_its_members() -> None:
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"train_logger": "log.txt", "checkpointer": 3}, WithProtocols)
    assert _problems(caught) == [
        "train_logger: expected a TrainLogger (an object with log_stats), got str 'log.txt'",
        "checkpointer: expected CheckpointerLike or None, got int 3",
    ]


def test_the_library_objects_a_recipe_builds_fit_the_library_protocols(tmp_path: Path) -> None:
    recipe = (
        f"train_logger: !new:typedbrain.FileTrainLogger\n    save_file: {tmp_path / 'log.txt'}\n"
        f"checkpointer: !new:typedbrain.Checkpointer\n    checkpoints_dir: {tmp_path / 'ckpt'}\n"
    )
    built = structure_hparams(load_hparams(io.StringIO(recipe)), WithProtocols)
    assert type(built.train_logger).__name__ == "FileTrainLogger"
    assert type(built.checkpointer).__name__ == "Checkpointer"


class Runner(Protocol):
    def run(self) -> None: ...


@attrs.frozen
class WithOwnProtocol:
    runner: Runner


def test_a_field_typed_with_a_protocol_of_ones_own_is_checked_by_its_members() -> None:
    class Job:
        def run(self) -> None:
            """Does nothing."""

    job = Job()
    assert structure_hparams({"runner": job}, WithOwnProtocol).runner is job
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"runner": {"run": True}}, WithOwnProtocol)
    assert _problems(caught) == [
        "runner: expected a Runner (an object with run), got dict {'run': True}"
    ]


# TypedDicts and dataclasses -------------------------------------------------------------------


class Schedule(TypedDict):
    lr: float
    epochs: int


class ScheduleWithWarmup(Schedule, total=False):
    warmup: int


@attrs.frozen
class WithTypedDict:
    schedule: ScheduleWithWarmup


def test_a_typeddict_field_is_built_from_a_mapping_with_its_keys_checked() -> None:
    built = structure_hparams({"schedule": {"lr": 1, "epochs": 2}}, WithTypedDict)
    assert built.schedule == {"lr": 1.0, "epochs": 2}
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"schedule": {"lr": "fast", "warmup": 1.5, "epoch": 2}}, WithTypedDict)
    assert _problems(caught) == [
        "schedule.lr: expected a number, got str 'fast'",
        "schedule.epochs: missing: required by ScheduleWithWarmup",
        "schedule.warmup: expected an integer, got float 1.5",
        "schedule.epoch: unexpected key: ScheduleWithWarmup has no such field; did you mean "
        "'epochs'?",
    ]
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"schedule": [1, 2]}, WithTypedDict)
    assert _problems(caught) == [
        "schedule: expected a mapping of ScheduleWithWarmup's keys, got list [1, 2]"
    ]


def test_a_typeddict_is_built_as_the_whole_class_with_file_and_line() -> None:
    loaded = load_hparams(io.StringIO("lr: 0.1\nepochs: 2\n"))
    assert structure_hparams(loaded, Schedule) == {"lr": 0.1, "epochs": 2}
    loaded = load_hparams(io.StringIO("lr: fast\nepochs: 2\nextra: 1\nprecision: bf16\n"))
    with pytest.raises(HparamsError) as caught:
        structure_hparams(loaded, Schedule)
    assert str(caught.value) == (
        "hyperparameters from <stream> do not fit Schedule (2 problems):\n"
        "  - lr (<stream>:1): expected a number, got str 'fast'\n"
        "  - extra (<stream>:3): unexpected key: Schedule has no such field"
    )


@dataclasses.dataclass(frozen=True)
class DataclassHyper:
    names: list[str]
    size: int | str
    sizes: tuple[int, ...] = ()


def test_a_dataclass_is_checked_as_strictly_as_an_attrs_class() -> None:
    built = structure_hparams({"names": ["a"], "size": 3, "sizes": [1, 2]}, DataclassHyper)
    assert built == DataclassHyper(names=["a"], size=3, sizes=(1, 2))
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"names": "ab", "size": 1.5}, DataclassHyper)
    assert _problems(caught) == [
        "names: expected a list, got str 'ab'",
        "size: expected int or str, got float 1.5",
    ]


# Abstract collection types --------------------------------------------------------------------


@attrs.frozen
class WithCollections:
    milestones: Collection[int]
    layers: Iterable[str]


def test_collection_and_iterable_fields_are_built_from_a_list_like_a_sequence() -> None:
    loaded = load_hparams(io.StringIO("milestones: [10, 20]\nlayers: [a, b]\n"))
    built = structure_hparams(loaded, WithCollections)
    assert built == WithCollections(milestones=[10, 20], layers=["a", "b"])
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"milestones": [1, "2"], "layers": "ab"}, WithCollections)
    assert _problems(caught) == [
        "milestones[1]: expected an integer, got str '2'",
        "layers: expected a list, got str 'ab'",
    ]


# Types that cannot be resolved or structured ------------------------------------------------


@attrs.frozen
class WithTypeCheckingImport:
    lr: float
    scale: Decimal  # imported only under TYPE_CHECKING


def test_a_field_type_imported_only_under_type_checking_names_class_field_and_name() -> None:
    with pytest.raises(ConfigurationError) as caught:
        structure_hparams({"lr": 0.1, "scale": 1}, WithTypeCheckingImport)
    assert not isinstance(caught.value, HparamsError)
    assert str(caught.value).startswith(
        "cannot structure hyperparameters into WithTypeCheckingImport: the annotation of "
        "WithTypeCheckingImport.scale ('Decimal') cannot be resolved (NameError: name "
        "'Decimal' is not defined): annotations are resolved when hyperparameters are "
        f"structured, in the class's module ({__name__}), so import what they name at run "
        "time, not only under TYPE_CHECKING"
    )


def test_a_class_defined_inside_a_function_is_named_with_the_fields_that_use_it() -> None:
    @attrs.frozen
    class Data:
        batch_size: int

    @attrs.frozen
    class Hyper:
        lr: float
        data: Data
        more: list[Data] = attrs.field(factory=list)

    with pytest.raises(
        ConfigurationError,
        match=re.escape(
            "cannot structure hyperparameters into Hyper: the annotations of Hyper.data ('Data'), "
            "Hyper.more ('list[Data]') cannot be resolved (NameError: name 'Data' is not defined)"
        ),
    ):
        structure_hparams({"lr": 0.1, "data": {"batch_size": 4}}, Hyper)


@attrs.frozen
class WithIterator:
    lr: float
    steps: list[LiteralString]  # no value can be checked to be one


@attrs.frozen
class HoldsWithIterator:
    inner: WithIterator | None = None


def test_a_field_type_no_value_fits_names_class_field_and_type() -> None:
    values = {"lr": 0.1, "steps": [[1]]}
    for cls, loaded in ((WithIterator, values), (HoldsWithIterator, {"inner": values})):
        with pytest.raises(ConfigurationError) as caught:
            structure_hparams(loaded, cls)
        assert not isinstance(caught.value, HparamsError)
        assert str(caught.value).startswith(
            f"cannot structure hyperparameters into {cls.__name__}: WithIterator.steps is "
            "typed LiteralString (in list[typing.LiteralString]), which "
            "hyperparameters cannot be structured into: use a list, tuple, set, Sequence, "
            "Collection, Iterable or mapping for YAML collections"
        )


@attrs.frozen
class Node:
    name: str
    children: dict[str, Node] = attrs.field(factory=dict)


def test_a_class_that_holds_itself_is_checked_once_and_built() -> None:
    built = structure_hparams({"name": "a", "children": {"b": {"name": "b"}}}, Node)
    assert built == Node("a", {"b": Node("b")})


# Messages -------------------------------------------------------------------------------------


@attrs.frozen
class _Lr:
    lr: float


@pytest.mark.parametrize(
    ("loaded", "shown"),
    [
        ([1], "a list [1]"),
        (3, "an int 3"),
        (None, "a NoneType None"),
        (b"lr: 1", "a bytes b'lr: 1'"),
    ],
)
def test_loaded_hyperparameters_that_are_not_a_mapping_are_refused_naming_the_argument(
    loaded: object, shown: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        structure_hparams(loaded, _Lr)  # type: ignore[arg-type]  # what the check is for
    assert not isinstance(caught.value, HparamsError)
    assert str(caught.value) == (
        "structure_hparams: loaded must be the loaded hyperparameters, a mapping such as "
        f"load_hparams' result, not {shown}"
    )


@pytest.mark.parametrize("path", ["hparams.yaml", Path("hparams.yaml")], ids=["str", "Path"])
def test_a_path_given_as_loaded_hyperparameters_points_to_load_typed_hparams(
    path: str | Path,
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        structure_hparams(path, _Lr)  # type: ignore[arg-type]  # what the check is for
    message = str(caught.value)
    assert message.startswith("structure_hparams: loaded must be the loaded hyperparameters, ")
    assert message.endswith(
        f"not a {type(path).__name__} {path!r}; to load a file, call load_typed_hparams(path, _Lr)"
    )


@attrs.frozen
class WithCounter:
    counter: EpochCounter


def test_a_wrong_value_for_a_class_starting_with_a_vowel_reads_an() -> None:
    with pytest.raises(HparamsError) as caught:
        structure_hparams({"counter": {"limit": 3}}, WithCounter)
    assert _problems(caught) == ["counter: expected an EpochCounter, got dict {'limit': 3}"]


@attrs.frozen
class _WithGenericFields:
    lr: float
    pattern: re.Pattern[str] | None = None
    path: os.PathLike[str] | None = None


def test_fields_typed_with_a_parameterised_class_take_its_instances_or_their_default() -> None:
    assert structure_hparams({"lr": 0.1}, _WithGenericFields) == _WithGenericFields(lr=0.1)
    compiled = re.compile("a+")
    built = structure_hparams({"lr": 0.1, "pattern": compiled}, _WithGenericFields)
    assert built.pattern is compiled
    with pytest.raises(HparamsError, match=r"pattern: expected re.Pattern\[str\] or None"):
        structure_hparams({"lr": 0.1, "pattern": "a+"}, _WithGenericFields)

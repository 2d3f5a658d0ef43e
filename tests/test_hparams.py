"""Hyperparameters given as a mapping: attribute and item access, read-only, clear errors."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypedDict, TypeVar

import attrs
import pytest

from typedbrain import Brain, ConfigurationError, Hparams
from typedbrain._errors import with_article
from typedbrain._hparams import hparams_items


def test_values_read_as_attributes_and_items() -> None:
    hparams = Hparams({"lr": 0.1, "layers": 3})
    assert hparams.lr == 0.1
    assert hparams["layers"] == 3
    assert dict(hparams) == {"lr": 0.1, "layers": 3}
    assert len(hparams) == 2
    assert "lr" in hparams


def test_missing_attribute_names_the_key_and_lists_the_known_ones() -> None:
    with pytest.raises(AttributeError) as caught:
        _ = Hparams({"lr": 0.1, "batch_size": 8}).learning_rate
    assert str(caught.value) == "no hyperparameter 'learning_rate'; the keys are: batch_size, lr"
    assert not hasattr(Hparams({}), "lr")


def test_missing_item_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="lr"):
        _ = Hparams({})["lr"]


def test_hparams_are_a_copy_and_read_only() -> None:
    source = {"lr": 0.1}
    hparams = Hparams(source)
    source["lr"] = 0.2
    assert hparams.lr == 0.1
    with pytest.raises(AttributeError, match=r"cannot set hyperparameter 'lr': .* read-only"):
        hparams.lr = 0.3  # type: ignore[attr-defined]  # mypy refuses it too
    with pytest.raises(AttributeError, match="cannot set hyperparameter 'new'"):
        hparams.new = 1  # type: ignore[attr-defined]  # mypy refuses it too
    assert dict(hparams) == {"lr": 0.1}
    with pytest.raises(TypeError):
        hparams["lr"] = 0.3  # type: ignore[operator]  # a Mapping has no __setitem__


def test_hparams_copy_and_pickle() -> None:
    hparams = Hparams({"lr": 0.1})
    assert dict(copy.deepcopy(hparams)) == {"lr": 0.1}
    assert dict(pickle.loads(pickle.dumps(hparams))) == {"lr": 0.1}


def test_dir_lists_the_keys_for_completion() -> None:
    assert {"lr", "keys"} <= set(dir(Hparams({"lr": 0.1})))


@attrs.frozen
class AttrsHparams:
    lr: float
    debug: bool


@dataclasses.dataclass
class DataclassHparams:
    lr: float
    debug: bool


class PlainHparams:
    def __init__(self) -> None:
        self.lr = 0.1
        self.debug = True


@pytest.mark.parametrize(
    "hparams",
    [
        {"lr": 0.1, "debug": True},
        AttrsHparams(0.1, True),
        DataclassHparams(0.1, True),
        PlainHparams(),
    ],
    ids=["mapping", "attrs", "dataclass", "object"],
)
def test_items_of_every_supported_hparams_kind(hparams: object) -> None:
    assert dict(hparams_items(hparams)) == {"lr": 0.1, "debug": True}


def test_items_of_none_and_slotted_objects_are_empty() -> None:
    assert hparams_items(None) == {}
    assert hparams_items(3) == {}


class TypedBrain(Brain[object, object, AttrsHparams]):
    """Declares an attrs hparams class."""


class DictBrain(Brain[object, object, dict[str, float]]):
    """Declares a plain dict of floats."""


def test_brain_declaring_a_hparams_class_refuses_a_mapping() -> None:
    # mypy cannot catch this call (it ignores constructor self-types once type arguments are
    # fixed), so the brain checks it when it is built.
    with pytest.raises(ConfigurationError) as caught:
        TypedBrain(hparams={"lr": 0.1, "debug": True})  # the gap under test
    assert str(caught.value) == (
        "TypedBrain declares its hparams type as AttrsHparams, but was given a dict: pass "
        "hparams=AttrsHparams(...)"
    )
    with pytest.raises(ConfigurationError, match="was given no hparams"):
        TypedBrain()


def test_brain_declaring_a_mapping_type_keeps_a_mapping_of_that_type() -> None:
    values = {"lr": 0.1}
    assert DictBrain(hparams=values).hparams is values


def test_brain_declaring_a_hparams_class_keeps_its_instance() -> None:
    hparams = AttrsHparams(0.1, True)
    assert TypedBrain(hparams=hparams).hparams is hparams


HparamsVar = TypeVar("HparamsVar")


class GenericBase(Brain[object, object, HparamsVar], Generic[HparamsVar]):
    """Leaves the hparams type to its subclasses."""


class TypedThroughABase(GenericBase[AttrsHparams]):
    """Declares an attrs hparams class through a generic base."""


class DictThroughABase(GenericBase[dict[str, float]]):
    """Declares a dict through a generic base."""


class PlainSubclassOfTyped(TypedThroughABase):
    """Inherits the declaration."""


class FloatSettings(TypedDict):
    lr: float


class TypedDictBrain(Brain[object, object, FloatSettings]):
    """Declares a TypedDict."""


def test_a_hparams_type_declared_through_a_generic_base_is_checked_and_kept() -> None:
    for brain_class in (TypedThroughABase, PlainSubclassOfTyped):
        with pytest.raises(ConfigurationError, match="declares its hparams type as AttrsHparams"):
            brain_class(hparams={"lr": 0.1, "debug": True})
        hparams = AttrsHparams(0.1, True)
        assert brain_class(hparams=hparams).hparams is hparams
    values = {"lr": 0.1}
    assert DictThroughABase(hparams=values).hparams is values
    assert isinstance(GenericBase(hparams=values).hparams, Hparams)  # nothing declared


class OwnConstructor(Brain[object, object, HparamsVar], Generic[HparamsVar]):
    """Left open in its hparams type, with a constructor of its own that passes them on."""

    def __init__(self, hparams: HparamsVar) -> None:
        super().__init__(hparams=hparams)


class OwnConstructorInherited(OwnConstructor[HparamsVar]):
    """Still open; the constructor is its base's."""


class ClosedOwnConstructor(OwnConstructor[AttrsHparams]):
    """Closes the type: the declared class is checked as ever."""


class BareSubclass(OwnConstructor):  # type: ignore[type-arg]  # as SpeechBrain-style code has it
    """Open[Any] to mypy: its mapping is an Hparams, read by attribute."""


class PassingEverythingOn(Brain[object, object, HparamsVar], Generic[HparamsVar]):
    """A constructor of its own that does not take ``hparams: HparamsVar``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra = 1


def test_an_open_hparams_type_with_its_own_constructor_keeps_what_it_is_given() -> None:
    """mypy infers the type from that constructor's argument (``dict[str, float]`` here)."""
    values = {"lr": 0.1}
    for brain_class in (OwnConstructor, OwnConstructorInherited):
        brain = brain_class(values)
        assert brain.hparams is values
        assert brain.hparams.copy() == values  # a dict method, as mypy sees it
    assert isinstance(GenericBase(hparams=values).hparams, Hparams)  # Brain's constructor
    with pytest.raises(ConfigurationError, match="declares its hparams type as AttrsHparams"):
        ClosedOwnConstructor({"lr": 0.1})  # type: ignore[arg-type]  # the mistake under test


OtherVar = TypeVar("OtherVar")


class Reparameterised(OwnConstructor[OtherVar], Generic[OtherVar]):
    """Open still, through a type variable of its own; the constructor is its base's."""


def test_a_subclass_open_through_its_own_type_variable_keeps_what_it_is_given() -> None:
    values = {"lr": 0.1}
    assert Reparameterised(values).hparams is values


def test_an_open_hparams_type_otherwise_makes_a_mapping_an_hparams_read_by_attribute() -> None:
    bare = BareSubclass({"lr": 0.1})
    passing: PassingEverythingOn[Hparams] = PassingEverythingOn(hparams={"lr": 0.1})
    for hparams in (bare.hparams, passing.hparams):
        assert isinstance(hparams, Hparams)
        assert hparams.lr == 0.1


def test_a_typeddict_hparams_type_keeps_its_dict() -> None:
    values = FloatSettings(lr=0.5)
    assert TypedDictBrain(hparams=values).hparams is values


class OptionalBrain(Brain[object, object, AttrsHparams | None]):
    """Declares an optional attrs hparams class."""


def test_brain_declaring_an_optional_hparams_class_accepts_none() -> None:
    assert OptionalBrain().hparams is None
    assert OptionalBrain(hparams=None).hparams is None
    hparams = AttrsHparams(0.1, True)
    assert OptionalBrain(hparams=hparams).hparams is hparams


def test_a_union_hparams_type_reads_as_written_in_the_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        OptionalBrain(hparams={"lr": 0.1, "debug": True})
    assert str(caught.value) == (
        "OptionalBrain declares its hparams type as AttrsHparams | None, but was given a dict: "
        "pass hparams=AttrsHparams(...)"
    )


class EitherBrain(Brain[object, object, AttrsHparams | DataclassHparams]):
    """Declares one of two hparams classes."""


def test_a_union_of_hparams_classes_names_each_in_the_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        EitherBrain()
    assert str(caught.value) == (
        "EitherBrain declares its hparams type as AttrsHparams | DataclassHparams, but was given "
        "no hparams: pass hparams=AttrsHparams(...) or hparams=DataclassHparams(...)"
    )
    hparams = DataclassHparams(0.1, True)
    assert EitherBrain(hparams=hparams).hparams is hparams


def test_keys_hidden_by_mapping_methods_warn_and_read_by_item() -> None:
    with pytest.warns(UserWarning, match=r"hyperparameters 'items', 'values' are hidden"):
        hparams = Hparams({"lr": 0.1, "values": [1, 2], "items": 3})
    assert hparams["values"] == [1, 2]
    assert callable(hparams.values)


class Settings(NamedTuple):
    lr: float


@pytest.mark.parametrize(
    ("hparams", "hint"),
    [
        ("hparams.yaml", True),
        (Path("hparams.yaml"), True),
        (["lr", 0.1], False),
        (("lr", 0.1), False),
        (5, False),
        (True, False),
    ],
)
def test_a_brain_declaring_no_hparams_class_refuses_a_plain_value(
    hparams: object, hint: bool
) -> None:
    # Without the check the value is kept, and the first hook reading self.hparams.lr fails.
    for brain_class in (Brain, BareSubclass):
        with pytest.raises(ConfigurationError) as caught:
            brain_class(hparams=hparams)
        message = str(caught.value)
        assert message.startswith(
            "hparams must be a mapping of hyperparameter names to values, or an object that "
            f"holds them as attributes (an attrs instance, say), got {type(hparams).__name__} "
            f"{hparams!r}"
        )
        assert (
            message.endswith(
                "with load_hparams() (or load_typed_hparams()) and pass what that returns"
            )
            is hint
        )


def test_a_brain_declaring_no_hparams_class_keeps_an_object_with_attributes() -> None:
    for hparams in (
        AttrsHparams(0.1, True),
        DataclassHparams(0.1, True),
        PlainHparams(),
        Settings(0.1),  # a tuple, but read by attribute
    ):
        assert Brain(hparams=hparams).hparams is hparams


@pytest.mark.parametrize("hparams", ["hparams.yaml", ["lr", 0.1], DataclassHparams(0.1, True)])
def test_a_brain_declaring_a_hparams_class_refuses_an_object_of_another_type(
    hparams: object,
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        TypedBrain(hparams=hparams)  # type: ignore[call-overload]  # the mistake under test
    assert str(caught.value) == (
        "TypedBrain declares its hparams type as AttrsHparams, but was given "
        f"{with_article(type(hparams).__name__)}: pass hparams=AttrsHparams(...)"
    )


def test_an_instance_of_a_twin_hparams_class_is_named_with_its_module() -> None:
    """The defining module imported twice (as __main__ and by name) makes two classes."""
    twin = attrs.define(type("AttrsHparams", (), {"__annotations__": {"lr": float}}))
    twin.__module__ = "__main__"
    with pytest.raises(ConfigurationError) as caught:
        TypedBrain(hparams=twin(lr=0.1))
    assert str(caught.value) == (
        f"TypedBrain declares its hparams type as {__name__}.AttrsHparams, but was given an "
        "instance of __main__.AttrsHparams, another class of the same name: the module that "
        "defines it was imported twice (a script run as __main__ whose recipe names it by its "
        "module, say); define the class in a module the script imports"
    )

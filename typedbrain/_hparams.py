"""Hyperparameters given as a mapping, readable both as ``hp.lr`` and as ``hp["lr"]``."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, final

import attrs
from typing_extensions import is_typeddict

from typedbrain._errors import ConfigurationError, with_article
from typedbrain._warn import warn

__all__ = ["Hparams", "hparams_items", "resolve_hparams"]


@final
class Hparams(Mapping[str, object]):
    """A read-only view of hyperparameters with attribute and item access.

    A brain wraps a mapping passed as ``hparams`` in one of these, so recipes written for
    SpeechBrain (``self.hparams.lr``) and code that wants a mapping (``self.hparams["lr"]``,
    ``dict(self.hparams)``) both work. Values are typed ``object``: for typed access, pass an
    attrs class as ``hparams`` instead and give it as the brain's third type parameter.

    Args:
        values: the hyperparameters; copied (shallowly), so later changes to it do not show.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, object] | None = None, /) -> None:
        self._values: dict[str, object]
        object.__setattr__(self, "_values", dict(values or {}))
        hidden = sorted(key for key in self._values if key in _MAPPING_ATTRIBUTES)
        if hidden:
            names = ", ".join(repr(key) for key in hidden)
            warn(
                f"hyperparameters {names} are hidden by the mapping methods of that name: "
                f"hparams.{hidden[0]} is the method; read the value as hparams[{hidden[0]!r}]",
                UserWarning,
            )

    if not TYPE_CHECKING:  # hidden from mypy, which then reports an assignment statically

        def __setattr__(self, name: str, value: object) -> None:
            raise AttributeError(
                f"cannot set hyperparameter {name!r}: a brain's hparams are read-only (a copy "
                "made when the brain was built); keep what changes during a run in an "
                "attribute of your brain, or in an object the hparams hold"
            )

    def __reduce__(self) -> tuple[type[Hparams], tuple[dict[str, object]]]:
        return (Hparams, (self._values,))

    def __getitem__(self, key: str) -> object:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> object:
        # Only called when normal lookup fails; dunder lookups (copy, pickle) must not recurse.
        if name.startswith("__") or name == "_values":
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            known = ", ".join(sorted(self._values)) or "none"
            raise AttributeError(f"no hyperparameter {name!r}; the keys are: {known}") from None

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self._values})

    def __repr__(self) -> str:
        return f"Hparams({self._values!r})"


_MAPPING_ATTRIBUTES: frozenset[str] = frozenset(
    name for name in dir(Hparams) if not name.startswith("_")
)
"""Names ``hparams.<name>`` finds before a hyperparameter: ``keys``, ``items``, ``values``..."""


def hparams_items(hparams: object) -> Mapping[str, object]:
    """The top-level name -> value pairs of hyperparameters of any supported kind.

    Mappings, attrs instances and dataclass instances are read field by field; ``None`` has no
    items. Other objects are read through ``vars()`` when they have a ``__dict__``.
    """
    if hparams is None:
        return {}
    if isinstance(hparams, Mapping):
        return {str(key): value for key, value in hparams.items()}
    cls = type(hparams)
    if attrs.has(cls):
        return {field.name: getattr(hparams, field.name) for field in attrs.fields(cls)}
    if dataclasses.is_dataclass(hparams) and not isinstance(hparams, type):
        return {field.name: getattr(hparams, field.name) for field in dataclasses.fields(hparams)}
    try:
        return dict(vars(hparams))
    except TypeError:
        return {}


def resolve_hparams(hparams: object, declared: object, owner: str) -> object:
    """What ``brain.hparams`` becomes, checked against the brain's declared hparams type.

    A mapping (or ``None``) becomes an :class:`Hparams`, unless the brain declares a mapping
    type the value already has (a ``dict`` for ``dict[str, float]``), in which case it is kept,
    or ``None`` is given and the declared type allows it (``Settings | None``), in which case
    ``None`` is kept. Any other object is kept as it is when it has the declared type; with no
    declared type (or ``Hparams``, or one no ``isinstance`` can test), any object but a plain
    value (a str, a path, a number, a list...) is kept.

    Args:
        hparams: what was passed as ``hparams``.
        declared: the brain's declared hparams type argument, or ``None`` when it does not name
            a concrete type (a type variable, or no type arguments).
        owner: the brain class's name, for the error message.

    Raises:
        ConfigurationError: the brain declares a hparams class (an attrs class, say) but got a
            mapping, nothing, or an object of another type; or it declares none and got a
            plain value (a file name, a list): its hooks would read attributes that are not
            there.
    """
    if declared is None or declared is Hparams or declared is typing.Any:
        return _untyped(hparams)
    union = typing.get_origin(declared) in (typing.Union, types.UnionType)
    arms = typing.get_args(declared) if union else (declared,)
    if hparams is None and type(None) in arms:
        return None
    # A TypedDict is a dict at run time (and refuses isinstance checks).
    kinds = [dict if is_typeddict(arm) else typing.get_origin(arm) or arm for arm in arms]
    if hparams is not None and any(_is_instance(hparams, kind) for kind in kinds):
        return hparams
    if Hparams in arms or typing.Any in arms:
        return _untyped(hparams)
    if not isinstance(hparams, Mapping | None) and not all(isinstance(k, type) for k in kinds):
        return _kept_object(hparams)  # a declared type no isinstance check can test
    given = "no hparams" if hparams is None else with_article(type(hparams).__name__)
    hint = " or ".join(f"hparams={_type_name(arm)}(...)" for arm in arms if arm is not type(None))
    twin = next(
        (arm for arm in arms if isinstance(arm, type) and arm.__name__ == type(hparams).__name__),
        None,
    )
    if twin is not None:
        # One class, imported twice (the script run as __main__, and by name from a recipe's
        # !new: tag, say): the short names read as a contradiction.
        raise ConfigurationError(
            f"{owner} declares its hparams type as {_full_name(twin)}, but was given an "
            f"instance of {_full_name(type(hparams))}, another class of the same name: the "
            "module that defines it was imported twice (a script run as __main__ whose "
            "recipe names it by its module, say); define the class in a module the script "
            "imports"
        )
    raise ConfigurationError(
        f"{owner} declares its hparams type as {_type_name(declared)}, but was given {given}: "
        f"pass {hint}"
    )


def _full_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _untyped(hparams: object) -> object:
    """Hyperparameters for a brain that declares no hparams class: a mapping as an Hparams."""
    if hparams is None or isinstance(hparams, Mapping):
        return Hparams(hparams)
    return _kept_object(hparams)


_PLAIN_VALUES: tuple[type, ...] = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    list,
    tuple,
    set,
    frozenset,
    os.PathLike,
)
"""Kinds of value that hold no hyperparameters by name (``bool`` is an ``int``)."""


def _kept_object(hparams: object) -> object:
    """``hparams`` as it is, unless it is a plain value, which no hook could read by name.

    Raises:
        ConfigurationError: ``hparams`` is a str, a path, a number or a collection (a named
            tuple, read by attribute, is kept).
    """
    named_tuple = isinstance(hparams, tuple) and hasattr(hparams, "_fields")
    if named_tuple or not isinstance(hparams, _PLAIN_VALUES):
        return hparams
    hint = (
        ": load the file it names with load_hparams() (or load_typed_hparams()) and pass what "
        "that returns"
        if isinstance(hparams, str | bytes | os.PathLike)
        else ""
    )
    raise ConfigurationError(
        "hparams must be a mapping of hyperparameter names to values, or an object that holds "
        f"them as attributes (an attrs instance, say), got {type(hparams).__name__} "
        f"{hparams!r:.80}{hint}"
    )


def _type_name(tp: object) -> str:
    """A type as its annotation reads: ``Settings``, ``Settings | None``, ``dict[str, float]``."""
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arm) for arm in typing.get_args(tp))
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return repr(tp).removeprefix("typing.")


def _is_instance(value: object, kind: object) -> bool:
    """``isinstance(value, kind)``, true as well for a type no isinstance check can test."""
    if not isinstance(kind, type):
        return False
    try:
        return isinstance(value, kind)
    except TypeError:  # a Protocol that is not runtime_checkable, say: the type checker's job
        return True

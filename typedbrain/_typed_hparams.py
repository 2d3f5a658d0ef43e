"""Typed hyperparameters: loaded YAML structured into an attrs class of yours.

The library's cattrs converter does the work, through a child converter with hooks of its own:
types are strict (``"5"`` is not an ``int``, ``1`` is not a ``bool``), and the objects
HyperPyYAML builds (modules, optimizer factories, anything from ``!new:``/``!name:``/
``!apply:``) pass through to fields typed with their class, a protocol, a ``Callable`` or
``object``. Every problem found in the values is reported in one
:class:`~typedbrain.HparamsError`; a field type that cannot be resolved or structured is a
:class:`~typedbrain.ConfigurationError` naming the class and the field.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Final, TypeVar, cast, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
    StructureHandlerNotFoundError,
)
from cattrs.gen import make_dict_structure_fn, make_mapping_structure_fn
from cattrs.gen.typeddicts import make_dict_structure_fn as make_typeddict_structure_fn
from typing_extensions import get_protocol_members, is_protocol, is_typeddict

from typedbrain._config import KeyPath, LoadedHparams, format_key_path, load_hparams
from typedbrain._errors import ConfigurationError, HparamsError, HparamsProblem, with_article
from typedbrain._options import RunOptions, _matches
from typedbrain._state import converter
from typedbrain._warn import warn

__all__ = ["load_typed_hparams", "structure_hparams"]

_T = TypeVar("_T")

_MAPPINGS: Final = frozenset({dict, collections.abc.Mapping, collections.abc.MutableMapping})

_SEQUENCES: Final = frozenset(
    {
        list,
        tuple,
        set,
        frozenset,
        collections.abc.Sequence,
        collections.abc.MutableSequence,
        collections.abc.Set,
        collections.abc.MutableSet,
        collections.abc.Collection,
        collections.abc.Iterable,
    }
)


def structure_hparams(
    loaded: Mapping[str, object], cls: type[_T], *, source: str | None = None
) -> _T:
    """Build a ``cls`` (an attrs class of yours) from loaded hyperparameters.

    Values are checked strictly against the field types (``"5"`` is not an ``int``; an ``int``
    is accepted for a ``float``); nested attrs classes, dataclasses and ``TypedDict`` classes
    are built from nested mappings; objects that HyperPyYAML built pass through for fields typed
    with their class (``torch.nn.Module``), a protocol (``TrainLogger``: the object must have
    its members), ``Callable`` (an optimizer factory from ``!name:``) or ``object``. Top-level
    keys named like a run option are left out unless ``cls`` has a field of that name: they are
    run options (see :func:`~typedbrain.split_run_options`).

    Args:
        loaded: what :func:`~typedbrain.load_hparams` returned (its file and line numbers are
            used in messages), or any mapping.
        cls: the class to build: usually a frozen attrs class; a dataclass or a ``TypedDict``
            (which gives a ``dict``) works too.
        source: the name the error message gives the hyperparameters; by default the file they
            were loaded from.

    Raises:
        HparamsError: the hyperparameters do not fit ``cls``; ``problems`` lists every missing
            key, unexpected key and wrong value, with its key path, file and line.
        ConfigurationError: ``loaded`` is not a mapping (a list, a str, a number), or the type
            of a field of ``cls`` (or of a class it holds) cannot be resolved (a name imported
            only under ``TYPE_CHECKING``, a class defined inside a function) or names a type no
            value can be structured into; the message names the class, the field and the type.
    """
    if not isinstance(loaded, Mapping):  # an untyped caller may pass anything
        raise _not_a_mapping(loaded, cls)
    locations: Mapping[KeyPath, tuple[str, int]] = {}
    file: str | None = None
    if isinstance(loaded, LoadedHparams):
        locations, file = loaded.locations, loaded.source
    name = source or file or "the given mapping"
    fields = _field_names(cls)
    options = RunOptions.names()
    data = {key: value for key, value in loaded.items() if key in fields or key not in options}
    definition: str | None = None
    problems: list[HparamsProblem] = []
    try:
        return _hparams_converter().structure(data, cls)
    except (_TypeDefinitionError, StructureHandlerNotFoundError) as error:
        definition = _definition_problem(error)
    except cattrs.BaseValidationError as error:
        # A class met inside a list or a union is built (and its types resolved) only then.
        definition = _definition_problem(error)
        found: list[tuple[KeyPath, str]] = []
        _collect(error, (), cls, found)
        problems = [_problem(path, message, locations, file) for path, message in found]
    except (ValueError, TypeError) as error:
        # Raised by cls itself (an attrs validator, __attrs_post_init__) after every field fit.
        problems = [HparamsProblem("", str(error) or type(error).__name__, source=file)]
    if definition is not None:
        raise ConfigurationError(
            f"cannot structure hyperparameters into {_type_name(cls)}: {definition}"
        )
    raise HparamsError(cls.__name__, name, problems)


def _not_a_mapping(loaded: object, cls: type[object]) -> ConfigurationError:
    """The error for a ``loaded`` that is not a mapping; a path is pointed to the loader."""
    hint = (
        f"; to load a file, call load_typed_hparams(path, {_type_name(cls)})"
        if isinstance(loaded, str | os.PathLike)
        else ""
    )
    return ConfigurationError(
        "structure_hparams: loaded must be the loaded hyperparameters, a mapping such as "
        f"load_hparams' result, not {with_article(type(loaded).__name__)} {loaded!r:.80}{hint}"
    )


def load_typed_hparams(
    path: str | os.PathLike[str],
    cls: type[_T],
    overrides: Mapping[str, object] | str | None = None,
) -> _T:
    """Load a HyperPyYAML file and structure it into ``cls``: :func:`~typedbrain.load_hparams`
    then :func:`structure_hparams`.

    Run options the file sets (``precision: bf16``) and ``cls`` has no field for are not in
    what it returns: it warns, naming them. Load with :func:`~typedbrain.load_hparams` and
    :func:`~typedbrain.split_run_options` to pass them to the brain.

    Raises:
        OverrideError: an override names a key the file does not have.
        PlaceholderError: a ``!PLACEHOLDER`` is left without a value.
        HparamsError: the loaded hyperparameters do not fit ``cls``.
    """  # noqa: D205 - the summary names both steps
    loaded = load_hparams(path, overrides)
    structured = structure_hparams(loaded, cls)
    dropped = sorted(RunOptions.names() & loaded.keys() - _field_names(cls))
    if dropped:
        warn(
            f"{os.fspath(path)} sets the run options {dropped}, which {cls.__name__} has no "
            "field for: load_typed_hparams does not return them, so they do not reach a brain; "
            "load with load_hparams and split_run_options to pass them as its run options",
            UserWarning,
        )
    return structured


def _field_names(cls: object) -> frozenset[str]:
    cls = get_origin(cls) or cls
    if not isinstance(cls, type):
        return frozenset()
    if attrs.has(cls):
        return frozenset(field.name for field in attrs.fields(cls))
    if dataclasses.is_dataclass(cls):
        return frozenset(field.name for field in dataclasses.fields(cls))
    if is_typeddict(cls):
        required: frozenset[str] = getattr(cls, "__required_keys__", frozenset())
        optional: frozenset[str] = getattr(cls, "__optional_keys__", frozenset())
        return required | optional
    return frozenset()


class _TypeDefinitionError(Exception):
    """A field type that no value can be structured into; the message names class and field.

    Not a ``TypeError``: the union and sequence hooks, which try the next arm on those, must let
    it through to :func:`structure_hparams`.
    """


def _definition_problem(error: BaseException) -> str | None:
    """The message of the first type-definition error in ``error`` (a tree of them), if any."""
    if isinstance(error, _TypeDefinitionError):
        return str(error)
    if isinstance(error, StructureHandlerNotFoundError):
        return f"{_type_name(error.type_)} is not a type hyperparameters can be structured into"
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _definition_problem(inner)
            if found is not None:
                return found
    return None


def _problem(
    path: KeyPath,
    message: str,
    locations: Mapping[KeyPath, tuple[str, int]],
    file: str | None,
) -> HparamsProblem:
    """A problem at ``path``, located at the key itself or else at its nearest written parent."""
    for end in range(len(path), -1, -1):
        where = locations.get(path[:end])
        if where is not None:
            return HparamsProblem(format_key_path(path), message, source=where[0], line=where[1])
    return HparamsProblem(format_key_path(path), message, source=file)


def _collect(
    error: BaseException, path: KeyPath, target: object, out: list[tuple[KeyPath, str]]
) -> None:
    """Flatten cattrs' tree of errors into (key path, message) pairs."""
    if isinstance(error, ClassValidationError):
        with_notes, without = error.group_exceptions()
        for inner, note in with_notes:
            _collect(inner, (*path, str(note.name)), error.cl, out)
        for inner in without:
            _collect(inner, path, error.cl, out)
    elif isinstance(error, IterableValidationError):
        indexed, rest = error.group_exceptions()
        for inner, index_note in indexed:
            _collect(inner, (*path, _index(index_note)), error.cl, out)
        for inner in rest:
            _collect(inner, path, error.cl, out)
    elif isinstance(error, ForbiddenExtraKeysError):
        known = sorted(_field_names(error.cl))
        for key in sorted(error.extra_fields):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(
                ((*path, key), f"unexpected key: {error.cl.__name__} has no such field{hint}")
            )
    elif isinstance(error, KeyError) and path:
        owner = getattr(target, "__name__", "the class")
        hint = ""
        if len(path) == 1 and path[0] in RunOptions.names():
            hint = (
                f" ({path[0]!r} is a run option: split_run_options takes it out; give "
                "structure_hparams the whole loaded mapping, which keeps a run option the "
                "class declares)"
            )
        out.append((path, f"missing: required by {owner}{hint}"))
    else:
        out.append((path, str(error) or type(error).__name__))


def _index(note: IterableValidationNote) -> str | int:
    index: object = note.index
    return index if isinstance(index, int) else str(index)


# Strict hooks --------------------------------------------------------------------------------


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60


def _got(value: object) -> str:
    """``got <type> <repr>``, the repr on one line and shortened (a module's runs for pages)."""
    shown = _SHORT_REPR.repr(value)
    if "\n" in shown:
        shown = shown.split("\n", 1)[0] + " ...)"
    return f"got {type(value).__name__} {shown}"


def _structure_int(value: object, _: type[int]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"expected an integer, {_got(value)}")


def _structure_float(value: object, _: type[float]) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected a number, {_got(value)}")


def _structure_str(value: object, _: type[str]) -> str:
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string, {_got(value)}")


def _structure_bool(value: object, _: type[bool]) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError(f"expected true or false, {_got(value)}")


def _passthrough(value: object, _: object) -> object:
    return value


def _is_anything(tp: object) -> bool:
    return tp is object or tp is typing.Any


def _is_callable(tp: object) -> bool:
    return tp is collections.abc.Callable or get_origin(tp) is collections.abc.Callable


def _structure_callable(value: object, tp: object) -> object:
    if callable(value):
        return value
    raise TypeError(f"expected a callable (a class, function or !name: factory), {_got(value)}")


def _is_literal(tp: object) -> bool:
    return get_origin(tp) is typing.Literal


def _structure_literal(value: object, tp: object) -> object:
    # Strict as run options are: True is not the literal 1, nor 1.0 the literal 1.
    if _matches(value, tp):
        return value
    choices = ", ".join(repr(choice) for choice in get_args(tp))
    raise TypeError(f"expected one of {choices}, {_got(value)}")


def _is_class_type(tp: object) -> bool:
    return get_origin(tp) is type


def _structure_class(value: object, tp: object) -> object:
    (bound,) = get_args(tp) or (object,)
    bounds = get_args(bound) if _is_union(bound) else (bound,)
    if isinstance(value, type) and any(
        _is_anything(arm) or (isinstance(arm, type) and issubclass(value, arm)) for arm in bounds
    ):
        return value
    expected = " or ".join(_type_name(arm) for arm in bounds)
    raise TypeError(
        f"expected a class that is a subclass of {expected} (a !name: class), {_got(value)}"
    )


def _is_mapping(tp: object) -> bool:
    return (get_origin(tp) or tp) in _MAPPINGS


def _is_union(tp: object) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def _is_sequence(tp: object) -> bool:
    return (get_origin(tp) or tp) in _SEQUENCES


def _is_record(tp: object) -> bool:
    """An attrs class, a dataclass or a ``TypedDict``: built key by key from a mapping."""
    origin = get_origin(tp) or tp
    return isinstance(origin, type) and (
        attrs.has(origin) or dataclasses.is_dataclass(origin) or is_typeddict(origin)
    )


def _is_plain_class(tp: object) -> bool:
    return (
        isinstance(tp, type)
        and get_origin(tp) is None
        and tp not in (int, float, str, bool)
        and tp not in _SEQUENCES
        and not _is_record(tp)
    )


def _is_generic_class(tp: object) -> bool:
    """A parameterised ordinary class (``Box[int]``, ``re.Pattern[str]``, ``os.PathLike[str]``).

    Its value is whatever the file built: it is checked against the class alone, as Python
    cannot check the parameters of an instance.
    """
    origin = get_origin(tp)
    return (
        isinstance(origin, type)
        and origin is not type
        and origin not in _SEQUENCES
        and origin not in _MAPPINGS
        and not _is_record(origin)
    )


def _structure_generic_class(value: object, tp: object) -> object:
    origin = get_origin(tp)
    assert isinstance(origin, type)
    if is_protocol(origin):
        return _structure_protocol(value, origin)
    if isinstance(value, origin):
        return value
    raise TypeError(f"expected {with_article(_type_name(tp))}, {_got(value)}")


def _is_instance(value: object, tp: object) -> bool:
    """``isinstance(value, tp)``; false for what no isinstance check can test (a TypedDict)."""
    try:
        return isinstance(tp, type) and isinstance(value, tp)
    except TypeError:
        return False


def _type_name(tp: object) -> str:
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(arm) for arm in get_args(tp))
    if isinstance(tp, type) and get_origin(tp) is None:
        return tp.__name__
    return str(tp).removeprefix("typing.")


def _structure_protocol(value: object, tp: type[object]) -> object:
    """A value for a field typed with a protocol: any object that has the protocol's members.

    This is the test a ``runtime_checkable`` protocol's ``isinstance`` makes; the library's own
    protocols (``TrainLogger``, ``CheckpointerLike``) are not runtime-checkable.
    """
    members = sorted(get_protocol_members(tp))
    if all(hasattr(value, member) for member in members):
        return value
    having = f" (an object with {', '.join(members)})" if members else ""
    raise TypeError(f"expected {with_article(tp.__name__)}{having}, {_got(value)}")


# Field types --------------------------------------------------------------------------------


def _resolved_fields(cls: type[object]) -> dict[str, object]:
    """The field (or key) names of a record class, with their resolved types.

    Raises:
        _TypeDefinitionError: an annotation names something that is not defined where the
            class is (a postponed annotation is resolved in the class's module).
    """
    try:
        if attrs.has(cls):
            # What cattrs reads too: the field types, which attrs.make_class sets without
            # annotations.
            return {field.name: field.type for field in attrs.fields(attrs.resolve_types(cls))}
        hints = typing.get_type_hints(cls)
    except (NameError, AttributeError, TypeError, SyntaxError) as error:
        raise _TypeDefinitionError(_unresolved(cls, error)) from error
    names = _field_names(cls)
    return {name: hint for name, hint in hints.items() if name in names}


def _unresolved(cls: type[object], error: Exception) -> str:
    """Why an annotation of ``cls`` cannot be resolved, naming the fields that hold the name."""
    missing: object = getattr(error, "name", None)
    written: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        annotations: Mapping[str, object] = vars(base).get("__annotations__", {})
        for field, annotation in annotations.items():
            text = getattr(annotation, "__forward_arg__", annotation)
            if isinstance(text, str):
                written[field] = text
    fields = [
        f"{cls.__name__}.{field} ({text!r})"
        for field, text in written.items()
        if isinstance(missing, str) and re.search(rf"\b{re.escape(missing)}\b", text)
    ]
    where = ", ".join(fields) if fields else cls.__name__
    noun = "annotation" if len(fields) == 1 else "annotations"
    return (
        f"the {noun} of {where} cannot be resolved ({type(error).__name__}: {error}): "
        f"annotations are resolved when hyperparameters are structured, in the class's module "
        f"({cls.__module__}), so import what they name at run time, not only under "
        "TYPE_CHECKING, and define the classes they name at module level, not inside a function"
    )


def _check_fields(child: cattrs.Converter, cls: type[object]) -> None:
    """Refuse a record class with a field type that cannot be resolved or structured.

    Raises:
        _TypeDefinitionError: naming the class, the field and the type.
    """
    for field, hint in _resolved_fields(cls).items():
        unsupported = _unsupported(child, hint)
        if unsupported is not None:
            shown = "" if unsupported is hint else f" (in {_type_name(hint)})"
            raise _TypeDefinitionError(
                f"{cls.__name__}.{field} is typed {_type_name(unsupported)}{shown}, which "
                "hyperparameters cannot be structured into: use a list, tuple, set, Sequence, "
                "Collection, Iterable or mapping for YAML collections, a class (attrs, "
                "dataclass, TypedDict) for a nested mapping, or the class, a protocol, a "
                "Callable or object for an object the file builds"
            )


def _unsupported(child: cattrs.Converter, tp: object) -> object | None:
    """The type inside ``tp`` that no hook structures (``tp`` itself, an item or arm), if any.

    A record class inside it is left out: it is checked when its own hook is built.
    """
    if get_origin(tp) is typing.Annotated:
        return _unsupported(child, get_args(tp)[0])
    if isinstance(tp, TypeVar) or _is_record(tp) or _is_generic_class(tp):
        return None  # (a generic class's value is checked against the class alone)
    if not (_is_literal(tp) or _is_class_type(tp) or _is_callable(tp)):
        for argument in get_args(tp):
            if argument is not Ellipsis and not isinstance(argument, list):
                found = _unsupported(child, argument)
                if found is not None:
                    return found
    try:
        child.get_structure_hook(tp)
    except StructureHandlerNotFoundError:
        return tp
    return None


def _make_hooks(
    child: cattrs.Converter, base: cattrs.Converter
) -> tuple[
    Callable[[object, object], object],
    Callable[[object, object], object],
    Callable[[object, object], object],
]:
    """The union, sequence and plain-class hooks, which structure what they hold with ``child``."""

    def structure_union(value: object, tp: object) -> object:
        arms = get_args(tp)
        if value is None and type(None) in arms:
            return None
        # An arm the value already is wins (an int for int | str), then the first that fits.
        for arm in arms:
            fits = arm is not type(None) and _is_instance(value, arm)
            if fits and not (isinstance(value, bool) and arm in (int, float)):
                return child.structure(value, arm)
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return child.structure(value, arm)
            except (cattrs.BaseValidationError, ValueError, TypeError):
                continue
        expected = " or ".join(_type_name(arm) for arm in arms)
        raise TypeError(f"expected {expected}, {_got(value)}")

    def structure_sequence(value: object, tp: object) -> object:
        origin = get_origin(tp) or tp
        args = get_args(tp)
        if isinstance(value, str | bytes | Mapping) or not isinstance(
            value, list | tuple | set | frozenset
        ):
            raise TypeError(f"expected a list, {_got(value)}")
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise TypeError(f"expected a list of {len(args)} items, got {len(items)}")
            kinds: list[object] = list(args)
        else:
            kinds = [args[0] if args else object] * len(items)
        results: list[object] = []
        errors: list[Exception] = []
        for index, (item, kind) in enumerate(zip(items, kinds, strict=True)):
            try:
                # cast: a type argument (list[X]'s X) is a type form, which cattrs accepts.
                results.append(child.structure(item, cast("type[object]", kind)))
            except (cattrs.BaseValidationError, ValueError, TypeError) as error:
                error.add_note(IterableValidationNote(f"item {index}", index, kind))
                errors.append(error)
        if errors:
            raise IterableValidationError(
                f"While structuring {_type_name(tp)}", errors, cast("type[object]", origin)
            )
        if origin in (set, collections.abc.Set, collections.abc.MutableSet):
            return set(results)
        if origin is frozenset:
            return frozenset(results)
        if origin is tuple:
            return tuple(results)
        return results

    def structure_plain(value: object, tp: object) -> object:
        assert isinstance(tp, type)
        if is_protocol(tp):
            return _structure_protocol(value, tp)
        if isinstance(value, tp):
            return value
        if issubclass(tp, PurePath) and isinstance(value, str):
            return tp(value)
        try:
            return base.structure(value, tp)
        except StructureHandlerNotFoundError:
            raise TypeError(f"expected {with_article(tp.__name__)}, {_got(value)}") from None

    return structure_union, structure_sequence, structure_plain


@functools.cache
def _hparams_converter() -> cattrs.Converter:
    """A child of the library's converter for hyperparameters (built once, on first use).

    The library's converter, which the state classes use, is left as it is.
    """
    base = converter.copy()
    base.register_structure_hook(int, _structure_int)
    base.register_structure_hook(float, _structure_float)
    base.register_structure_hook(str, _structure_str)
    base.register_structure_hook(bool, _structure_bool)
    child = base.copy()
    union, sequence, plain = _make_hooks(child, base)
    child.register_structure_hook_func(_is_plain_class, plain)
    child.register_structure_hook_func(_is_generic_class, _structure_generic_class)
    child.register_structure_hook_func(_is_sequence, sequence)
    child.register_structure_hook_func(_is_union, union)
    child.register_structure_hook_func(_is_callable, _structure_callable)
    child.register_structure_hook_func(_is_anything, _passthrough)
    child.register_structure_hook_func(_is_literal, _structure_literal)
    child.register_structure_hook_func(_is_class_type, _structure_class)

    def mapping_hook(tp: type[object]) -> Callable[[object, type[object]], object]:
        build = make_mapping_structure_fn(tp, child, structure_to=dict)

        def structure(value: object, cls: type[object]) -> object:
            if not isinstance(value, Mapping):
                raise TypeError(f"expected a mapping, {_got(value)}")
            return build(value, cls)

        return structure

    child.register_structure_hook_factory(_is_mapping, mapping_hook)

    checking: set[type[object]] = set()  # a class may hold itself: check it once

    def record_hook(tp: type[object]) -> Callable[[object, type[object]], object]:
        origin: type[object] = get_origin(tp) or tp
        if origin not in checking:
            checking.add(origin)
            try:
                _check_fields(child, origin)
            finally:
                checking.discard(origin)
        typed_dict = is_typeddict(origin)
        build = (
            make_typeddict_structure_fn(tp, child)
            if typed_dict
            else make_dict_structure_fn(tp, child)
        )
        what = "keys" if typed_dict else "fields"

        def structure(value: object, cls: type[object]) -> object:
            if not typed_dict and _is_instance(value, origin):
                return value
            if not isinstance(value, Mapping):
                raise TypeError(f"expected a mapping of {origin.__name__}'s {what}, {_got(value)}")
            return build(dict(value), cls)

        return structure

    child.register_structure_hook_factory(_is_record, record_hook)
    return child

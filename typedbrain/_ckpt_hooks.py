"""How a checkpointer saves and loads an object: per-object hooks, class hooks, or ``Stateful``.

A class opts into custom checkpointing with :func:`register_checkpoint_hooks` and marks one
method with :func:`mark_as_saver` and (or) one with :func:`mark_as_loader`. Hooks are looked up
per object first, then along the class's MRO, then the ``Stateful`` default applies.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal, Never, TypeAlias, TypeVar, cast, final

import attrs

from typedbrain._errors import ConfigurationError, HookContractError
from typedbrain._protocols import Stateful

__all__ = [
    "LoadHook",
    "SaveHook",
    "mark_as_loader",
    "mark_as_saver",
    "register_checkpoint_hooks",
]

_T = TypeVar("_T")
_ClassT = TypeVar("_ClassT", bound=type)

SaveHook: TypeAlias = Callable[[_T, Path], None]
"""Writes ``obj`` to ``path``: called as ``hook(obj, path)``.

A method marked with :func:`mark_as_saver` (``def save(self, path: Path) -> None``) has this
shape, and so does a ``custom_save_hook`` given to ``Checkpointer.add_recoverable``.
"""

LoadHook: TypeAlias = Callable[[_T, Path, bool], None]
"""Restores ``obj`` from ``path``: called as ``hook(obj, path, end_of_epoch)``.

``end_of_epoch`` is the flag the checkpoint was saved with. A method marked with
:func:`mark_as_loader` (``def load(self, path: Path, end_of_epoch: bool) -> None``) has this
shape, and so does a ``custom_load_hook``.
"""

# Bounds that accept every saver / loader whatever its first argument (parameters are
# contravariant, so ``Never`` there is the widest type), keeping the decorated function's type.
_SaverT = TypeVar("_SaverT", bound=Callable[[Never, Path], None])
_LoaderT = TypeVar("_LoaderT", bound=Callable[[Never, Path, bool], None])

_Role: TypeAlias = Literal["saver", "loader"]
_MARK: Final = "__typedbrain_checkpoint_hook__"
_REGISTERED_IN: Final = "__typedbrain_registered_in__"
"""Set on a marked function by register_checkpoint_hooks: the class's module and qualname."""

# Internally a hook is called with the object it was registered for; its first parameter's type
# was checked where it was registered, so here the object is passed as ``Any``.
_AnySaver: TypeAlias = Callable[[Any, Path], None]
_AnyLoader: TypeAlias = Callable[[Any, Path, bool], None]


@final
@attrs.frozen
class _ClassHooks:
    """The names of the methods a registered class marked.

    They are looked up on each object's class, so that a subclass's override of one is what runs.
    """

    saver: str | None
    loader: str | None


# Classes decorated with register_checkpoint_hooks; weak so that decorated classes defined in
# functions (tests, notebooks) can be collected.
_CLASS_HOOKS: Final[weakref.WeakKeyDictionary[type, _ClassHooks]] = weakref.WeakKeyDictionary()


def _describe(function: object) -> str:
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    return repr(name) if name else repr(function)


# What a hook of each role is called with (an object, the file, and for a loader the flag).
_ARGUMENTS: Final[dict[_Role, tuple[object, ...]]] = {
    "saver": (object(), Path("checkpoint.ckpt")),
    "loader": (object(), Path("checkpoint.ckpt"), True),
}


def _check_arity(function: Callable[..., object], role: _Role, what: str, first: str) -> None:
    """Raise unless ``function`` can be called as a checkpoint ``role`` is.

    ``what`` names the hook in the message, ``first`` its first parameter (``self``, ``obj``).
    A callable without an inspectable signature (some builtins) is accepted.
    """
    expected = (
        f"({first}, path: Path) -> None"
        if role == "saver"
        else f"({first}, path: Path, end_of_epoch: bool) -> None"
    )
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*_ARGUMENTS[role])
    except TypeError as error:
        raise HookContractError(f"{what} must have the signature {expected}: {error}") from None


def _check_signature(function: object, role: _Role) -> None:
    """What :func:`mark_as_saver` / :func:`mark_as_loader` check: a function, rightly shaped."""
    if not inspect.isfunction(function):
        raise HookContractError(
            f"mark_as_{role} expects a plain function defined in a class body, "
            f"got {_describe(function)}"
        )
    _check_arity(function, role, f"checkpoint {role} {_describe(function)}", "self")


def check_custom_hook(name: str, hook: object, role: _Role) -> None:
    """Check a per-object hook given to ``add_recoverable`` for recoverable ``name``.

    Raises:
        HookContractError: ``hook`` is not callable, or cannot be called as ``role`` hooks are;
            the message names the recoverable and the hook.
    """
    argument = "custom_save_hook" if role == "saver" else "custom_load_hook"
    what = f"recoverable {name!r}: {argument} {_describe(hook)}"
    if not callable(hook):
        raise HookContractError(f"{what} is a {type(hook).__qualname__}, not callable")
    _check_arity(hook, role, what, "obj")


def mark_as_saver(method: _SaverT) -> _SaverT:
    """Mark a method as its class's checkpoint saver; it must be ``(self, path: Path) -> None``.

    The class must also be decorated with :func:`register_checkpoint_hooks`. The saver writes
    the object's state to ``path`` (one file; the checkpointer records its size and checksum).

    Raises:
        HookContractError: ``method`` cannot be called as ``method(obj, path)``; the message
            names it.
    """
    _check_signature(method, "saver")
    vars(method)[_MARK] = "saver"
    return method


def mark_as_loader(method: _LoaderT) -> _LoaderT:
    """Mark a method as its class's checkpoint loader: ``(self, path, end_of_epoch) -> None``.

    The class must also be decorated with :func:`register_checkpoint_hooks`. ``end_of_epoch`` is
    the flag the checkpoint was saved with.

    Raises:
        HookContractError: ``method`` cannot be called as ``method(obj, path, end_of_epoch)``;
            the message names it.
    """
    _check_signature(method, "loader")
    vars(method)[_MARK] = "loader"
    return method


def register_checkpoint_hooks(cls: _ClassT) -> _ClassT:
    """Class decorator: save and load instances with the methods marked in the class body.

    Example::

        @register_checkpoint_hooks
        class Vocabulary:
            @mark_as_saver
            def save(self, path: Path) -> None: ...

            @mark_as_loader
            def load(self, path: Path, end_of_epoch: bool) -> None: ...

    Subclasses inherit the hooks (the lookup walks the MRO); a subclass decorated itself
    overrides the hooks it marks, and a subclass that overrides a marked method (same name) has
    its override called, as Python's method lookup would.

    A class decorator that builds a new class from the decorated one (``@attrs.define`` with
    its default slots, ``@dataclass(slots=True)``) may come above or below this one: the new
    class, which has the same name and the same marked functions, has the same hooks.

    Raises:
        HookContractError: the class marks no method, or more than one saver or loader.
    """
    found = _marked(cls)
    if not found["saver"] and not found["loader"]:
        raise HookContractError(
            f"register_checkpoint_hooks: class {cls.__qualname__!r} marks no method with "
            "mark_as_saver or mark_as_loader"
        )
    for role, methods in found.items():
        if len(methods) > 1:
            names = ", ".join(repr(name) for name, _ in methods)
            raise HookContractError(
                f"register_checkpoint_hooks: class {cls.__qualname__!r} marks several "
                f"{role}s ({names}); mark one"
            )
    _CLASS_HOOKS[cls] = _hooks_from(found)
    for methods in found.values():
        for _, function in methods:
            vars(function)[_REGISTERED_IN] = _class_key(cls)
    return cls


def _marked(cls: type) -> dict[_Role, list[tuple[str, object]]]:
    """The functions of ``cls``'s own body marked as a saver or a loader, by role."""
    found: dict[_Role, list[tuple[str, object]]] = {"saver": [], "loader": []}
    for name, value in vars(cls).items():
        role = vars(value).get(_MARK) if inspect.isfunction(value) else None
        if role in ("saver", "loader"):
            found[role].append((name, value))
    return found


def _hooks_from(found: dict[_Role, list[tuple[str, object]]]) -> _ClassHooks:
    return _ClassHooks(
        saver=found["saver"][0][0] if found["saver"] else None,
        loader=found["loader"][0][0] if found["loader"] else None,
    )


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _hooks_of(cls: type) -> _ClassHooks | None:
    """The hooks registered for ``cls`` itself (not its bases), or ``None``.

    A class that a class decorator built from a registered one (``@attrs.define`` above
    ``@register_checkpoint_hooks`` makes a new, slotted class) is not the class registered, but
    holds the same marked functions under the same name: it has the same hooks.
    """
    hooks = _CLASS_HOOKS.get(cls)
    if hooks is not None:
        return hooks
    found = _marked(cls)
    functions = [function for methods in found.values() for _, function in methods]
    key = _class_key(cls)
    if (
        functions
        and all(len(methods) <= 1 for methods in found.values())
        and all(vars(function).get(_REGISTERED_IN) == key for function in functions)
    ):
        return _hooks_from(found)
    return None


def _class_hook(name: str, cls: type, method: str, role: _Role) -> object:
    """``cls``'s method ``method`` (a subclass's override, if any), checked as ``role`` hooks are.

    Raises:
        HookContractError: an override cannot be called as a ``role`` is; the message names
            the recoverable and the method.
    """
    function: object = getattr(cls, method)
    marked = inspect.isfunction(function) and vars(function).get(_MARK) == role
    if not marked:
        # Overridden in a subclass without the mark: the override must fit the same call.
        if not callable(function):
            raise HookContractError(
                f"recoverable {name!r}: {cls.__qualname__}.{method}, its class's checkpoint "
                f"{role}, is a {type(function).__qualname__}, not a method"
            )
        _check_arity(function, role, f"recoverable {name!r}: {cls.__qualname__}.{method}", "self")
    return function


def _check_marks_registered(name: str, cls: type) -> None:
    """Refuse methods marked as hooks in a class that is not registered: the marks do nothing.

    Raises:
        HookContractError: a class of ``cls``'s MRO marks a method but is not decorated with
            :func:`register_checkpoint_hooks`; the message names it.
    """
    for klass in cls.__mro__:
        if _hooks_of(klass) is not None:
            continue
        for attribute, value in vars(klass).items():
            role = vars(value).get(_MARK) if inspect.isfunction(value) else None
            if role is None:
                continue
            registered = vars(value).get(_REGISTERED_IN)
            if registered is not None:
                raise HookContractError(
                    f"recoverable {name!r}: {klass.__qualname__}.{attribute} is marked with "
                    f"mark_as_{role} and was registered by @register_checkpoint_hooks in the "
                    f"class {registered}, which is not {_class_key(klass)}: the decorated class "
                    "was replaced by a new one after decoration (by a class decorator above "
                    "@register_checkpoint_hooks that builds a new class and renames it), or the "
                    f"method was copied into {klass.__qualname__}. Make "
                    "@register_checkpoint_hooks the outermost (top) decorator of the class, or "
                    f"decorate {klass.__qualname__} with it too"
                )
            raise HookContractError(
                f"recoverable {name!r}: {klass.__qualname__}.{attribute} is marked with "
                f"mark_as_{role}, but {klass.__qualname__} is not decorated with "
                "@register_checkpoint_hooks, so the mark does nothing; decorate the class"
            )


@final
@attrs.frozen
class ResolvedHooks:
    """The hooks that save and load one recoverable; ``None`` means the ``Stateful`` default.

    Attributes:
        saver: the custom saver, or ``None`` for ``torch.save(obj.state_dict())``.
        loader: the custom loader, or ``None`` for ``obj.load_state_dict(torch.load(...))``.
        one_sided: set when one hook is custom and the other the default (a class that marks
            only a saver, say): a sentence naming the object, both hooks and how to give the
            missing one, for the error of a load that fails because of it.
    """

    saver: _AnySaver | None
    loader: _AnyLoader | None
    one_sided: str | None = None


@final
@attrs.frozen
class _Origin:
    """Where a custom hook came from: for the message about a missing counterpart."""

    described: str  # "custom_save_hook 'save_words'", "Stats.save"
    marked_in: type | None  # the registered class that marks it; None for a per-object hook


def _one_sided(name: str, obj: object, saver: _Origin | None, loader: _Origin | None) -> str | None:
    """Why loading recoverable ``name`` may fail when only one of its hooks is custom."""
    kind = type(obj).__qualname__
    if saver is not None and loader is None:
        if saver.marked_in is not None:
            fix = (
                f"mark the method that reads the file back with @mark_as_loader in "
                f"{saver.marked_in.__qualname__} (def load(self, path: Path, end_of_epoch: "
                "bool) -> None)"
            )
        else:
            fix = "give add_recoverable a custom_load_hook as well (hook(obj, path, end_of_epoch))"
        return (
            f"recoverable {name!r} (a {kind}) is saved by its custom saver {saver.described} "
            "but loaded by the default loader (load_state_dict of what torch.load with "
            "weights_only=True reads from the file), which cannot read what that saver wrote: "
            f"{fix}"
        )
    if loader is not None and saver is None:
        if loader.marked_in is not None:
            fix = (
                f"mark the method that writes the file with @mark_as_saver in "
                f"{loader.marked_in.__qualname__} (def save(self, path: Path) -> None)"
            )
        else:
            fix = "give add_recoverable a custom_save_hook as well (hook(obj, path))"
        return (
            f"recoverable {name!r} (a {kind}) is saved by the default saver (torch.save of its "
            f"state_dict()) but loaded by its custom loader {loader.described}, which may not "
            f"read what that saver wrote: {fix}"
        )
    return None


def resolve_hooks(
    name: str,
    obj: object,
    saver: _AnySaver | None,
    loader: _AnyLoader | None,
) -> ResolvedHooks:
    """Find how to save and load ``obj``: the given hooks, then class hooks, then ``Stateful``.

    Raises:
        HookContractError: a given hook is not callable or has the wrong signature; the
            message names the recoverable ``name``.
        ConfigurationError: neither a hook nor ``state_dict`` / ``load_state_dict`` covers
            saving or loading; the message names the recoverable ``name``.
    """
    saver_origin = loader_origin = None
    if saver is not None:
        check_custom_hook(name, saver, "saver")
        saver_origin = _Origin(f"custom_save_hook {_describe(saver)}", None)
    if loader is not None:
        check_custom_hook(name, loader, "loader")
        loader_origin = _Origin(f"custom_load_hook {_describe(loader)}", None)
    cls = type(obj)
    _check_marks_registered(name, cls)
    for klass in cls.__mro__:
        hooks = _hooks_of(klass)
        if hooks is None:
            continue
        if saver is None and hooks.saver is not None:
            saver = cast(_AnySaver, _class_hook(name, cls, hooks.saver, "saver"))
            saver_origin = _Origin(f"{cls.__qualname__}.{hooks.saver}", klass)
        if loader is None and hooks.loader is not None:
            loader = cast(_AnyLoader, _class_hook(name, cls, hooks.loader, "loader"))
            loader_origin = _Origin(f"{cls.__qualname__}.{hooks.loader}", klass)
    if (saver is None or loader is None) and not isinstance(obj, Stateful):
        missing = " and ".join(
            role for role, hook in (("save", saver), ("load", loader)) if hook is None
        )
        raise ConfigurationError(
            f"recoverable {name!r}: cannot {missing} a {type(obj).__qualname__}: it has no "
            "state_dict/load_state_dict, no class registered with register_checkpoint_hooks "
            "and no custom hook was given"
        )
    return ResolvedHooks(
        saver=saver, loader=loader, one_sided=_one_sided(name, obj, saver_origin, loader_origin)
    )

"""Moving a batch's tensors to a device, through the containers a data loader yields.

:func:`move_to_device` is what ``Brain.move_batch`` does by default. It walks dicts, lists,
tuples (named ones too), attrs and dataclass instances; an object with a ``to`` method of its
own (a padded-batch class, torch's ``PackedSequence``) is handed the device instead of being
walked. Whatever is already on the device is returned as it is, the same object, so a batch
that needs no move costs a walk and no copy.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable, Iterable
from typing import TypeVar, cast

import attrs
import torch
from torch import Tensor

__all__ = ["move_to_device"]

_T = TypeVar("_T")

_PLAIN_CONTAINERS: frozenset[type] = frozenset({dict, list, tuple})

# attrs' mypy plugin wants evolve's first argument to be of an attrs class it can name; here it
# is any attrs instance a batch holds, known only at run time.
_evolve: Callable[..., object] = attrs.evolve

# Never walked or moved: the common scalars and strings of a batch, modules (moving one would
# change it in place) and classes (whose to, if any, is not a method bound to a batch).
_LEFT_AS_THEY_ARE: tuple[type, ...] = (
    str,
    bytes,
    int,
    float,
    bool,
    complex,
    type(None),
    torch.nn.Module,
    type,
)


def move_to_device(value: _T, device: torch.device) -> _T:
    """``value`` with every tensor it holds on ``device``; the same object if none moves.

    Containers that hold a moved tensor are copied with the same type (a ``defaultdict``
    keeps its factory, a named tuple its class); the others are returned unchanged. Modules
    are left alone: moving one changes it in place, and a batch is not the place to do that.
    Tensors move with ``non_blocking=True`` towards a CUDA device, which overlaps the copy from
    pinned memory (``pin_memory=True``) with the work already queued.

    Args:
        value: a batch, as the data loader yields it.
        device: where the tensors should be.

    Returns:
        ``value`` or a copy of it with its tensors on ``device``.
    """
    return cast(_T, _moved(value, device))


def _moved(value: object, device: torch.device) -> object:
    if isinstance(value, Tensor):
        if value.device == device:
            return value
        return value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, _LEFT_AS_THEY_ARE):
        return value
    # An object's own move wins over walking it: a PackedSequence, a named tuple, must keep its
    # batch_sizes on the CPU, and its to() knows that. Plain containers have none to look up.
    if type(value) not in _PLAIN_CONTAINERS:
        to = getattr(value, "to", None)
        if callable(to):
            return to(device)
    if isinstance(value, dict):
        return _moved_dict(value, device)
    if isinstance(value, list):
        items = [_moved(item, device) for item in value]
        if _same(items, value):
            return value
        moved_list = copy.copy(value)
        moved_list[:] = items
        return moved_list
    if isinstance(value, tuple):
        items = [_moved(item, device) for item in value]
        if _same(items, value):
            return value
        if hasattr(value, "_fields"):  # a named tuple takes its fields one by one
            return cast(Callable[..., object], type(value))(*items)
        return type(value)(items)
    cls = type(value)
    if attrs.has(cls):
        arguments = ((field.alias, field.name) for field in attrs.fields(cls) if field.init)
        changes = _moved_fields(value, arguments, device)
        return _evolve(value, **changes) if changes else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        arguments = ((field.name, field.name) for field in dataclasses.fields(value) if field.init)
        changes = _moved_fields(value, arguments, device)
        return dataclasses.replace(value, **changes) if changes else value
    return value


def _moved_fields(
    value: object, arguments: Iterable[tuple[str, str]], device: torch.device
) -> dict[str, object]:
    """The moved values of the fields that change, by ``__init__`` argument.

    ``arguments`` pairs each ``__init__`` argument with the attribute it sets.
    """
    changes: dict[str, object] = {}
    for argument, attribute in arguments:
        original = getattr(value, attribute)
        moved = _moved(original, device)
        if moved is not original:
            changes[argument] = moved
    return changes


def _moved_dict(value: dict[object, object], device: torch.device) -> object:
    changes = {
        key: moved for key, item in value.items() if (moved := _moved(item, device)) is not item
    }
    if not changes:
        return value
    result = copy.copy(value)  # a dict subclass keeps its class and extra state
    result.update(changes)
    return result


def _same(items: list[object], originals: list[object] | tuple[object, ...]) -> bool:
    return all(map(operator.is_, items, originals))  # the lengths are equal

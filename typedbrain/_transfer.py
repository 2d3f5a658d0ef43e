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
    keeps its factory, a named tuple its class); the others are returned unchanged. An attrs
    or dataclass instance is copied without calling its ``__init__`` (so ``__post_init__``,
    converters and validators do not run again) and all its fields move, ``init=False`` ones
    included, with the other attributes it holds (those ``__post_init__`` derived). Modules
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
        return _with_moved_fields(value, [field.name for field in attrs.fields(cls)], device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [field.name for field in dataclasses.fields(value)]
        return _with_moved_fields(value, names, device)
    return value


def _with_moved_fields(value: object, names: Iterable[str], device: torch.device) -> object:
    """An attrs or dataclass instance with the fields ``names`` moved; itself if none moves.

    The copy is made without calling ``__init__``: ``__post_init__``, ``__attrs_post_init__``,
    converters and validators ran when the batch was built, and running them again on values
    they already processed would process them twice (an ``unsqueeze`` in ``__post_init__``
    would add a second dimension). Every field moves, ``init=False`` ones included, and so do
    the other attributes in the instance's ``__dict__`` (one that ``__post_init__`` derived,
    which it would have derived from the moved fields); a field that was never set stays
    unset. Frozen and slotted classes are set through ``object.__setattr__``, as their own
    ``__init__`` does.
    """
    changes: dict[str, object] = {}
    # Attributes that are not fields (one __post_init__ derived: a mask, say) move too.
    derived = [name for name in getattr(value, "__dict__", {}) if name not in set(names)]
    for name in [*names, *derived]:
        try:
            original = getattr(value, name)
        except AttributeError:  # an init=False field without a default, never set
            continue
        moved = _moved(original, device)
        if moved is not original:
            changes[name] = moved
    if not changes:
        return value
    result = copy.copy(value)
    for name, moved in changes.items():
        object.__setattr__(result, name, moved)
    return result


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

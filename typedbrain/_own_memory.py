"""Give the tensors of a state decoded from a memory-mapped file memory of their own.

``torch.load(mmap=True)`` decodes a file without copying it: its CPU tensors read the file's
pages. A module's ``load_state_dict`` copies them into its parameters, which is why a module's
file is mapped; whatever else is kept would change if the file did, and would hold the file
open after a keep policy deleted it. :func:`copy_out_of_file` copies each storage of a part of
the state (a module's extra state) once into ordinary memory and points its tensors there;
:func:`copy_kept_out_of_file` does the same for the parameters and buffers that a module's own
loading code kept instead of copying.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = ["copy_kept_out_of_file", "copy_out_of_file", "file_storages"]

_StorageKey = tuple[int, int]
"""A storage's address and size: tensors with the same key share one storage."""


def copy_out_of_file(state: object) -> object:
    """``state`` with each CPU tensor in it moved into memory of its own; returns ``state``.

    Containers (dicts, lists) are changed in place, so a dict's attributes (a module state
    dict's ``_metadata``) stay; tuples are rebuilt. Tensors that shared a storage still share
    one (a copy of it), with their offsets and strides: views and tied weights stay so.
    Tensors on other devices are left as they are (``map_location`` copied them there).
    """
    return _copied(state, {})


def _copied(value: object, copies: dict[_StorageKey, torch.UntypedStorage]) -> object:
    if isinstance(value, Tensor):
        return _tensor_copy(value, copies)
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _copied(item, copies)
        return value
    if isinstance(value, list):
        for index, item in enumerate(value):
            value[index] = _copied(item, copies)
        return value
    if isinstance(value, tuple):
        items = [_copied(item, copies) for item in value]
        if type(value) is tuple:
            return tuple(items)
        make = getattr(value, "_make", None)  # a named tuple
        return make(items) if callable(make) else value
    return value


def _tensor_copy(tensor: Tensor, copies: dict[_StorageKey, torch.UntypedStorage]) -> Tensor:
    if tensor.device.type != "cpu":
        return tensor
    if (
        type(tensor) not in (Tensor, torch.nn.Parameter)
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or tensor.is_conj()
        or tensor.is_neg()
    ):
        # What a storage copy would not carry (a quantizer, a lazy conjugation or negation,
        # a subclass's data) is kept by cloning the tensor itself.
        return _with_grad_flag(tensor, tensor.detach().clone())
    storage = tensor.untyped_storage()
    key = (storage.data_ptr(), storage.nbytes())
    copy = copies.get(key)
    if copy is None:
        whole = torch.empty(0, dtype=torch.uint8).set_(storage)
        copy = copies[key] = whole.clone().untyped_storage()
    moved = torch.empty(0, dtype=tensor.dtype).set_(
        copy, tensor.storage_offset(), tensor.size(), tensor.stride()
    )
    return _with_grad_flag(tensor, moved)


def _with_grad_flag(tensor: Tensor, copy: Tensor) -> Tensor:
    """``copy`` of ``tensor``, a ``Parameter`` if it was one, requiring grad if it did."""
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
    if tensor.requires_grad:
        copy.requires_grad_(True)
    return copy


def file_storages(state: object) -> set[int]:
    """The addresses of the storages of the CPU tensors in ``state`` (dicts, lists, tuples)."""
    found: set[int] = set()
    pending = [state]
    while pending:
        value = pending.pop()
        if isinstance(value, Tensor):
            if value.device.type == "cpu" and value.layout == torch.strided:
                found.add(value.untyped_storage().data_ptr())
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list | tuple):
            pending.extend(value)
    found.discard(0)  # empty storages have no address: nothing of the file is in them
    return found


def copy_kept_out_of_file(module: torch.nn.Module, storages: set[int]) -> int:
    """Move each parameter and buffer of ``module`` whose storage is in ``storages`` to a copy.

    ``storages`` are addresses from :func:`file_storages`. The tensors keep their identity
    (their ``.data`` is replaced) and, when several shared a storage, share its copy. Returns
    how many were moved.
    """
    copies: dict[_StorageKey, torch.UntypedStorage] = {}
    moved = 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in storages:
            tensor.data = _tensor_copy(tensor.data, copies)
            moved += 1
    return moved

"""Copy what a module kept of a memory-mapped checkpoint file out of the file.

``torch.load(mmap=True)`` decodes a file without copying it: its CPU tensors read the file's
pages. A module's ``load_state_dict`` copies them into its parameters, which is why a module's
file is mapped; whatever else is kept would change if the file did, would end the process
(``SIGBUS``) if it were truncated, and would hold the file open after a keep policy deleted it.
Its extra states are deep-copied before they are handed over; :func:`copy_kept_out_of_file`
does the same for the parameters and buffers that a module's own loading code kept instead of
copying.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor

__all__ = ["copy_kept_out_of_file", "file_storages"]


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
    (their ``.data`` is replaced by a deep copy) and, when several shared a storage, share its
    copy. Returns how many were moved.
    """
    memo: dict[int, object] = {}
    moved = 0
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in storages:
            tensor.data = copy.deepcopy(tensor.data, memo)
            moved += 1
    return moved

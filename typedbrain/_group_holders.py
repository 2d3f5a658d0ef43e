"""Objects that hold the process group (DDP wrappers, a gloo group), let go of before it goes."""

from __future__ import annotations

import gc
import weakref
from typing import Protocol

__all__ = ["GroupHolder", "hold_group", "release_groups"]


class GroupHolder(Protocol):
    """An object holding process-group objects (a brain), which it can drop when the group goes."""

    def _release_group(self) -> None: ...


# The objects of this process holding a process group, released before it is destroyed.
_holders: weakref.WeakSet[GroupHolder] = weakref.WeakSet()


def hold_group(holder: GroupHolder) -> None:
    """Have :func:`release_groups` ask ``holder`` to drop what holds the process group."""
    _holders.add(holder)


def release_groups() -> None:
    """Have every holder drop what holds the process group, and free it, before it is destroyed.

    A DDP wrapper's reducer holds the process group, as does a group made for the brain's own
    exchanges. Freed after ``destroy_process_group`` (when the script's brain goes, or at
    interpreter exit for a module-level one), the group's destructor runs late, and with gloo
    it sometimes aborts the process ("terminate called without an active exception", exit
    status 134) at the end of a run that succeeded.
    """
    holders = list(_holders)
    _holders.clear()
    for holder in holders:
        holder._release_group()
    if holders:
        gc.collect()  # a module and its hooks can form cycles: free the reducers now

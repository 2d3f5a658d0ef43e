"""Saving and restoring the state of FSDP2-sharded modules and their optimizers as full tensors.

Under ``fully_shard`` a module's parameters are ``DTensor`` objects: each process holds a shard. A
checkpoint stores full tensors instead, so that it loads with ``weights_only=True`` and into
any layout: :func:`gathered` turns every ``DTensor`` of a state into its full tensor (a
collective: every process calls it, which the checkpointer guarantees), and :func:`sharded_like`
/ :func:`sharded_for_optimizer` cut a loaded full state back to the shards the live objects use.
Without a ``DTensor`` all three return their input unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["gathered", "sharded_as", "sharded_for_optimizer", "sharded_like"]


def gathered(state: object) -> object:
    """``state`` with every ``DTensor`` (at any depth of dicts, lists, tuples) made full."""
    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, Mapping):
        return type(state)((key, gathered(value)) for key, value in state.items())  # type: ignore[call-arg]  # Mapping types built from pairs (dict, OrderedDict)
    if isinstance(state, list | tuple):
        return type(state)(gathered(value) for value in state)
    return state


def _shard(value: object, like: object) -> object:
    if isinstance(like, DTensor) and isinstance(value, torch.Tensor):
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)
    return value


def sharded_as(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) sharded as ``like`` is, or moved to its device if it is plain.

    For a ``DTensor`` ``like`` this is a collective: every process calls it, in the same order.
    """
    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)
    return value.to(like.device)


def sharded_like(loaded: dict[str, Any], current: Mapping[str, object]) -> dict[str, Any]:
    """A module's loaded full state, each tensor sharded as the module's own entry is.

    ``Any``: the values are what ``torch.load`` returned, handed on to ``load_state_dict``.
    """
    return {key: _shard(value, current.get(key)) for key, value in loaded.items()}


def sharded_for_optimizer(
    loaded: dict[str, Any], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """An optimizer's loaded full state, per-parameter tensors sharded as their parameter is.

    The optimizer's state dict numbers the parameters in the order of its parameter groups; a
    state tensor with its parameter's full shape (Adam's moments, say) is sharded like the
    parameter, anything else (a step count) is left as it is.
    """
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    if not any(isinstance(parameter, DTensor) for parameter in parameters):
        return loaded
    state = loaded.get("state")
    if not isinstance(state, Mapping):
        return loaded
    resharded: dict[object, object] = {}
    for index, entry in state.items():
        parameter = (
            parameters[index] if isinstance(index, int) and index < len(parameters) else None
        )
        if not isinstance(entry, Mapping) or not isinstance(parameter, DTensor):
            resharded[index] = entry
            continue
        resharded[index] = {
            key: _shard(value, parameter)
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape
            else value
            for key, value in entry.items()
        }
    return {**loaded, "state": resharded}

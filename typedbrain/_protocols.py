"""The small interfaces a brain consumes: stateful objects, optimizer factories, checkpointers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch
from torch.optim.optimizer import ParamsT

__all__ = ["CheckpointInfo", "CheckpointerLike", "OptimizerFactory", "Stateful"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict``.

    Modules, optimizers, LR schedulers, grad scalers, epoch counters and your own objects all
    qualify. A checkpointer saves such an object with no registration of hooks.
    """

    def state_dict(self) -> Mapping[str, object]:
        """The object's state as a mapping of plain data and tensors.

        A checkpointer saves a mapping that is not a dict (a ``MappingProxyType``, say) as the
        dict of its items; ``load_state_dict`` gets a dict back.
        """
        ...

    # ``Any``: torch's own ``load_state_dict`` methods take ``dict[str, Any]``; a protocol asking
    # for less would exclude them.
    def load_state_dict(self, state_dict: dict[str, Any], /) -> object:
        """Restore the state that ``state_dict`` returned."""
        ...


OptimizerFactory: TypeAlias = Callable[[ParamsT], torch.optim.Optimizer]
"""What ``opt_class`` is: called with the parameters (or parameter groups) to optimize.

``lambda params: torch.optim.SGD(params, lr=0.1)``, ``functools.partial(torch.optim.Adam,
lr=1e-3)`` and HyperPyYAML's ``!name:torch.optim.Adam`` all fit.
"""


class CheckpointInfo(Protocol):
    """What a checkpoint predicate may look at: the checkpoint's meta."""

    @property
    def meta(self) -> Mapping[str, object]:
        """The meta the checkpoint was saved with."""
        ...


class CheckpointerLike(Protocol):
    """What a brain needs from a checkpointer; :class:`~typedbrain.Checkpointer` is one.

    The brain registers what it owns (its run state, the grad scaler, the optimizers) with
    ``add_recoverable``, restores the newest checkpoint in ``on_fit_start`` and the best one by
    ``max_key`` / ``min_key`` in ``on_evaluate_start``, and saves intra-epoch checkpoints with
    ``save_and_keep_only``.
    """

    def add_recoverable(self, name: str, obj: Stateful) -> None:
        """Save and restore ``obj`` under ``name`` with every checkpoint."""
        ...

    def recover_if_possible(
        self,
        *,
        max_key: str | None = None,
        min_key: str | None = None,
        device: torch.device | str | None = None,
    ) -> object:
        """Load the chosen checkpoint into the recoverables if there is one; return it or None."""
        ...

    def save_and_keep_only(
        self,
        *,
        meta: Mapping[str, object] | None = None,
        end_of_epoch: bool = True,
        num_to_keep: int = 1,
        ckpt_predicate: Callable[[CheckpointInfo], bool] | None = None,
    ) -> object:
        """Save a checkpoint, then delete the old ones beyond the ``num_to_keep`` most recent.

        Only checkpoints that ``ckpt_predicate`` accepts are candidates for deletion.
        """
        ...

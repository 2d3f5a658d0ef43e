"""The brain's run state as a checkpoint entry: every process's snapshot and partial gradients.

The brain registers a :class:`RunStateRecoverable` under the name ``"brain"``. Saving asks the
brain for a :class:`RunRecord` (its :class:`RunState` and, mid-accumulation, the gradients of
the batches since the last optimizer step) and stores one per process, as plain data and
tensors so that ``torch.load(weights_only=True)`` reads it. Loading checks the entry's shape,
takes this process's record and hands it back to the brain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import attrs
import torch.distributed as dist
from torch import Tensor

from typedbrain._distributed import is_distributed
from typedbrain._errors import CheckpointError
from typedbrain._state import RunState, converter, structure_state

__all__ = ["RunRecord", "RunStateRecoverable"]

_SOURCE = "the brain's run state"


@attrs.frozen
class RunRecord:
    """One process's run state and the gradients held when it was saved (often none)."""

    state: RunState
    gradients: list[Tensor | None]
    saved_by: int = 1
    """How many processes saved the checkpoint it was loaded from (one record each)."""

    def layout_warning(self, world_size: int, rank: int) -> str | None:
        """Why a run of ``world_size`` processes cannot continue exactly from this record.

        ``None`` when the checkpoint was saved by as many processes. Only continuing a run
        (``fit``) is affected: evaluating the weights of a checkpoint saved by any number of
        processes is exact.
        """
        if self.saved_by == world_size:
            return None
        return (
            f"the checkpoint was saved by {self.saved_by} processes and this run has "
            f"{world_size}: each process takes the saved state of rank "
            f"{min(rank, self.saved_by - 1)}, and the run will not continue exactly as the "
            "interrupted one would have"
        )


class RunStateRecoverable:
    """A recoverable that saves what ``take`` returns and gives what it loads to ``give``.

    Its state dict is ``{"ranks": [entry, ...]}``, one entry per process (one without
    torch.distributed), each ``{"state": <RunState as plain data>, "gradients": [...]}``.

    Args:
        take: Called on save: this process's record now.
        give: Called on load with this process's saved record.
    """

    def __init__(self, take: Callable[[], RunRecord], give: Callable[[RunRecord], None]) -> None:
        self._take = take
        self._give = give

    def state_dict(self) -> dict[str, object]:
        """This process's record; under a process group, every rank's (a collective)."""
        record = self._take()
        own: dict[str, object] = {
            "state": converter.unstructure(record.state),
            "gradients": record.gradients,
        }
        ranks: list[object] = [own]
        if is_distributed():
            # Each rank's generators, partial gradients and counters differ: keep them all.
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, own)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: Mapping[str, object], /) -> None:
        """Give this rank's saved record to the brain; see :meth:`state_dict`.

        Raises:
            CheckpointError: The entry is not shaped as :meth:`state_dict` writes it.
        """
        ranks = state_dict.get("ranks")
        if set(state_dict) != {"ranks"} or not isinstance(ranks, list) or not ranks:
            raise CheckpointError(
                f"{_SOURCE} should hold a non-empty 'ranks' list, found keys {sorted(state_dict)}"
            )
        rank = dist.get_rank() if is_distributed() else 0
        # Another number of processes is warned about when fit continues from the record
        # (RunRecord.layout_warning), not here: evaluating the checkpoint is not affected.
        own = ranks[min(rank, len(ranks) - 1)]
        if not isinstance(own, Mapping) or set(own) != {"state", "gradients"}:
            raise CheckpointError(f"{_SOURCE}: a rank's entry should hold 'state' and 'gradients'")
        state = structure_state(own["state"], RunState, source=_SOURCE)
        gradients = own["gradients"]
        if not isinstance(gradients, list) or not all(
            gradient is None or isinstance(gradient, Tensor) for gradient in gradients
        ):
            raise CheckpointError(f"{_SOURCE}: 'gradients' should be a list of tensors")
        self._give(RunRecord(state, cast(list[Tensor | None], gradients), saved_by=len(ranks)))

"""Every process of a distributed run stops after the same training batch, whichever got the signal.

A job scheduler's SIGTERM reaches each process at a different point of its loop, or reaches only
some of them. A process that stopped on its own would enter the collective checkpoint save while
the others enter the next batch's gradient all-reduce, and the job would hang. Instead, after
each training batch, every process shares whether it has been asked to stop, and all act on the
same answer after the same batch. Time-based intra-epoch checkpoints (``ckpt_interval_minutes``)
need the same: each process's clock says "due" after a different batch, so the processes share
that too, in the same exchange.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, Work

from typedbrain._errors import DistributedError
from typedbrain._signals import StopRequest

__all__ = ["Agreed", "StopAgreement", "control_group"]


def control_group() -> ProcessGroup:
    """A gloo group of every process, for small exchanges off the training device.

    The default group when it is gloo already (no new connections to set up and tear down),
    else a new gloo group. Collective: every process calls it at the same point (when ``fit``
    starts).
    """
    if dist.get_backend() == "gloo":
        world: ProcessGroup | None = dist.group.WORLD
        assert world is not None  # there is a default group: the caller checked
        return world
    group = dist.new_group(backend="gloo")
    # Every process is in the group, so it is a ProcessGroup here (processes outside a new
    # group get a marker instead: None or GroupMember.NON_GROUP_MEMBER, by torch version).
    if not isinstance(group, ProcessGroup):
        raise DistributedError(
            f"returned {group!r}, not a process group",
            rank=dist.get_rank(),
            operation="new_group(backend='gloo')",
        )
    return group


class Agreed(NamedTuple):
    """What every process acts on after a batch."""

    signal: int | None
    """The signal to stop on, or ``None``."""
    save: bool
    """Whether a time-based checkpoint is due (some process's clock said so)."""


NOTHING: Final = Agreed(signal=None, save=False)


class StopAgreement:
    """Tells every process, batch by batch, whether any of them has been asked to stop.

    After each training batch each process sends its own request (the signal's number, or 0) to
    an all-reduce (maximum) that it does not wait for, and reads the result of the exchange
    started after the previous batch, which has arrived by then. Every process runs the same
    batches, so all read the same answer after the same batch: they stop together, one batch
    after the first of them got the signal. The exchange runs on a gloo group, so it
    does not synchronise with the training device (a gloo group of its own when the run's
    group is not gloo; gloo matches collectives by their order, so sharing a gloo group with
    the run's own collectives is safe: every process starts them in the same order).
    """

    def __init__(self, request: StopRequest, group: ProcessGroup) -> None:
        self._request = request
        self._group = group
        self._in_flight: tuple[Work, torch.Tensor] | None = None

    def after_batch(self, *, save_due: bool = False) -> Agreed:
        """Share this process's request and clock; what every process acts on now.

        ``save_due``: this process's clock says a time-based checkpoint is due. The answer is
        the exchange started after the previous batch. When it says to stop, no exchange is
        left in flight.
        """
        previous = self._in_flight
        self._in_flight = self._start(save_due)
        if previous is None:
            return NOTHING
        agreed = _result(previous)
        if agreed.signal is not None:
            self.settle()
        return agreed

    def settle(self) -> Agreed:
        """Wait for the exchange in flight, if any; what it agreed on."""
        in_flight, self._in_flight = self._in_flight, None
        return NOTHING if in_flight is None else _result(in_flight)

    def now(self) -> int | None:
        """Exchange the requests once more and wait: the agreed signal, or ``None``."""
        self.settle()
        self._in_flight = self._start(save_due=False)
        return self.settle().signal

    def _start(self, save_due: bool) -> tuple[Work, torch.Tensor]:
        flags = torch.tensor([self._request.signal or 0, int(save_due)], dtype=torch.int64)
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        assert work is not None  # async_op=True always returns the request
        return work, flags


def _result(exchange: tuple[Work, torch.Tensor]) -> Agreed:
    work, flags = exchange
    work.wait()
    signum, save = flags.tolist()
    return Agreed(signal=int(signum) or None, save=bool(save))

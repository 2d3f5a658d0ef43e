"""Which process this is, running work on the main process only, and safe collectives.

Every helper works without a process group too (a single process is rank 0 of 1), so the same
script runs with ``python`` and with ``torchrun``.

Two kinds of helpers:

* **Local** ones never talk to other processes and may be called by any subset of ranks:
  :func:`is_distributed`, :func:`get_rank`, :func:`get_world_size`, :func:`if_main_process`,
  :func:`main_process_only`.
* **Collective** ones must be called by every rank, in the same order:
  :func:`barrier`, :func:`run_on_main`, :func:`broadcast_object`, :func:`all_gather_object`,
  :func:`all_reduce_sum`, :func:`all_reduce_mean`. A rank that skips one leaves the others
  waiting until the process group's timeout.

None of the collective helpers hangs forever when a peer fails: a failure of the collective
itself (the peer died, or did not answer within the timeout) is raised as
:class:`~typedbrain.DistributedError`, and :func:`run_on_main` tells every rank when the
function it ran raised.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from typedbrain._errors import ConfigurationError, DistributedError
from typedbrain._launch import detect_launch

__all__ = [
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "get_rank",
    "get_world_size",
    "if_main_process",
    "is_distributed",
    "main_process_only",
    "mean_over_processes",
    "run_on_main",
    "seed_from_main",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank: from the process group, else ``$RANK``, else 0."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """How many processes the process group has; 1 without a group."""
    if is_distributed():
        return dist.get_world_size()
    return 1


def if_main_process() -> bool:
    """Whether this is the main process (rank 0), the one that writes files and shows bars."""
    return get_rank() == 0


def main_process_only(func: Callable[P, R]) -> Callable[P, R | None]:
    """Decorate a function so that it runs on the main process only.

    The decorated function returns ``func``'s result on rank 0 and ``None`` on every other
    rank, without running it there. It is local, not collective: nothing is sent between
    processes, so it may be called from code that only some ranks reach (logging, writing a
    file) and it cannot deadlock. When every rank needs the result, call the function on every
    rank through :func:`broadcast_object` instead::

        @main_process_only
        def read_vocabulary() -> list[str]: ...


        vocabulary = broadcast_object(read_vocabulary())

    Args:
        func: the function to run on the main process.

    Returns:
        The wrapped function.
    """

    @functools.wraps(func)
    def on_main(*args: P.args, **kwargs: P.kwargs) -> R | None:
        if not if_main_process():
            return None
        return func(*args, **kwargs)

    return on_main


def _timedelta(timeout: datetime.timedelta | float) -> datetime.timedelta:
    delta = (
        timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=timeout)
    )
    if delta.total_seconds() <= 0:
        raise ConfigurationError(f"barrier timeout must be positive, got {timeout!r}")
    return delta


@contextlib.contextmanager
def _collective(operation: str) -> Iterator[None]:
    """Turn a failed collective into a :class:`DistributedError` naming the rank and operation."""
    try:
        yield
    except RuntimeError as error:  # torch's DistError, DistBackendError, gloo's errors
        if isinstance(error, DistributedError):
            raise
        raise DistributedError(
            f"the collective failed: {error} (a peer process that died or stopped answering "
            "makes collectives fail or time out: see the other ranks' output)",
            rank=get_rank(),
            operation=operation,
        ) from error


def _without_group(operation: str) -> bool:
    """Whether ``operation`` runs without a process group: this process is the whole run.

    Raises:
        ConfigurationError: a launcher started this process as one of several, but the process
            group is not up yet: alone, it would not wait for (or hear from) the others.
    """
    if is_distributed():
        return False
    launch = detect_launch()
    if launch is not None:
        raise ConfigurationError(
            f"{operation} was called on rank {launch.rank} of {launch.world_size} before the "
            "process group is up, so it could not wait for the other processes: call "
            "typedbrain.init_distributed() first (a Brain calls it when it is built)"
        )
    return True


def barrier(timeout: datetime.timedelta | float | None = None) -> None:
    """Wait until every process of the group reaches this point. Collective.

    Does nothing without a process group.

    Args:
        timeout: how long to wait for the others, as a ``timedelta`` or in seconds; ``None``
            means the process group's timeout (see :func:`~typedbrain.init_distributed`).

    Raises:
        ConfigurationError: started by a launcher as one of several processes, before the
            process group is up (see :func:`~typedbrain.init_distributed`).
        DistributedError: a peer died or did not arrive within the timeout.
    """
    if _without_group("barrier"):
        return
    delta = None if timeout is None else _timedelta(timeout)
    with _collective("barrier"):
        if delta is None:
            dist.barrier()
        elif _barrier_takes_timeout():
            dist.barrier(timeout=delta)
        elif dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=delta)
        else:
            request = dist.barrier(async_op=True)
            assert request is not None  # async_op=True always returns the request
            request.wait(timeout=delta)


@functools.cache
def _barrier_takes_timeout() -> bool:
    """Whether this torch's ``dist.barrier`` takes a timeout (recent releases only)."""
    return "timeout" in inspect.signature(dist.barrier).parameters


def broadcast_object(obj: T, src: int = 0) -> T:
    """Send ``src``'s ``obj`` to every process; each one returns ``src``'s object. Collective.

    The object travels pickled: any picklable value works, and the other ranks' ``obj`` is
    ignored (pass ``None`` or a placeholder of the same type there). Without a process group
    it returns ``obj``.

    Args:
        obj: the object to send (used on rank ``src`` only).
        src: the rank that sends.

    Returns:
        Rank ``src``'s object, on every rank.

    Raises:
        ConfigurationError: started by a launcher as one of several processes, before the
            process group is up (see :func:`~typedbrain.init_distributed`).
        ConfigurationError: ``src`` is not a rank of the group.
        DistributedError: a peer died or did not answer within the group's timeout.
    """
    if _without_group("broadcast_object"):
        if src != 0:
            raise ConfigurationError(f"broadcast source rank {src} is not 0 (single process)")
        return obj
    world_size = dist.get_world_size()
    if not 0 <= src < world_size:
        raise ConfigurationError(
            f"broadcast source rank {src} is not a rank of the group (0 to {world_size - 1})"
        )
    return _broadcast(obj, src, operation=f"broadcast_object(src={src})")


def _broadcast(obj: T, src: int, *, operation: str) -> T:
    box: list[object] = [obj]
    with _collective(operation):
        dist.broadcast_object_list(box, src=src)
    # The object is src's obj, of type T, sent through pickle.
    return box[0]  # type: ignore[return-value]  # broadcast_object_list is typed list[Any]


def all_gather_object(obj: T) -> list[T]:
    """Collect every process's ``obj``, in rank order, on every process. Collective.

    The objects travel pickled. Without a process group it returns ``[obj]``.

    Args:
        obj: this process's contribution.

    Returns:
        One object per rank: element ``i`` is rank ``i``'s ``obj``.

    Raises:
        ConfigurationError: started by a launcher as one of several processes, before the
            process group is up (see :func:`~typedbrain.init_distributed`).
        DistributedError: a peer died or did not answer within the group's timeout.
    """
    if _without_group("all_gather_object"):
        return [obj]
    return _all_gather(obj, operation="all_gather_object")


def _all_gather(obj: T, *, operation: str) -> list[T]:
    gathered: list[T | None] = [None] * dist.get_world_size()
    with _collective(operation):
        dist.all_gather_object(gathered, obj)
    # Every slot was filled with a rank's obj (of type T) by the collective.
    return gathered  # type: ignore[return-value]  # the Nones are all replaced by now


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Return the element-wise sum of ``tensor`` over every process. Collective.

    ``tensor`` is left unchanged: the sum is a new tensor, detached from autograd, on
    ``tensor``'s device. Every rank must pass a tensor of the same shape and dtype. A bool
    tensor is counted: its sum is an ``int64`` tensor of how many processes hold ``True``
    (the backends would otherwise OR the flags). A CPU tensor under ``nccl`` (which reduces
    CUDA tensors only) travels through this process's current CUDA device. Without a process
    group it returns a copy (a bool tensor as ``int64`` 0s and 1s: the count over one process).

    Args:
        tensor: this process's values.

    Returns:
        The sum over ranks, same shape and device as ``tensor``; same dtype too, except that
        a bool tensor gives ``int64`` counts.

    Raises:
        ConfigurationError: started by a launcher as one of several processes, before the
            process group is up (see :func:`~typedbrain.init_distributed`).
        DistributedError: a peer died or did not answer within the group's timeout.
    """
    # Count the Trues: the backends' SUM of bool tensors is an OR.
    dtype = torch.int64 if tensor.dtype == torch.bool else tensor.dtype
    if _without_group("all_reduce_sum"):
        return tensor.detach().to(dtype, copy=True)
    device = _reduction_device(tensor.device, dist.get_backend())
    total = tensor.detach().to(device, dtype, copy=True)
    with _collective("all_reduce_sum"):
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def _reduction_device(device: torch.device, backend: str) -> torch.device:
    """Where a tensor on ``device`` is reduced under ``backend``: where it is, but on CUDA for nccl.

    ``nccl`` alone reduces CUDA tensors only; ``"cpu:gloo,cuda:nccl"`` takes both.
    """
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def mean_over_processes(mean: float, count: int) -> float:
    """The mean of every process's values, from each process's mean of ``count`` values.

    Collective. Without a process group it returns ``mean``. A process with no values
    (``count == 0``) adds nothing; when no process has any, the result is 0.

    Raises:
        ConfigurationError: started by a launcher as one of several processes, before the
            process group is up (see :func:`~typedbrain.init_distributed`).
        DistributedError: a peer died or did not answer within the group's timeout.
    """
    if _without_group("mean_over_processes"):
        return mean
    totals = all_reduce_sum(torch.tensor([mean * count, float(count)], dtype=torch.float64))
    total, counted = totals.tolist()
    return float(total / counted) if counted else 0.0


def seed_from_main() -> int:
    """A seed drawn from the main process's torch RNG and shared with every process.

    Collective under a process group (every process draws, the main process's draw wins);
    without one, simply a draw from this process's torch RNG.
    """
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return broadcast_object(seed, src=0)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Return the element-wise mean of ``tensor`` over every process. Collective.

    As :func:`all_reduce_sum`, divided by the number of processes; an integer tensor gives a
    floating-point mean, and a bool tensor the fraction of processes that hold ``True``.

    Args:
        tensor: this process's values.

    Returns:
        The mean over ranks, same shape and device as ``tensor``.

    Raises:
        DistributedError: a peer died or did not answer within the group's timeout.
    """
    return torch.div(all_reduce_sum(tensor), get_world_size())


def _name(func: Callable[..., object]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def run_on_main(
    func: Callable[..., object],
    args: Sequence[object] | None = None,
    kwargs: Mapping[str, object] | None = None,
    post_func: Callable[..., object] | None = None,
    post_args: Sequence[object] | None = None,
    post_kwargs: Mapping[str, object] | None = None,
    run_post_on_main: bool = False,
) -> None:
    """Run ``func`` on the main process, then ``post_func`` on the others. Collective.

    The usual use is preparing data once (download, manifest) and then loading it everywhere::

        run_on_main(prepare_data, kwargs={"folder": folder})

    The other ranks wait until ``func`` has finished on the main process. If it raises, the
    main process re-raises its error and every other rank raises
    :class:`~typedbrain.DistributedError` naming ``func`` and the error, so no rank is left
    waiting. The same holds for ``post_func``: the rank whose ``post_func`` raised re-raises its
    error, the others raise :class:`~typedbrain.DistributedError` naming that rank.

    The others wait for ``func`` no longer than the process group's timeout (30 minutes by
    default): a longer preparation needs a longer timeout in
    :func:`~typedbrain.init_distributed`.

    Args:
        func: run on the main process only.
        args: positional arguments of ``func``.
        kwargs: keyword arguments of ``func``.
        post_func: run after ``func`` on the other processes (and on the main one as well when
            ``run_post_on_main`` is true); every rank then waits for every other.
        post_args: positional arguments of ``post_func``.
        post_kwargs: keyword arguments of ``post_func``.
        run_post_on_main: also run ``post_func`` on the main process.

    Raises:
        ConfigurationError: started by a launcher as one of several processes, before the
            process group is up (see :func:`~typedbrain.init_distributed`).
        DistributedError: on a rank other than the one that failed, when ``func`` or
            ``post_func`` raised there, or when a peer died or did not answer in time.
    """
    # Refused before func runs anywhere when the other processes could not be waited for.
    _without_group(f"run_on_main({_name(func)})")
    main = if_main_process()
    failure: BaseException | None = None
    if main:
        try:
            func(*(args or ()), **(kwargs or {}))
        except BaseException as error:  # reported to the other ranks, then re-raised
            failure = error
    _share_outcome(failure, _name(func), from_main_only=True)
    if post_func is None:
        return
    if run_post_on_main or not main:
        try:
            post_func(*(post_args or ()), **(post_kwargs or {}))
        except BaseException as error:  # reported to the other ranks, then re-raised
            failure = error
    _share_outcome(failure, _name(post_func), from_main_only=False)


def _share_outcome(failure: BaseException | None, name: str, *, from_main_only: bool) -> None:
    """Tell every rank whether ``name`` failed somewhere; re-raise our own error or report one.

    Every rank calls it once its part of the work is done, so it is also the barrier after the
    work. With ``from_main_only`` only rank 0's outcome is sent (a broadcast); otherwise every
    rank's (an all-gather).
    """
    operation = f"run_on_main({name})"
    if _without_group(operation):
        if failure is not None:
            raise failure
        return
    report = None if failure is None else _describe(failure)
    reports: list[str | None] = []
    try:
        if from_main_only:
            reports.append(_broadcast(report, 0, operation=operation))
        else:
            reports.extend(_all_gather(report, operation=operation))
    except DistributedError as error:
        if failure is None:
            raise
        # Our own error is the one to show; the peers may have stopped because of it.
        logger.warning("could not tell the other ranks that %s failed: %s", name, error)
    if failure is not None:
        raise failure
    rank = get_rank()
    for peer, text in enumerate(reports):
        if text is not None:
            who = "the main process" if from_main_only or peer == 0 else f"rank {peer}"
            raise DistributedError(
                f"{who} failed in {name}: {text}", rank=rank, operation=operation
            )

"""Finding out how ``torchrun`` started this process, and setting up the process group.

``torchrun`` (``python -m torch.distributed.run``) starts one process per device and tells each
which one it is through environment variables. :func:`detect_launch` reads them,
:func:`init_distributed` sets up the default ``torch.distributed`` process group from them, and
:func:`device_for` names the device the process should use. Nothing happens at import.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Final, final

import attrs
import torch
import torch.distributed as dist

from typedbrain._errors import ConfigurationError

__all__ = [
    "DEFAULT_TIMEOUT",
    "LaunchInfo",
    "detect_launch",
    "device_for",
    "init_distributed",
    "select_backend",
    "shutdown_distributed",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = datetime.timedelta(minutes=30)
"""How long a collective waits for its peers before failing: torch's own default."""

_MAX_PORT: Final = 65535


@final
@attrs.frozen(kw_only=True)
class LaunchInfo:
    """Where this process sits in a distributed run, as the launcher described it.

    Attributes:
        rank: the global rank, ``0 <= rank < world_size``; rank 0 is the main process.
        local_rank: the rank among the processes of this machine; it picks the GPU.
        world_size: how many processes the run has, on every machine together (at least 2).
        master_addr: the address of the machine that hosts rank 0's rendezvous store.
        master_port: the port of that store.

    For a process group the script set up itself without these variables,
    :func:`init_distributed` describes it with ``local_rank`` equal to ``rank`` (unless
    ``LOCAL_RANK`` is set), ``master_addr`` ``""`` and ``master_port`` 0 when unknown.
    """

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and logs."""
        return self.rank == 0


def _integer(environ: Mapping[str, str], name: str, *, low: int, high: int | None) -> int:
    if name not in environ:
        raise ConfigurationError(
            f"environment variable {name} is not set, but WORLD_SIZE is: start the script with "
            "torchrun, which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    text = environ[name]
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigurationError(
            f"environment variable {name}={text!r} is not an integer"
        ) from None
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ConfigurationError(f"environment variable {name}={value} must be {bounds}")
    return value


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """Read how ``torchrun`` launched this process from its environment variables.

    A process belongs to a distributed run when ``WORLD_SIZE`` is set and greater than 1. A
    single process (``WORLD_SIZE`` unset, or ``torchrun --nproc_per_node 1``, which sets it to 1)
    gets ``None``: it trains without a process group, as a plain ``python script.py`` does.

    Args:
        environ: the variables to read; ``os.environ`` when ``None``.

    Returns:
        The launch description, or ``None`` for a single process.

    Raises:
        ConfigurationError: a variable is missing or malformed (``RANK`` not an integer, not
            below ``WORLD_SIZE``, ``MASTER_PORT`` not a port...); the message names it.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    world_size = _integer(env, "WORLD_SIZE", low=1, high=None)
    if world_size == 1:
        return None
    rank = _integer(env, "RANK", low=0, high=world_size - 1)
    local_rank = _integer(env, "LOCAL_RANK", low=0, high=world_size - 1)
    master_addr = env.get("MASTER_ADDR", "").strip()
    if not master_addr:
        raise ConfigurationError(
            "environment variable MASTER_ADDR is not set or empty, but WORLD_SIZE is: it must "
            "name the machine that runs rank 0 (torchrun sets it)"
        )
    master_port = _integer(env, "MASTER_PORT", low=1, high=_MAX_PORT)
    return LaunchInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        master_addr=master_addr,
        master_port=master_port,
    )


def device_for(launch: LaunchInfo | None) -> str:
    """The device a process should compute on: ``cuda:<local_rank>`` with CUDA, else ``cpu``.

    Args:
        launch: this process's launch description; ``None`` (a single process) means local
            rank 0.

    Returns:
        A device string such as ``"cuda:1"`` or ``"cpu"``.

    Raises:
        ConfigurationError: CUDA is available but this machine has fewer GPUs than processes
            (``LOCAL_RANK`` is not below the number of visible devices).
    """
    if not torch.cuda.is_available():
        return "cpu"
    local_rank = 0 if launch is None else launch.local_rank
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigurationError(
            f"environment variable LOCAL_RANK={local_rank}, but only {count} CUDA device(s) "
            "are visible: start at most one process per GPU (torchrun --nproc_per_node)"
        )
    return f"cuda:{local_rank}"


def select_backend(requested: str | None, device: str) -> str:
    """Choose the ``torch.distributed`` backend for a process computing on ``device``.

    ``nccl`` needs CUDA, ``gloo`` works everywhere. SpeechBrain's run option
    ``distributed_backend`` defaults to ``nccl``, so a CPU run asking for ``nccl`` gets ``gloo``
    instead (logged at INFO) rather than an error: the same command line works with and without
    GPUs.

    Args:
        requested: the backend asked for (``"nccl"``, ``"gloo"``, ``"mpi"`` or any backend
            torch knows, such as ``"cpu:gloo,cuda:nccl"``); ``None`` picks ``nccl`` for a CUDA
            device and ``gloo`` otherwise.
        device: the device this process computes on (``"cuda:0"``, ``"cpu"``).

    Returns:
        The backend name to give ``torch.distributed.init_process_group``.

    Raises:
        ConfigurationError: the requested backend is not built into this torch (``mpi``
            without MPI, ``gloo`` without gloo).
    """
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    nccl_usable = on_cuda and dist.is_nccl_available()
    if requested is None:
        return "nccl" if nccl_usable else "gloo"
    if requested == "nccl" and not nccl_usable:
        logger.info(
            "distributed backend nccl needs a CUDA device and this process runs on %s: "
            "using gloo instead",
            device,
        )
        return "gloo"
    available = {"gloo": dist.is_gloo_available, "mpi": dist.is_mpi_available}
    if requested in available and not available[requested]():
        raise ConfigurationError(
            f"distributed backend {requested!r} is not available in this build of torch; "
            "use 'gloo' (CPU) or 'nccl' (CUDA)"
        )
    return requested


def _as_timedelta(timeout: datetime.timedelta | float) -> datetime.timedelta:
    delta = (
        timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=timeout)
    )
    if delta.total_seconds() <= 0:
        raise ConfigurationError(f"distributed timeout must be positive, got {timeout!r}")
    return delta


def _from_existing_group() -> LaunchInfo:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    launch = detect_launch()
    if launch is not None and (launch.rank, launch.world_size) == (rank, world_size):
        return launch
    # The group was set up by the caller, not from torchrun's variables: describe it as well
    # as the environment allows (an unknown rendezvous is "" and port 0).
    return LaunchInfo(
        rank=rank,
        local_rank=_int_or(os.environ.get("LOCAL_RANK"), rank),
        world_size=world_size,
        master_addr=os.environ.get("MASTER_ADDR", ""),
        master_port=_int_or(os.environ.get("MASTER_PORT"), 0),
    )


def _int_or(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def init_distributed(
    backend: str | None = None,
    timeout: datetime.timedelta | float = DEFAULT_TIMEOUT,
    device: str | None = None,
) -> LaunchInfo | None:
    """Set up the default process group when ``torchrun`` launched this process.

    Call it once at the start of a script, on every process. Without a launcher (see
    :func:`detect_launch`) it does nothing and returns ``None``. When the default group is
    already up (a second call, or a group the caller made), it leaves it as it is and
    describes it.

    On a CUDA device it also makes that device current (``torch.cuda.set_device``), which
    ``nccl`` needs before its first collective. The group it creates is destroyed when the
    interpreter exits (an :mod:`atexit` hook calling :func:`shutdown_distributed`), so that a
    process stopping on an error exits with its own status rather than aborting in torch's
    teardown.

    Args:
        backend: the backend asked for; see :func:`select_backend` (``nccl`` on a CPU process
            becomes ``gloo``).
        timeout: how long any collective waits for its peers before failing, as a
            ``timedelta`` or in seconds. A peer that died is usually noticed at once (its
            connection closes); a peer that hangs is noticed after this long.
        device: the device this process computes on; ``None`` means :func:`device_for`.

    Returns:
        This process's launch description, or ``None`` for a single process.

    Raises:
        ConfigurationError: a launcher variable is malformed, the timeout is not positive or
            the backend is not available.
    """
    delta = _as_timedelta(timeout)
    if not dist.is_available():
        if detect_launch() is not None:
            raise ConfigurationError(
                "WORLD_SIZE asks for a distributed run, but this build of torch has no "
                "torch.distributed"
            )
        return None
    if dist.is_initialized():
        logger.debug("the default process group is already initialised: leaving it as it is")
        return _from_existing_group()
    launch = detect_launch()
    if launch is None:
        return None
    where = device if device is not None else device_for(launch)
    if where == "cuda":
        where = f"cuda:{launch.local_rank}"
    chosen = select_backend(backend, where)
    device_id: torch.device | None = None
    if torch.device(where).type == "cuda":
        device_id = torch.device(where)
        torch.cuda.set_device(device_id)
    logger.info(
        "joining process group: rank %d of %d (local rank %d), backend %s, rendezvous %s:%d",
        launch.rank,
        launch.world_size,
        launch.local_rank,
        chosen,
        launch.master_addr,
        launch.master_port,
    )
    dist.init_process_group(
        backend=chosen,
        init_method="env://",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=delta,
        device_id=device_id if chosen == "nccl" else None,
    )
    # A process that exits with its group still up can abort in torch's teardown (seen with
    # gloo after a peer died): destroy the group first. Re-registering keeps a single hook.
    atexit.unregister(_shutdown_at_exit)
    atexit.register(_shutdown_at_exit)
    return launch


_SHUTDOWN_WAIT: Final = datetime.timedelta(seconds=10)
_THREADS_GRACE: Final = datetime.timedelta(milliseconds=100)
"""How long a shutdown leaves the GIL to the backend's threads after destroying the group.

A gloo worker thread lets go of a finished collective's tensors after the caller's wait has
returned; when that is the last reference to a tensor made in Python (torch's object
collectives make such tensors and drop them at once), freeing it takes the GIL. A thread that
asks for the GIL after the interpreter began to finalize is ended on the spot, and ending it
inside that destructor aborts the process ("terminate called without an active exception",
exit status 134) after a run that succeeded: seen in 7 of 177 two-process jobs of a one-epoch
recipe on a 2-core machine (core dumps: the thread in ``AsyncAllreduceWork``'s or
``AsyncAllgatherWork``'s destructor, in ``take_gil``). With this pause, none in 200.
"""


def shutdown_distributed() -> None:
    """Destroy the default process group; does nothing when there is none.

    Call it at the end of a distributed script, on every process, so that torch does not warn
    about a group left behind (``init_distributed`` registers it to run at exit). With gloo,
    the processes first wait for each other (at most 10 seconds): a process that tore its
    connections down while a peer still used them could make gloo abort that peer. Called
    while an error propagates (from a ``finally:``), it does not wait: see
    :func:`_shutdown_at_exit`. Once the group is destroyed it pauses 0.1 s, leaving the GIL to
    the backend's threads (see :data:`_THREADS_GRACE`).
    """
    _shutdown(wait=not _error_in_flight())


def _shutdown_at_exit() -> None:
    """:func:`shutdown_distributed` at interpreter exit, without the wait on an uncaught error.

    A process ending on an error must not wait for the others: they may be blocked in a
    collective it will never join (DDP's all-reduce in backward, when it raised in a forward
    pass), and gloo's wait takes the group's whole timeout (30 minutes by default) on every
    process but rank 0. Leaving at once closes its connections, so the others' collective fails
    at once and ``torchrun`` stops the job. (Python keeps an uncaught error in
    ``sys.last_value`` while the exit hooks run; an exit with ``SystemExit``, such as a
    preempted run's ``TrainingInterruptedError``, sets none, and waits as every process stops.)
    """
    _shutdown(wait=getattr(sys, "last_value", None) is None and not _error_in_flight())


def _error_in_flight() -> bool:
    """Whether an error (not an exit: ``SystemExit`` waits) is propagating through the caller."""
    error = sys.exc_info()[1]
    return error is not None and not isinstance(error, SystemExit)


def _shutdown(*, wait: bool) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait and dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        try:
            dist.monitored_barrier(timeout=_SHUTDOWN_WAIT)
        except RuntimeError as error:  # a peer is gone already: nothing left to wait for
            logger.debug("leaving without the other processes: %s", error)
    dist.destroy_process_group()
    # Let the backend's threads finish with what they still hold: the group can outlive this
    # call (torch keeps it once a DDP wrapper was built), and a gloo thread freeing a finished
    # collective's tensors needs the GIL, which it cannot take once the interpreter ends (the
    # process then aborts). See _THREADS_GRACE.
    time.sleep(_THREADS_GRACE.total_seconds())

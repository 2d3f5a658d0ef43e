"""Loader worker processes: how they are seeded, how they take stop signals, and how they end.

``make_dataloader`` runs :class:`_WorkerInit` in each worker: :func:`seed_worker`, then a SIGTERM
and SIGINT handler that leaves stopping to the main process. The main process marks its exit in
shared memory (``_exit_flag``), so that the SIGTERM ``multiprocessing`` sends its workers as it
exits ends them, and keeps such an exit clean (:class:`_ChildEndsAtExit`). A failed ``fit`` lets
go of the iterators its error holds (:func:`release_loader_frames`). See ``docs/data-order.md``.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import multiprocessing.process
import multiprocessing.synchronize
import multiprocessing.util  # registers its exit handler before _exit_flag registers one
import os
import random
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.utils.data._utils.worker

from typedbrain._sampler import mix_seed

__all__ = ["release_loader_frames", "seed_worker"]

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFF_FFFF


def _seed_numpy_and_random(seed: int) -> None:
    """Seed NumPy's and Python's global RNGs with distinct seeds derived from ``seed``.

    Both are MT19937 seeded the same way from an integer, so one seed for both would make
    ``np.random.rand()`` and ``random.random()`` return the same numbers.
    """
    numpy_seed = mix_seed("typedbrain.numpy", seed)
    np.random.seed([numpy_seed & _MASK32, numpy_seed >> 32])
    random.seed(mix_seed("typedbrain.random", seed))


def seed_worker(worker_id: int) -> None:
    """Seed Python's ``random`` and NumPy's global RNG in a loader worker from torch's seed.

    torch seeds each worker's torch RNG with ``base_seed + worker_id``, where ``base_seed`` is
    drawn from the loader's generator at ``iter(loader)``; this derives the other two RNGs from
    that seed, so they are a function of the loader's generator as well. ``make_dataloader``
    runs it in each worker (before your ``worker_init_fn``, if you give one); being a
    module-level function, it pickles for the ``spawn`` start method.

    Args:
        worker_id: the worker's number (unused: ``torch.initial_seed()`` already includes it).
    """
    del worker_id
    _seed_numpy_and_random(torch.initial_seed())


_EXIT_FLAGS: dict[int, torch.Tensor] = {}
"""By process id: the shared flag that process sets as it exits (see ``_exit_flag``)."""


def _exit_flag() -> torch.Tensor:
    """A one-element tensor in shared memory that this process sets to 1 as it exits.

    Made, and its setting registered, on first use: it is set (by :func:`_process_exits`)
    before ``multiprocessing``'s own exit handler sends SIGTERM to the daemonic processes still
    alive (loader workers of an iterator that was not shut down) and waits for them. In a main
    process that handler runs at ``atexit``, which runs the last registered first
    (``multiprocessing.util``, imported before, registered it earlier). A process
    ``multiprocessing`` started (a rank of ``torch.multiprocessing.spawn``) runs no ``atexit``
    handlers: it calls that handler directly, which first runs the finalizers registered with
    ``multiprocessing.util``.
    """
    flag = _EXIT_FLAGS.get(os.getpid())
    if flag is None:
        flag = torch.zeros(1, dtype=torch.uint8).share_memory_()  # type: ignore[no-untyped-call]  # untyped in torch
        _EXIT_FLAGS[os.getpid()] = flag
        # A child of a plain os.fork() inherits the atexit hook: the pid keeps it off the
        # parent's flag (multiprocessing's finalizers check the pid themselves).
        atexit.register(_process_exits, flag, os.getpid())
        multiprocessing.util.Finalize(
            None, _process_exits, args=(flag, os.getpid()), exitpriority=100
        )
    return flag


_SignalHandler: TypeAlias = Callable[[int, FrameType | None], Any]


class _ChildEndsAtExit:
    """The SIGCHLD handler of an exiting process: a child killed by SIGTERM is no worker failure.

    torch's SIGCHLD handler (installed by the first iterator with workers) raises ``DataLoader
    worker (pid ...) is killed by signal: Terminated`` for a worker that died of a signal and that
    nobody has waited for yet. As the process exits, ``multiprocessing`` sends SIGTERM to the
    workers still alive and then waits for them; a worker whose SIGTERM handler was not set yet (it
    was still starting: from its fork to torch's worker loop, or all of a ``spawn`` worker's
    imports) dies of it, and torch's handler, run while ``multiprocessing`` waits for another child,
    raised then: a traceback at the exit, in a process ``multiprocessing`` started an exit status of
    1, and, if it raised before every child was sent its SIGTERM, the others left running. This
    handler first reaps the children present at the exit that a SIGTERM killed (through
    ``multiprocessing``, which records their exit code), then calls the handler it replaced, which
    no longer sees them. A child that ended otherwise (a segfault, SIGKILL) is left for that handler
    to report. Where ``os.waitid`` is missing (macOS), which a child's end cannot be told without
    reaping it, every child that ended is reaped.
    """

    def __init__(
        self, previous: _SignalHandler, children: Iterable[multiprocessing.process.BaseProcess]
    ) -> None:
        self.previous = previous
        self.children = set(children)
        # How many children it has settled (reaped, or left to the previous handler). Python
        # may run the handler again within itself (for a SIGCHLD arriving meanwhile): what such
        # a run settles counts for the outer run too.
        self.settled = 0

    def _settle(self, child: multiprocessing.process.BaseProcess) -> None:
        if child in self.children:
            self.children.discard(child)
            self.settled += 1

    def _reap_terminated(self) -> None:
        """Reap the children that SIGTERM killed; leave the others that ended to the previous."""
        for child in list(self.children):
            try:
                pid = child.pid
                if pid is not None and hasattr(os, "waitid"):
                    ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                    if ended is None:  # alive
                        continue
                    if (ended.si_code, ended.si_status) != (os.CLD_KILLED, signal.SIGTERM):
                        self._settle(child)  # for the previous handler to report
                        continue
                if pid is not None and child.exitcode is None:  # reaps it, recording the code
                    continue  # alive (only without waitid)
            except ValueError:  # closed: reaped already
                pass
            except ChildProcessError:  # reaped already, or a forkserver's child
                pass
            self._settle(child)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self._reap_terminated()
        while True:
            settled = self.settled
            try:
                self.previous(signum, frame)
                return
            except RuntimeError:
                # A child killed by SIGTERM between the reaping and the previous handler's
                # look: reap it, and look again. An error with nothing newly settled is real.
                self._reap_terminated()
                if self.settled == settled:
                    raise


def _process_exits(flag: torch.Tensor, pid: int) -> None:
    """Mark this process as exiting: set its exit flag, and make an exit's SIGTERM no failure.

    Runs twice in a main process (at ``atexit``, then among ``multiprocessing``'s finalizers,
    just before it ends the children): the second run takes the children again. SIGCHLD
    handling is only changed from the main thread (the only one that may set it), and only
    where a handler is set (torch's, once an iterator with workers was made): see
    :class:`_ChildEndsAtExit`. Does nothing in another process than ``pid`` (a child of a
    plain ``os.fork`` that inherited the hook): the flag is the parent's.
    """
    if os.getpid() != pid:
        return
    flag.fill_(1)
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        return  # Windows has no SIGCHLD (nor torch's handler of it)
    current = signal.getsignal(signal.SIGCHLD)
    if isinstance(current, _ChildEndsAtExit):
        current.children = set(multiprocessing.active_children())
    elif callable(current):
        handler = _ChildEndsAtExit(current, multiprocessing.active_children())
        signal.signal(signal.SIGCHLD, handler)


def _iteration_done_flag() -> multiprocessing.synchronize.Semaphore | None:
    """In a loader worker: the semaphore behind its iterator's "workers done" event.

    torch's iterator sets that event (``done_event`` of its worker loop) as it shuts its
    workers down, before it sends SIGTERM to those that do not join in time. The worker loop
    is the target of the worker's ``multiprocessing`` process, and its arguments are still on
    that process object in the worker, whatever the start method. ``None`` outside a torch
    worker, or if torch's worker loop stops taking a ``done_event``.
    """
    process = multiprocessing.current_process()
    target = getattr(process, "_target", None)
    if target is None or target is not torch.utils.data._utils.worker._worker_loop:
        return None
    try:
        arguments = inspect.signature(target).bind(
            *getattr(process, "_args", ()), **getattr(process, "_kwargs", {})
        )
    except TypeError:
        return None
    # Event.is_set takes the event's lock, which the worker loop may be holding where the
    # signal interrupts it (it checks the event after each message): the handler would wait
    # for itself. Its semaphore can be tried without blocking instead.
    flag = getattr(arguments.arguments.get("done_event"), "_flag", None)
    return flag if isinstance(flag, multiprocessing.synchronize.Semaphore) else None


class _StopSignalInWorker:
    """A loader worker's SIGTERM and SIGINT handler: ignore them unless the main process says stop.

    A scheduler that stops a job (SLURM's ``scancel``, a time limit) sends SIGTERM to every
    process of it, and a terminal's Ctrl-C sends SIGINT to every process of the foreground job.
    The main process then finishes its batch and saves a checkpoint, and it may be waiting for
    that batch from a worker: a worker ending on the signal would make it fail (torch reports
    the death), so the worker carries on. It stops when the main process says so: torch sends
    it the end of the iteration; a worker that does not stop on that within seconds gets
    SIGTERM from torch, which this handler obeys once the iterator is shutting its workers
    down (``done``: see :func:`_iteration_done_flag`); and as the main process exits,
    ``multiprocessing`` sends SIGTERM to the workers of an iterator still alive, after
    ``_exit_flag`` is set: this handler exits then too. It also stops when the main process
    dies (torch's watchdog).
    """

    def __init__(
        self, exiting: torch.Tensor, done: multiprocessing.synchronize.Semaphore | None
    ) -> None:
        self._exiting = exiting
        self.done = done

    def _iteration_done(self) -> bool:
        done = self.done
        if done is None:
            return False
        try:
            # Read, not taken: a worker loop testing the event meanwhile must see it set.
            return done.get_value() > 0
        except NotImplementedError:  # macOS has no sem_getvalue: take it for a moment
            if not done.acquire(False):
                return False
            done.release()  # the event stays set for the worker loop and the other workers
            return True

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self._exiting.item() or self._iteration_done():
            os._exit(0)  # as torch's own handler does for its main process's SIGTERM
        logger.debug(
            "loader worker %d ignores %s: its main process decides",
            os.getpid(),
            signal.Signals(signum).name,
        )


class _WorkerInit:
    """What ``make_dataloader`` runs in each worker, then the user's ``worker_init_fn``.

    :func:`seed_worker` (unless ``seed`` is false: an iterable dataset's workers keep torch's
    seeding), then SIGTERM and SIGINT handled by :class:`_StopSignalInWorker`. It pickles (for
    the ``spawn`` start method) when the user's function does.
    """

    def __init__(
        self, exiting: torch.Tensor, user_fn: Callable[[int], None] | None, *, seed: bool
    ) -> None:
        self.exiting = exiting
        self.user_fn = user_fn
        self.seed = seed

    def __call__(self, worker_id: int) -> None:
        # The handler first: until it is set, a SIGTERM (the job's, or the main process's as
        # it exits) kills the worker, which torch then reports as a failure.
        handler = _StopSignalInWorker(self.exiting, None)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        handler.done = _iteration_done_flag()
        if self.seed:
            seed_worker(worker_id)
        if self.user_fn is not None:
            self.user_fn(worker_id)


_TORCH_DATA = os.path.dirname(os.path.abspath(torch.utils.data.__file__)) + os.sep
_WORKERS_ITERATOR = "_MultiProcessingDataLoaderIter."


def release_loader_frames(error: BaseException) -> None:
    """Let go of the loader iterators that ``error``'s tracebacks keep in torch's frames.

    An error raised while a ``DataLoader`` fetched a batch (a dataset error re-raised from a
    worker, say) passed through the iterator's methods, whose frames hold the iterator, and
    with it its worker processes, for as long as the error is kept: in a notebook's
    ``sys.last_value`` until the next error. Clearing those finished frames' locals drops the
    iterator at once, which shuts its workers down. The user's own frames are left whole, and
    a worker's traceback is in the error's message, not in these frames. Without worker
    processes (``num_workers=0``) nothing is cleared.
    """
    frames: list[FrameType] = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback = current.__traceback__
        while traceback is not None:
            frame = traceback.tb_frame
            if os.path.abspath(frame.f_code.co_filename).startswith(_TORCH_DATA):
                frames.append(frame)
            traceback = traceback.tb_next
        pending += (current.__cause__, current.__context__)
    # Only for an iterator with worker processes (torch's class for them, by its methods'
    # names: reading f_locals would keep a copy of the locals that clear() leaves): without
    # them, nothing is held that must go, and a post-mortem debugger keeps torch's locals.
    if any(frame.f_code.co_qualname.startswith(_WORKERS_ITERATOR) for frame in frames):
        for frame in frames:
            with contextlib.suppress(RuntimeError):  # still running: not the error's
                frame.clear()

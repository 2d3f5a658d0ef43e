"""Work a checkpointer finishes in a background thread, one piece at a time, failures kept.

A checkpointer that commits in the background hands the end of each save (hashing and syncing
the files, committing the manifest, its keep policy's deletions) to :class:`BackgroundWork`,
which runs it in a thread of its own; the checkpoint's file records wait in
:class:`PendingRecords` until then. The next call of the checkpointer waits for it first
(:meth:`BackgroundWork.settle`), and the next save, or ``wait()``, issues the warnings the work
kept back and raises what failed there (:meth:`BackgroundWork.take_warnings`,
:meth:`BackgroundWork.take_failure`). The thread is not a daemon: a process that ends normally
finishes the work first (``concurrent.futures`` joins its threads at exit).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from typedbrain._errors import CheckpointError
from typedbrain._manifest import CheckpointFile
from typedbrain._warn import Deferred, deferred

logger = logging.getLogger(__name__)


class _Registry:
    """The background work of each checkpoints folder (by real path) in this process.

    Shared by every checkpointer that writes there: one waits for another's commit as for its
    own.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.work: dict[str, BackgroundWork] = {}
        self.fork_hook = False  # registered on first use, not at import

    def forget(self) -> None:
        """In a forked child: the parent's commits do not run there, nothing to wait for."""
        self.lock = threading.Lock()
        self.work = {}


_registry = _Registry()


def work_for(folder: Path) -> BackgroundWork:
    """The background work of the checkpoints folder ``folder`` in this process."""
    with _registry.lock:
        if not _registry.fork_hook:
            os.register_at_fork(after_in_child=_registry.forget)
            _registry.fork_hook = True
        return _registry.work.setdefault(os.path.realpath(folder), BackgroundWork())


class BackgroundWork:
    """At most one piece of work running in a background thread; its warnings and failure."""

    def __init__(self) -> None:
        self._running: Future[None] | None = None
        self._what = ""
        self._running_warnings: Deferred = []  # kept back by the work running
        self._warnings: Deferred = []  # of settled work, not taken yet
        self._failure: BaseException | None = None
        self._settling = threading.Lock()

    def start(self, what: str, work: Callable[[], None]) -> None:
        """Run ``work`` in a new thread; ``what`` describes it (``"committing ..."``).

        The work started before must be settled: pieces of work never overlap.
        """
        if self._running is not None:
            raise AssertionError(f"{self._what} is still running")  # pragma: no cover
        executor = ThreadPoolExecutor(1, thread_name_prefix="typedbrain-commit")
        self._what, self._running_warnings = what, []
        try:
            self._running = executor.submit(_logged, what, work, self._running_warnings)
        finally:
            # The thread ends once the work is done; nothing else is ever submitted to it.
            executor.shutdown(wait=False)

    def settle(self) -> None:
        """Wait for the work started last, if any; keep its warnings and failure to be taken.

        Callers in several threads all wait; the first to see the work done keeps its failure.
        """
        running = self._running
        if running is None:
            return
        failure = running.exception()  # waits
        with self._settling:
            if self._running is not running:
                return
            self._warnings.extend(self._running_warnings)
            if failure is not None:
                failure.add_note(f"(while {self._what} in the background, after the save returned)")
                self._failure = failure
            self._running = None  # last: the next work may start, and replace what it read

    def take_warnings(self) -> Deferred:
        """The warnings settled work kept back, not taken yet (then forgotten), in order."""
        kept, self._warnings = self._warnings, []
        return kept

    def take_failure(self) -> BaseException | None:
        """The failure of settled work not taken yet (then forgotten), or ``None``."""
        failure, self._failure = self._failure, None
        return failure


def _logged(what: str, work: Callable[[], None], kept: Deferred) -> None:
    """Run ``work``, its warnings kept back in ``kept``; log them, and a failure, at once.

    Nobody may ask for them later (a process that ends after its last save). A failure is
    raised too.
    """
    try:
        with deferred(kept):
            work()
    except BaseException as error:
        logger.error(
            "%s failed in the background: %s: %s (the next save, or wait(), raises it)",
            what,
            type(error).__name__,
            error,
        )
        raise
    finally:
        for message, category in kept:
            logger.warning(
                "%s: %s: %s (the next save, or wait(), issues it)",
                what,
                category.__name__,
                message,
            )


class PendingRecords(Mapping[str, CheckpointFile]):
    """The file records of a checkpoint being committed in the background; reading them waits.

    A save that commits in the background returns before its files are hashed: the
    :class:`~typedbrain.Checkpoint` it returns holds this mapping, which the commit's thread
    fills (:meth:`resolve`) once the checkpoint is committed, or fails (:meth:`fail`). Reading
    it (comparing the checkpoint, copying or pickling it) waits until then; after a failure it
    raises :class:`CheckpointError`, as it does in a process forked before the commit was done
    (the commit runs in the parent only: the records never come). Its ``repr`` never waits.
    """

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._pid = os.getpid()  # the process whose thread commits
        self._done = threading.Event()
        self._records: Mapping[str, CheckpointFile] = {}
        self._failure: BaseException | None = None

    def resolve(self, records: Mapping[str, CheckpointFile]) -> None:
        """The records are known: the checkpoint is committed."""
        self._records = dict(records)
        self._done.set()

    def fail(self, failure: BaseException) -> None:
        """The commit failed with ``failure``: the checkpoint has no records."""
        self._failure = failure
        self._done.set()

    def _get(self) -> Mapping[str, CheckpointFile]:
        if not self._done.is_set() and os.getpid() != self._pid:
            raise CheckpointError(
                f"checkpoint {self._folder} is being committed in the background by process "
                f"{self._pid}, and this process was forked from it before the commit was "
                "done, so its files' records never come here; read them in that process"
            )
        self._done.wait()
        if self._failure is not None:
            raise CheckpointError(
                f"checkpoint {self._folder} was not committed (committing it in the background "
                f"failed: {type(self._failure).__name__}: {self._failure}), so its files have "
                "no records"
            ) from self._failure
        return self._records

    def __getitem__(self, name: str) -> CheckpointFile:
        return self._get()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        if not self._done.is_set():
            return "<file records being taken in the background>"
        if self._failure is not None:
            return "<no file records: the commit failed>"
        return repr(dict(self._records))

    def __reduce__(
        self,
    ) -> tuple[type[dict[str, CheckpointFile]], tuple[dict[str, CheckpointFile]]]:
        # Pickled (broadcast to other processes) or copied as the plain records, once known.
        return dict, (dict(self._get()),)

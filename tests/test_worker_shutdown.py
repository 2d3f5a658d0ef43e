"""Loader workers end when their iterator is shut down, though they ignore a job's stop signals.

The workers of ``make_dataloader`` ignore SIGTERM while their main process trains (see
``test_worker_signals.py``). torch ends an iteration by asking its workers to finish, and sends
SIGTERM to those that have not within seconds: a worker busy with a long item, and every worker
of an iterator that a dataset error left behind. That error's traceback holds the iterator in a
reference cycle, so the garbage collector finalizes the iterator's queues before the iterator
itself: the request to finish never reaches the workers, and torch's SIGTERM is all that ends
them. The workers must obey it then, or they live as long as the main process.

torch waits ``MP_STATUS_CHECK_INTERVAL`` (5 s) per worker before that SIGTERM; the tests shorten
it, which changes when the SIGTERM is sent, not whether.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset, _utils

from tests.helpers import PROJECT, Batch, RegressionBrain, examples, sgd
from tests.test_worker_signals import WorkerPids
from typedbrain import LoaderKwargs, ResumeWarning
from typedbrain._data import make_dataloader

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

METHODS = [
    method
    for method in ("fork", "spawn", "forkserver")
    if method in multiprocessing.get_all_start_methods()
]


@pytest.fixture(autouse=True)
def _short_worker_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)


def new_children(before: set[multiprocessing.process.BaseProcess]) -> list[int]:
    """The ids of this process's live child processes started since ``before`` was taken."""
    return [child.pid or 0 for child in multiprocessing.active_children() if child not in before]


class FailsAtItem5(Dataset[Batch]):
    """Sixteen examples; loading the sixth raises."""

    def __init__(self) -> None:
        self.items = examples(16)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Batch:
        if index == 5:
            raise ValueError("item 5 cannot be loaded")
        return self.items[index]


FAILED_IN_A_WORKER = r"(?s)in DataLoader worker process .*item 5 cannot be loaded"
"""The error torch raises in the main process for item 5, naming the worker that loaded it."""


def iterate_until_the_error(loader: torch.utils.data.DataLoader[object]) -> None:
    with pytest.raises(ValueError, match=FAILED_IN_A_WORKER):
        for _ in loader:
            pass


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("persistent", [False, True])
def test_no_worker_survives_a_dataset_error_once_the_error_is_dropped(
    method: str, persistent: bool
) -> None:
    before = set(multiprocessing.active_children())
    warns = pytest.warns(ResumeWarning, match="persistent_workers") if persistent else nullcontext()
    with warns:
        loader = make_dataloader(
            FailsAtItem5(),
            seed=0,
            batch_size=2,
            num_workers=2,
            multiprocessing_context=method,
            persistent_workers=persistent,
        )
    iterate_until_the_error(loader)
    del loader
    gc.collect()  # the error's reference cycle, and with it the iterator, goes
    assert new_children(before) == []


@pytest.mark.parametrize("entry_point", ["fit", "evaluate"])
def test_no_worker_survives_a_fit_or_evaluation_a_dataset_error_failed_while_it_is_kept(
    entry_point: str,
) -> None:
    """As a notebook keeps the last error (``sys.last_value``) until the next one."""
    before = set(multiprocessing.active_children())
    brain = RegressionBrain(
        modules={"model": torch.nn.Linear(4, 2)}, opt_class=sgd(), run_opts={"noprogressbar": True}
    )
    loader_kwargs: LoaderKwargs = {"batch_size": 2, "num_workers": 2}

    def run() -> None:
        if entry_point == "fit":
            brain.fit(range(1, 2), FailsAtItem5(), train_loader_kwargs=loader_kwargs)
        else:
            brain.evaluate(FailsAtItem5(), test_loader_kwargs=loader_kwargs)

    with pytest.raises(ValueError, match=FAILED_IN_A_WORKER) as caught:
        run()
    gc.collect()
    assert new_children(before) == []
    assert caught.value.__traceback__ is not None  # kept, with its traceback, all along


def test_without_workers_a_failed_fit_keeps_torchs_frames_for_a_post_mortem() -> None:
    brain = RegressionBrain(
        modules={"model": torch.nn.Linear(4, 2)}, opt_class=sgd(), run_opts={"noprogressbar": True}
    )
    with pytest.raises(ValueError, match="item 5 cannot be loaded") as caught:
        brain.fit(range(1, 2), FailsAtItem5(), train_loader_kwargs={"batch_size": 2})
    traceback = caught.value.__traceback__
    names: set[str] = set()
    while traceback is not None:
        if "torch/utils/data" in traceback.tb_frame.f_code.co_filename:
            names |= set(traceback.tb_frame.f_locals)
        traceback = traceback.tb_next
    assert {"self", "index"} <= names  # the fetching iterator's, as pdb.pm() shows them


class SlowSecondBatch(Dataset[int]):
    """Eight items; item 2, the first of batch 1 (batch size 2), takes a minute to load.

    Loading item 2 creates ``started`` first, so the test knows a worker is busy with it.
    """

    def __init__(self, started: Path) -> None:
        self.started = started

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> int:
        if index == 2:
            self.started.touch()
            time.sleep(60)
        return index


def test_a_worker_busy_with_an_item_when_its_iteration_ends_is_ended_by_torch(
    tmp_path: Path,
) -> None:
    """torch's SIGTERM to a worker that does not finish in time is obeyed, not ignored."""
    before = set(multiprocessing.active_children())
    started = tmp_path / "item-2-started"
    loader = make_dataloader(SlowSecondBatch(started), seed=0, batch_size=2, num_workers=2)
    iterator = iter(loader)
    first = next(iterator)  # batch 0, from worker 0; worker 1 loads batch 1
    assert isinstance(first, Tensor)
    assert first.tolist() == [0, 1]
    deadline = time.monotonic() + 60
    while not started.exists():  # worker 1, its handler set, is in item 2
        assert time.monotonic() < deadline, "no worker started loading item 2"
        time.sleep(0.01)
    del iterator  # shut down now: worker 0 finishes, worker 1 gets SIGTERM
    assert new_children(before) == []


STARTING_WORKERS_AT_EXIT = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys, time
    from pathlib import Path
    import torch
    from typedbrain import make_dataloader

    ORDER = Path(sys.argv[1])
    KEPT = []

    def starting_slowly():
        # In each forked worker, before torch's worker loop and typedbrain's handler: the
        # exit's SIGTERM arrives while the worker starts (held until it has, then let through).
        # The worker multiprocessing waits for first dies last, so the others die while the
        # exiting process waits, and its SIGCHLD handler finds them.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        while signal.SIGTERM not in signal.sigpending():
            time.sleep(0.01)
        while not ORDER.exists():
            time.sleep(0.01)
        if ORDER.read_text().split()[0] == str(os.getpid()):
            time.sleep(0.5)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    def body():
        torch.set_num_threads(1)
        loader = make_dataloader(
            list(range(40)), seed=0, batch_size=2, num_workers=3, multiprocessing_context="fork"
        )
        os.register_at_fork(after_in_child=starting_slowly)
        KEPT.append(iter(loader))  # alive until the exit
        # The order in which multiprocessing's exit waits for the children: this one.
        ORDER.write_text(" ".join(str(p.pid) for p in multiprocessing.active_children()))

    if __name__ == "__main__":
        if sys.argv[2] == "main":
            body()
        else:
            child = multiprocessing.get_context(sys.argv[2]).Process(target=body)
            child.start()
            child.join()
            sys.exit(child.exitcode)
    """
)


@pytest.mark.parametrize("exiting", ["main", "fork", "spawn"])
def test_an_exit_whose_sigterm_kills_starting_workers_is_clean(
    tmp_path: Path, exiting: str
) -> None:
    """Workers still starting (their handler not set) when the exit's SIGTERM arrives die of it:
    that is no worker failure. ``exiting``: the main process exits, or one that
    ``multiprocessing`` started with that method (as a rank of torch.multiprocessing.spawn)."""
    script = tmp_path / "starting_at_exit.py"
    script.write_text(STARTING_WORKERS_AT_EXIT, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "order"), exiting],
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert len((tmp_path / "order").read_text().split()) == 3  # the workers did start


def kill_and_iterate(iterator: Iterator[object], pid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to the worker ``pid`` and iterate on (its SIGCHLD may raise at once)."""
    os.kill(pid, signum)
    for _ in iterator:
        pass


WORKER_DIED = r"DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal|exited unexpectedly)"
"""torch's error for a dead worker: from its SIGCHLD handler, or from a fetch that timed out."""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_killed_while_the_loader_is_iterated_is_still_reported(
    signum: signal.Signals,
) -> None:
    """The exit's leniency does not reach a live process: torch's error stands."""
    loader = make_dataloader(WorkerPids(), seed=0, batch_size=2, num_workers=2)
    iterator = iter(loader)
    batch = next(iterator)
    assert isinstance(batch, Tensor)
    with pytest.raises(RuntimeError, match=WORKER_DIED):
        kill_and_iterate(iterator, int(batch[0]), signum)


def _sleep_a_minute() -> None:
    time.sleep(60)


def _wait_until_ended(process: multiprocessing.process.BaseProcess) -> None:
    """Wait until ``process`` has ended, without reaping it."""
    assert process.pid is not None
    deadline = time.monotonic() + 60
    while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline, "the child did not end"
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="os.waitid")
def test_at_exit_only_children_killed_by_sigterm_are_hidden_from_the_sigchld_handler() -> None:
    from typedbrain._loader_workers import _ChildEndsAtExit

    context = multiprocessing.get_context("fork")
    terminated, killed = (context.Process(target=_sleep_a_minute, daemon=True) for _ in "ab")
    terminated.start()
    killed.start()
    seen: list[tuple[int | None, int | None]] = []

    def previous(signum: int, frame: object) -> None:
        # What torch's handler looks at: each child's end, if nobody reaped it.
        for child in (terminated, killed):
            assert child.pid is not None
            try:
                ended = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                seen.append((child.pid, None))
            else:
                seen.append((child.pid, None if ended is None else ended.si_status))

    handler = _ChildEndsAtExit(previous, [terminated, killed])
    terminated.terminate()
    killed.kill()
    _wait_until_ended(terminated)
    _wait_until_ended(killed)
    handler(signal.SIGCHLD, None)
    assert seen == [(terminated.pid, None), (killed.pid, signal.SIGKILL)]
    assert terminated.exitcode == -signal.SIGTERM  # recorded by multiprocessing as it reaped
    killed.join()


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="os.waitid")
@pytest.mark.parametrize("nested", [False, True])
def test_at_exit_a_child_killed_by_sigterm_as_the_sigchld_handler_looks_is_no_failure(
    nested: bool,
) -> None:
    """The child dies after the handler reaped, as the handler it replaced (torch's) looks, and
    that one reports it. ``nested``: Python runs the handler again within itself, for the
    child's own SIGCHLD, before the report reaches the outer run, and that inner run reaps it."""
    from typedbrain._loader_workers import _ChildEndsAtExit

    child = multiprocessing.get_context("fork").Process(target=_sleep_a_minute, daemon=True)
    child.start()
    calls: list[int] = []

    def previous(signum: int, frame: object) -> None:
        calls.append(signum)
        if len(calls) == 1:
            child.terminate()
            _wait_until_ended(child)
            if nested:
                handler(signal.SIGCHLD, None)
            raise RuntimeError("DataLoader worker (pid ...) is killed by signal: Terminated.")

    handler = _ChildEndsAtExit(previous, [child])
    handler(signal.SIGCHLD, None)  # no error
    assert child.exitcode == -signal.SIGTERM
    assert len(calls) == 3 if nested else 2  # the report, the inner run's look, a look again


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="os.waitid")
def test_at_exit_an_error_of_the_replaced_sigchld_handler_with_nothing_reaped_stands() -> None:
    from typedbrain._loader_workers import _ChildEndsAtExit

    def previous(signum: int, frame: object) -> None:
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed.")

    with pytest.raises(RuntimeError, match="Killed"):
        _ChildEndsAtExit(previous, [])(signal.SIGCHLD, None)


def test_at_exit_a_closed_child_is_no_error_of_the_sigchld_handler() -> None:
    from typedbrain._loader_workers import _ChildEndsAtExit

    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
    child.start()
    child.join()
    calls: list[int] = []
    handler = _ChildEndsAtExit(lambda signum, frame: calls.append(signum), [child])
    child.close()  # its pid cannot be read any more
    handler(signal.SIGCHLD, None)
    assert calls == [signal.SIGCHLD]
    assert handler.children == set()


_FORKS_AND_EXITS = """
import os, sys
from typedbrain import make_dataloader
from typedbrain._loader_workers import _EXIT_FLAGS
make_dataloader(list(range(8)), seed=0, batch_size=2, num_workers=1)
flag = _EXIT_FLAGS[os.getpid()]
child = os.fork()
if child == 0:
    sys.exit(0)  # a plain fork's child ends normally: it runs the hooks it inherited
os.waitpid(child, 0)
print("flag", int(flag.item()))
"""


@pytest.mark.slow
def test_a_plain_fork_child_that_exits_leaves_the_parents_exit_flag_alone() -> None:
    # Set, it made the parent's loader workers obey a job's SIGTERM instead of ignoring it.
    done = subprocess.run(
        [sys.executable, "-c", _FORKS_AND_EXITS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=PROJECT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["flag", "0"]

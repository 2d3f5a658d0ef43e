"""Loader workers and stop signals: a stopped job's batch and checkpoint survive, exits never hang.

A scheduler stopping a job (SLURM's ``scancel``) sends SIGTERM to every process of it, Ctrl-C
sends SIGINT, the loader workers of ``make_dataloader`` included. They ignore it and the main
process decides: it ends them at the end of an iteration, or, as it exits, through
``multiprocessing``.
Each test runs in a separate process, under a timeout, so that a hang fails rather than blocks.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from tests.helpers import PROJECT, Batch, RegressionBrain, examples, sgd
from typedbrain import LoaderKwargs, Stage
from typedbrain._data import make_dataloader

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

TIMEOUT = 120
"""Seconds a child process gets: far more than it needs, so only a hang reaches it."""

TRAINING = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import typedbrain as tb
    from tests.helpers import RegressionBrain, examples, sgd

    class Slow(RegressionBrain):
        def compute_forward(self, batch, stage):
            if stage is tb.Stage.TRAIN:
                print("batch", self.step, flush=True)
                time.sleep(float(sys.argv[2]))
            return super().compute_forward(batch, stage)

    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 2)
    counter = tb.EpochCounter(3)
    brain = Slow(
        modules={"model": model},
        opt_class=sgd(),
        run_opts={"noprogressbar": True, "device": "cpu", "ckpt_interval_steps": 1000},
        checkpointer=tb.Checkpointer(
            Path(sys.argv[1]), recoverables={"model": model, "counter": counter}
        ),
    )
    loader_kwargs = {"batch_size": 4, "shuffle": True, "num_workers": 2}
    brain.fit(counter, examples(48), train_loader_kwargs=loader_kwargs)
    print("finished", flush=True)
    """
)


def start_training(tmp_path: Path, seconds_per_batch: float) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(TRAINING, encoding="utf-8")
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ckpt"), str(seconds_per_batch)],
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, which the test signals as a whole
    )


def test_sigterm_to_the_whole_job_with_workers_saves_a_checkpoint_and_exits_143(
    tmp_path: Path,
) -> None:
    process = start_training(tmp_path, seconds_per_batch=0.2)
    assert process.stdout is not None
    seen = 0
    for line in process.stdout:
        seen += line.startswith("batch")
        if seen == 3:
            os.killpg(process.pid, signal.SIGTERM)  # as scancel does: workers included
            break
    output = process.stdout.read()
    code = process.wait(timeout=TIMEOUT)
    assert code == 128 + signal.SIGTERM, output
    assert "training stopped by signal 15; a checkpoint was saved" in output
    assert "finished" not in output
    assert [path for path in (tmp_path / "ckpt").iterdir() if path.name.startswith("CKPT")]


def test_a_fit_with_workers_that_ends_normally_exits_normally(tmp_path: Path) -> None:
    process = start_training(tmp_path, seconds_per_batch=0)
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, output
    assert output.rstrip().endswith("finished")


def _run_script(script: Path, text: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Write ``text`` to ``script`` and run it with ``arguments``, under the timeout."""
    script.write_text(text, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script), *arguments],
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


EXITING = textwrap.dedent(
    """
    import sys
    import torch
    from typedbrain import make_dataloader

    torch.set_num_threads(1)
    loader = make_dataloader(list(range(40)), seed=0, batch_size=2, num_workers=2)
    iterator = iter(loader)
    next(iterator)
    if sys.argv[1] == "raise":
        def fail(iterator):  # the traceback, kept until the exit, holds the live iterator
            next(iterator)
            raise ValueError("failed with the loader's workers alive")
        fail(iterator)
    print("exiting", flush=True)
    """
)


@pytest.mark.parametrize(("how", "code"), [("return", 0), ("raise", 1)])
def test_a_process_exiting_with_a_live_iterator_ends_its_workers(
    tmp_path: Path, how: str, code: int
) -> None:
    # multiprocessing ends daemonic children still alive at the exit with SIGTERM, then waits
    # for them: workers that ignored that SIGTERM would make it wait forever.
    done = _run_script(tmp_path / "exiting.py", EXITING, how)
    assert done.returncode == code, done.stderr
    assert ("failed with the loader's workers alive" in done.stderr) == (how == "raise")


CHILD_EXITING = textwrap.dedent(
    """
    import multiprocessing
    import sys
    import torch
    from typedbrain import make_dataloader

    KEPT = []

    def body(how):
        torch.set_num_threads(1)
        loader = make_dataloader(list(range(40)), seed=0, batch_size=2, num_workers=2)
        iterator = iter(loader)
        next(iterator)
        if how == "raise":
            raise ValueError("failed with the loader's workers alive")
        KEPT.append(iterator)  # alive until the child exits

    if __name__ == "__main__":
        context = multiprocessing.get_context(sys.argv[2])
        child = context.Process(target=body, args=(sys.argv[1],))
        child.start()
        child.join()
        sys.exit(child.exitcode)
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize(("how", "code"), [("return", 0), ("raise", 1)])
def test_a_process_multiprocessing_started_exits_with_a_live_iterator(
    tmp_path: Path, method: str, how: str, code: int
) -> None:
    """Such a process (a rank of torch.multiprocessing.spawn) runs no atexit handlers: its
    workers must still learn that it exits before multiprocessing ends and waits for them."""
    done = _run_script(tmp_path / "child_exiting.py", CHILD_EXITING, how, method)
    assert done.returncode == code, done.stderr


class WorkerPids(Dataset[int]):
    """Item ``i`` is the id of the process that loaded it; each takes a moment."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> int:
        time.sleep(0.05)
        return os.getpid()


class StreamedWorkerPids(IterableDataset[int]):
    """Six items per worker, each the id of the process that loaded it, each taking a moment."""

    def __iter__(self) -> Iterator[int]:
        for _ in range(6):
            time.sleep(0.05)
            yield os.getpid()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("dataset", [WorkerPids(), StreamedWorkerPids()])
def test_workers_outlive_a_stop_signal_from_another_process_and_the_epoch_completes(
    dataset: Dataset[int], signum: signal.Signals
) -> None:
    loader = make_dataloader(dataset, seed=0, batch_size=2, num_workers=2)
    iterator = iter(loader)
    first = [next(iterator), next(iterator)]  # one batch from each worker, in turn
    pids = {int(pid) for batch in first if isinstance(batch, Tensor) for pid in batch}
    assert len(pids) == 2
    assert os.getpid() not in pids
    for pid in pids:  # sent by a process other than the loader's, as a scheduler's is
        subprocess.run(
            [sys.executable, "-c", f"import os; os.kill({pid}, {int(signum)})"],
            check=True,
            timeout=TIMEOUT,
        )
    rest = list(iterator)
    assert len(rest) == 4
    assert {int(pid) for batch in rest if isinstance(batch, Tensor) for pid in batch} == pids


FAILED_FETCH = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import torch
    from torch.utils.data import DataLoader
    import typedbrain as tb
    from tests.helpers import RegressionBrain, examples, sgd

    MARK = Path(sys.argv[1]) / "batch-2-done"
    STAGE = tb.Stage(sys.argv[2])  # the stage whose loader fails: train or valid

    class DiesWithTheJob(torch.utils.data.Dataset):
        # Item 12 starts batch 4 (batch size 4): the worker that loads it, once batch 2 is
        # done and the main process waits for batch 4 (its own loader's workers do not
        # ignore a job's signal), is stopped with the job.
        def __init__(self):
            self.items = examples(24)

        def __len__(self):
            return len(self.items)

        def __getitem__(self, index):
            if index == 12:
                while not MARK.exists():
                    time.sleep(0.01)
                time.sleep(0.5)
                os.kill(os.getppid(), signal.SIGTERM)
                os._exit(1)
            return self.items[index]

    class Marking(RegressionBrain):
        def on_fit_batch_end(self, batch, outputs, loss, should_step):
            if self.step == 2 and STAGE is tb.Stage.TRAIN:
                MARK.touch()

        def evaluate_batch(self, batch, stage):
            loss = super().evaluate_batch(batch, stage)
            if self.step == 2 and STAGE is tb.Stage.VALID:
                MARK.touch()
            return loss

    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 2)
    counter = tb.EpochCounter(2)
    brain = Marking(
        modules={"model": model}, opt_class=sgd(),
        run_opts={"noprogressbar": True, "device": "cpu"},
        checkpointer=tb.Checkpointer(
            Path(sys.argv[1]) / "ckpt", recoverables={"model": model, "counter": counter}
        ),
    )
    dies = DataLoader(DiesWithTheJob(), batch_size=4, num_workers=1)
    if STAGE is tb.Stage.TRAIN:
        brain.fit(counter, dies)
    else:
        brain.fit(counter, examples(8), dies, train_loader_kwargs={"batch_size": 4})
    print("finished", flush=True)
    """
)


def test_a_loader_failing_after_a_stop_signal_stops_the_fit_with_a_checkpoint(
    tmp_path: Path,
) -> None:
    """A user's DataLoader whose worker a job's signal stopped: the fetch fails, and the fit
    stops as the signal asks, saving the state after the last batch trained."""
    done = _run_script(tmp_path / "fetch.py", FAILED_FETCH, str(tmp_path), "train")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "the training loader failed after 15" in done.stderr
    assert "training stopped by signal 15; a checkpoint was saved" in done.stderr
    saved = [path for path in (tmp_path / "ckpt").iterdir() if path.name.startswith("CKPT")]
    assert len(saved) == 1


def test_a_validation_loader_failing_after_a_stop_signal_stops_the_fit_as_asked(
    tmp_path: Path,
) -> None:
    """The same in validation: the fit stops as the signal asks, without a checkpoint (a stop
    in validation saves none), rather than failing with the loader's error."""
    done = _run_script(tmp_path / "fetch.py", FAILED_FETCH, str(tmp_path), "valid")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "the validation loader failed after 15" in done.stderr
    assert "training stopped by signal 15; no checkpoint was saved" in done.stderr
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").glob("CKPT*"))


class _FailsAtStep2(RegressionBrain):
    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        if stage is Stage.TRAIN and self.step == 2:
            raise RuntimeError("failed in the middle of an epoch")
        return super().compute_forward(batch, stage)


def test_a_failed_fit_whose_error_is_kept_leaves_no_loader_worker_alive() -> None:
    """A notebook keeps the last error (``sys.last_value``), and with it the failed frames."""
    brain = _FailsAtStep2(
        modules={"model": torch.nn.Linear(4, 2)}, opt_class=sgd(), run_opts={"noprogressbar": True}
    )
    loader_kwargs: LoaderKwargs = {"batch_size": 2, "num_workers": 2}
    with pytest.raises(RuntimeError, match="failed in the middle of an epoch") as caught:
        brain.fit(range(1, 2), examples(16), train_loader_kwargs=loader_kwargs)
    assert caught.value.__traceback__ is not None  # the error, and its frames, are still held
    assert multiprocessing.active_children() == []

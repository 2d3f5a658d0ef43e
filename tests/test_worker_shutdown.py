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
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset, _utils

from tests.helpers import Batch, RegressionBrain, examples, sgd
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

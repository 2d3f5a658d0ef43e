"""A checkpoint saved by another number of processes: evaluating it is exact, continuing is not.

The brain's run state holds one entry per process. Continuing a run (``fit``) from a checkpoint
saved by 2 processes in 1 process cannot be exact, and says so; evaluating its weights is exact
and must not say anything. The 2-process checkpoint is made here by saving the one process's
entry twice, as two processes of a job would each save theirs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from torch import Tensor

import typedbrain as tb
from tests.strategies import run_state
from typedbrain._run_record import RunRecord, RunStateRecoverable
from typedbrain._state import RunState, converter

Batch = tuple[Tensor, Tensor]


class Regressor(tb.Brain[Batch, Tensor]):
    def compute_forward(self, batch: Batch, stage: tb.Stage) -> Tensor:
        predictions: Tensor = self.modules["model"](batch[0])
        return predictions

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: tb.Stage) -> Tensor:
        return torch.nn.functional.mse_loss(predictions, batch[1])

    def on_stage_end(self, stage: tb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is tb.Stage.VALID and self.checkpointer is not None:
            self.checkpointer.save_and_keep_only(meta={"loss": stage_loss})


def examples() -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 3, generator=generator)
    return [(inputs[index], inputs[index].sum(0, keepdim=True)) for index in range(8)]


def brain(folder: Path) -> tuple[Regressor, tb.EpochCounter]:
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    counter = tb.EpochCounter(limit=2)
    regressor = Regressor(
        {"model": model},
        lambda params: torch.optim.SGD(params, lr=0.05),
        run_opts={"device": "cpu", "noprogressbar": True},
        checkpointer=tb.Checkpointer(folder, {"model": model, "counter": counter}),
    )
    return regressor, counter


def fit_one_epoch(regressor: Regressor, counter: tb.EpochCounter) -> None:
    regressor.fit(counter, examples(), examples()[:4], train_loader_kwargs={"batch_size": 2})


@pytest.fixture
def saved_by_two_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkpoint folder whose run state has two processes' entries (after epoch 1 of 2)."""
    one_process = RunStateRecoverable.state_dict

    def two_processes(self: RunStateRecoverable) -> dict[str, object]:
        ranks = one_process(self)["ranks"]
        assert isinstance(ranks, list)
        return {"ranks": ranks * 2}

    with monkeypatch.context() as patch:
        patch.setattr(RunStateRecoverable, "state_dict", two_processes)
        regressor, counter = brain(tmp_path)
        counter.limit = 1
        fit_one_epoch(regressor, counter)
    return tmp_path


def resume_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(item.message) for item in caught if issubclass(item.category, tb.ResumeWarning)]


def test_evaluating_a_checkpoint_of_two_processes_in_one_warns_of_nothing(
    saved_by_two_processes: Path,
) -> None:
    regressor, _ = brain(saved_by_two_processes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = regressor.evaluate(examples()[:4], min_key="loss")
    assert resume_warnings(caught) == []
    assert math.isfinite(loss)  # the recovered weights were evaluated


def test_continuing_a_run_of_two_processes_in_one_warns_once(
    saved_by_two_processes: Path,
) -> None:
    regressor, counter = brain(saved_by_two_processes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_one_epoch(regressor, counter)
    assert resume_warnings(caught) == [
        "the checkpoint was saved by 2 processes and this run has 1: each process takes the "
        "saved state of rank 0, and the run will not continue exactly as the interrupted one "
        "would have"
    ]
    assert counter.current == 2  # it did continue, from epoch 1's checkpoint


@given(first=run_state(), second=run_state())
def test_loading_a_two_process_run_state_takes_rank_0s_entry_and_warns_of_nothing(
    first: RunState, second: RunState
) -> None:
    entries = [
        {"state": converter.unstructure(state), "gradients": []} for state in (first, second)
    ]
    given_back: list[RunRecord] = []
    loader = RunStateRecoverable(_refuse_to_save, given_back.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading alone warns of nothing
        loader.load_state_dict({"ranks": entries})
    assert [(record.state, record.saved_by) for record in given_back] == [(first, 2)]
    assert given_back[0].layout_warning(world_size=2, rank=1) is None
    assert "saved by 2 processes and this run has 1:" in str(given_back[0].layout_warning(1, 0))


def _refuse_to_save() -> RunRecord:
    raise AssertionError("a loading recoverable was asked to save")

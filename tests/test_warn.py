"""Warnings name the user's line, however deep inside typedbrain they are raised."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

import typedbrain as tb
from tests.helpers import LOADER, Batch, RegressionBrain, examples, regression_brain
from typedbrain import ResumeWarning


class _InterruptedError(Exception):
    pass


class _StopInEpoch2(RegressionBrain):
    """Raises after the ninth training batch: the third of epoch 2 (six batches an epoch)."""

    batches_seen = 0

    def on_fit_batch_end(
        self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
    ) -> None:
        self.batches_seen += 1
        if self.batches_seen == 9:
            raise _InterruptedError


def _checkpointer(folder: Path, model: torch.nn.Module) -> tb.Checkpointer:
    return tb.Checkpointer(folder, {"model": model})


def test_a_warning_raised_inside_fit_points_at_the_fit_call(tmp_path: Path) -> None:
    data = examples(24)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    brain = _StopInEpoch2(
        modules={"model": model},
        opt_class=lambda params: torch.optim.SGD(params, lr=0.1),
        run_opts={"noprogressbar": True, "ckpt_interval_steps": 1},
        checkpointer=_checkpointer(tmp_path, model),
    )
    with pytest.raises(_InterruptedError):
        brain.fit(range(1, 3), data, train_loader_kwargs=LOADER)

    resumed = regression_brain(
        run_opts={"ckpt_interval_steps": 1},
        checkpointer=_checkpointer(tmp_path, torch.nn.Linear(4, 2)),
    )
    # A plain range starts again at epoch 1, so the interrupted epoch 2 is not continued.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(range(1, 2), data, train_loader_kwargs=LOADER)
    resume_warnings = [w for w in caught if issubclass(w.category, ResumeWarning)]
    assert len(resume_warnings) == 1
    assert "the interrupted epoch is not continued" in str(resume_warnings[0].message)
    assert resume_warnings[0].filename == __file__


def test_a_checkpointer_warning_points_at_the_public_call(tmp_path: Path) -> None:
    _checkpointer(tmp_path, torch.nn.Linear(2, 1)).save_checkpoint(meta={"loss": 1.0})
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "MANIFEST.json").write_text("{")
    # Each checkpointer warns once about a folder, so each call gets a fresh one.
    with pytest.warns(tb.CheckpointWarning, match="damaged") as listed:
        _checkpointer(tmp_path, torch.nn.Linear(2, 1)).list_checkpoints()
    with pytest.warns(tb.CheckpointWarning, match="damaged") as found:
        _checkpointer(tmp_path, torch.nn.Linear(2, 1)).find_checkpoint(min_key="loss")
    with pytest.warns(tb.CheckpointWarning, match="damaged") as recovered:
        _checkpointer(tmp_path, torch.nn.Linear(2, 1)).recover_if_possible()
    assert [w.filename for w in (*listed, *found, *recovered)] == [__file__] * 3

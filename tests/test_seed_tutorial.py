"""Every code sample of the seed tutorial runs unchanged with ``import typedbrain as sb``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml
from torch.utils.data import DataLoader

import typedbrain as sb
from tests import seed_tutorial_samples as samples
from tests.fakes import RecordingCheckpointer


def dict_batches(
    count: int, *, targets: tuple[str, ...] = ("target",)
) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"input": torch.rand(10, 10, generator=generator)}
        | {name: torch.rand(10, 10, generator=generator) for name in targets}
        for _ in range(count)
    ]


def test_sample_1_minimal_brain_trains_for_ten_epochs() -> None:
    torch.manual_seed(0)
    before = torch.nn.Linear(10, 10).weight.detach().clone()  # the same draw as the sample's
    torch.manual_seed(0)
    brain, model = samples.sample_1_usage()
    assert brain.phase is sb.Phase.IDLE
    assert brain.optimizer_step == 10
    assert not torch.equal(before, model.weight)


def test_sample_2_optimizer_from_yaml_is_used_as_opt_class() -> None:
    loaded = load_hyperpyyaml(samples.SAMPLE_2_YAML)
    factory = loaded["optimizer"]
    assert isinstance(factory, functools.partial)
    brain = samples.SimpleBrain({"model": torch.nn.Linear(10, 10)}, opt_class=factory)
    brain.fit(range(2), dict_batches(2), progressbar=False)
    assert isinstance(brain.optimizer, torch.optim.Adam)
    assert brain.optimizer.param_groups[0]["lr"] == 0.1
    assert brain.optimizer_step == 4


def test_sample_3_hparams_are_read_as_attributes() -> None:
    class Brain(samples.SimpleBrainWithHparams, samples.SimpleBrain):
        """The sample's compute_objectives with sample 1's compute_forward."""

    brain = Brain(
        {"model": torch.nn.Linear(10, 10)},
        opt_class=lambda x: torch.optim.SGD(x, 0.1),
        hparams=samples.hparams,
    )
    batch = dict_batches(1, targets=("target1", "target2"))[0]
    predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
    expected = 0.7 * torch.nn.functional.l1_loss(predictions, batch["target1"]) + 0.3 * (
        torch.nn.functional.mse_loss(predictions, batch["target2"])
    )
    loss = brain.compute_objectives(predictions, batch, sb.Stage.TRAIN)
    torch.testing.assert_close(loss, expected)
    brain.fit(range(2), dict_batches(3, targets=("target1", "target2")), progressbar=False)
    assert brain.optimizer_step == 6


def test_fit_signature_matches_the_tutorial() -> None:
    parameters = list(inspect.signature(sb.Brain.fit).parameters)
    assert parameters == [
        "self",
        "epoch_counter",
        "train_set",
        "valid_set",
        "progressbar",
        "train_loader_kwargs",
        "valid_loader_kwargs",
    ]


def test_fit_accepts_the_tutorials_empty_dict_loader_kwargs_without_changing_them() -> None:
    train_kwargs: sb.LoaderKwargs = {}
    valid_kwargs: sb.LoaderKwargs = {"batch_size": 2}
    brain = samples.SimpleBrain(
        {"model": torch.nn.Linear(10, 10)}, lambda x: torch.optim.SGD(x, 0.1)
    )
    brain.fit(
        range(1),
        dict_batches(2),
        dict_batches(2),
        progressbar=False,
        train_loader_kwargs=train_kwargs,
        valid_loader_kwargs=valid_kwargs,
    )
    assert (train_kwargs, valid_kwargs) == ({}, {"batch_size": 2})


def test_sample_4_make_dataloader_turns_a_dataset_into_a_loader() -> None:
    brain = samples.SimpleBrain({"model": torch.nn.Linear(10, 10)})
    loader = samples.sample_4_fragment(brain, dict_batches(4), {"batch_size": 2})
    assert isinstance(loader, DataLoader)
    assert [tuple(batch["input"].shape) for batch in loader] == [(2, 10, 10), (2, 10, 10)]
    assert samples.sample_4_fragment(brain, loader, {}) is loader


def test_sample_5_on_fit_start_prepares_and_recovers() -> None:
    checkpointer = RecordingCheckpointer()
    brain = samples.OnFitStartBrain(
        {"model": torch.nn.Linear(10, 10)},
        opt_class=lambda x: torch.optim.SGD(x, 0.1),
        checkpointer=checkpointer,
    )
    brain.fit(range(1), dict_batches(1), progressbar=False)
    assert checkpointer.recoveries == [
        {"max_key": None, "min_key": None, "device": torch.device(brain.device)}
    ]
    assert checkpointer.recoverables["optimizer"] is brain.optimizer


def test_sample_6_custom_fit_batch_trains() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 10)
    before = model.weight.detach().clone()
    brain = samples.FitBatchBrain({"model": model}, opt_class=lambda x: torch.optim.SGD(x, 0.1))
    brain.fit(range(3), dict_batches(2), progressbar=False)
    assert not torch.equal(before, model.weight)
    assert brain.optimizer.param_groups[0]["params"][0].grad is None


def test_sample_6_custom_fit_batch_skips_a_nan_loss() -> None:
    model = torch.nn.Linear(10, 10)
    before = model.weight.detach().clone()
    brain = samples.FitBatchBrain({"model": model}, opt_class=lambda x: torch.optim.SGD(x, 0.1))
    batch = dict_batches(1)[0]
    batch["target"] = batch["target"] * float("nan")
    brain.fit(range(1), [batch], progressbar=False)
    assert torch.equal(before, model.weight)
    assert brain.nonfinite_count == 1


def test_sample_7_validation_loop_averages_the_losses() -> None:
    """The fragment as fit runs it: the loop around it counts each batch in ``brain.step``."""
    brain = samples.SimpleBrain({"model": torch.nn.Linear(10, 10)})
    batches = dict_batches(3)

    def counted(items: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for item in items:
            brain.step += 1
            yield item

    average = samples.sample_7_fragment(brain, counted(batches), 0.0)
    losses = [float(brain.evaluate_batch(batch, sb.Stage.VALID)) for batch in batches]
    assert average == pytest.approx(sum(losses) / 3)


def test_run_on_main_runs_the_function_once_here() -> None:
    calls: list[str] = []
    sb.run_on_main(calls.append, args=["main"], post_func=calls.append, post_args=["post"])
    assert calls == ["main"]
    sb.run_on_main(
        calls.append,
        args=["main"],
        post_func=calls.append,
        post_args=["post"],
        run_post_on_main=True,
    )
    assert calls == ["main", "main", "post"]


def test_evaluate_loads_the_best_checkpoint_by_key() -> None:
    checkpointer = RecordingCheckpointer()
    brain = samples.SimpleBrain({"model": torch.nn.Linear(10, 10)}, checkpointer=checkpointer)
    brain.evaluate(dict_batches(2), min_key="error", progressbar=False)
    assert checkpointer.recoveries == [
        {"max_key": None, "min_key": "error", "device": torch.device(brain.device)}
    ]


def test_brain_registers_its_state_with_the_checkpointer() -> None:
    checkpointer = RecordingCheckpointer()
    brain = samples.SimpleBrain(
        {"model": torch.nn.Linear(10, 10)},
        opt_class=lambda x: torch.optim.SGD(x, 0.1),
        checkpointer=checkpointer,
    )
    assert set(checkpointer.recoverables) == {"brain"}
    state = checkpointer.recoverables["brain"]
    assert isinstance(state, sb.Stateful)
    brain.fit(range(2), dict_batches(3), progressbar=False)
    ranks = state.state_dict()["ranks"]
    assert isinstance(ranks, list)
    assert len(ranks) == 1  # one process
    saved = ranks[0]
    assert saved["gradients"] == []  # no accumulation window was open
    run_state = saved["state"]
    assert isinstance(run_state, dict)
    assert run_state["phase"] == "IDLE"
    assert run_state["mid_epoch"] is False
    assert run_state["progress"] == {
        "step": 0,
        "optimizer_step": 6,
        "avg_train_loss": 0.0,
        "averaged": 0,
        "nonfinite_count": 0,
    }
    assert set(checkpointer.recoverables) == {"brain", "optimizer"}

"""A run interrupted anywhere and started again ends bit for bit where the uninterrupted run ends.

The interruption is an exception raised from a forward pass (training or validation), which,
like SIGKILL, saves nothing: the restarted run resumes from the last committed checkpoint.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Literal

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import typedbrain
import typedbrain._brain
import typedbrain._sampler
from tests.helpers import python_blocks
from tests.resume_harness import (
    RunConfig,
    SimulatedCrashError,
    differences,
    final_state,
    run,
    total_forward_passes,
)
from tests.test_crash_resume import saves_so_far
from typedbrain import ResumeWarning


@attrs.frozen
class Interruption:
    """Where a run is interrupted, and what the restarted script seeds its generators with."""

    stop_at: int
    restart_seed: int | None  # None: the same seed as the first start


@st.composite
def configs_and_stops(draw: st.DrawFn) -> tuple[RunConfig, Interruption]:
    batch_size = draw(st.integers(2, 5))
    # The training set: a dataset (make_dataloader builds the loader), given with a sampler of
    # yours drawing from its own generator, or a DataLoader of yours (shuffling itself, or
    # over a ResumableSampler).
    source = draw(st.sampled_from(["dataset", "kwargs_sampler", "user_loader", "user_sampler"]))
    user_loader = source == "user_loader"
    config = RunConfig(
        data_seed=draw(st.integers(0, 2**31 - 1)),
        samples=draw(st.integers(batch_size * 2, 20)),
        batch_size=batch_size,
        epochs=draw(st.integers(1, 3)),
        accumulation=draw(st.integers(1, 3)),
        precision=draw(st.sampled_from(["fp32", "bf16", "fp16"])),  # fp16: a grad scaler
        dropout=draw(st.sampled_from([0.0, 0.3])),
        augment=draw(st.booleans()),
        valid=draw(st.booleans()),
        ckpt_interval_steps=draw(st.integers(1, 4)),
        shuffle=draw(st.booleans()),
        valid_shuffle=draw(st.booleans()),
        valid_loader_generator=draw(st.booleans()),
        user_loader=user_loader,
        loader_generator=user_loader and draw(st.booleans()),
        user_sampler=source == "user_sampler",
        kwargs_sampler=source == "kwargs_sampler",
        # Two workers now and then: each epoch starts worker processes, which is slow.
        num_workers=draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0, 2])),
        # The recipe's own checkpoints at the stage boundaries, now and then.
        save_point=draw(
            st.sampled_from(["none", "none", "train_start", "train_end", "valid_start"])
        ),
        # Both modes of the checkpointer: committing in the background, fit lets the last
        # save's commit end as the crash leaves it, and the restart resumes from it.
        commit_in_background=draw(st.booleans()),
        draw_in_fit_start=draw(st.booleans()),
        schedule=draw(st.sampled_from(["step_epoch", "onecycle_batch", "plateau"])),
        two_optimizers=draw(st.booleans()),
    )
    interruption = Interruption(
        stop_at=draw(st.integers(1, total_forward_passes(config))),
        # An unseeded script's restart: its generators differ from the first start's.
        restart_seed=draw(st.none() | st.integers(0, 2**31 - 1)),
    )
    return config, interruption


def interrupted_then_resumed(
    config: RunConfig, stop_at: int, folder: Path, *, restart_seed: int | None = None
) -> dict[str, object]:
    """Run ``config`` until forward pass ``stop_at`` crashes it, then restart it to the end.

    With ``restart_seed``, the restarted script seeds its generators with it: what it builds
    before recovering (the model's initial weights, loader seeds drawn with ``seed=None``)
    differs from the first start's, and the checkpoint must make up for all of it. Without a
    checkpoint to recover, a differently seeded script is a different run: the restart then
    uses the first start's seed.
    """
    with pytest.raises(SimulatedCrashError):
        run(config, folder, stop_at=stop_at)
    script_seed = restart_seed if saves_so_far(folder) else None
    return final_state(run(config, folder, script_seed=script_seed))


def resume_differences(config: RunConfig, interruption: Interruption) -> list[str]:
    """Where ``config`` run straight and ``config`` interrupted and resumed end differently."""
    with tempfile.TemporaryDirectory() as straight, tempfile.TemporaryDirectory() as broken:
        expected = final_state(run(config, Path(straight)))
        resumed = interrupted_then_resumed(
            config, interruption.stop_at, Path(broken), restart_seed=interruption.restart_seed
        )
    return differences(expected, resumed)


# A run resumed after its first epoch's training steps the scheduler before this process has
# stepped the optimizer: torch's heuristic warns (see docs/resume.md); the result is still exact.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(configs_and_stops())
def test_interrupted_and_resumed_run_ends_identical_to_uninterrupted(
    drawn: tuple[RunConfig, Interruption],
) -> None:
    assert_resumes_exactly(*drawn)


def assert_resumes_exactly(config: RunConfig, interruption: Interruption) -> None:
    """The resumed run ends identical, warning only where its loader cannot be positioned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResumeWarning)
        assert resume_differences(config, interruption) == []
    resume_warnings = [str(w.message) for w in caught if issubclass(w.category, ResumeWarning)]
    for warning in caught:  # the others go on to pytest as they came
        if not issubclass(warning.category, ResumeWarning):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    # The one fallback there is: a sampler that cannot be positioned (a plain DataLoader's, or
    # one given to make_dataloader), whose consumed batches are drawn and dropped. A loader
    # built by make_dataloader with its own sampler, or over a ResumableSampler, never needs it.
    if config.user_loader or config.kwargs_sampler:
        assert all("without loading them" in message for message in resume_warnings)
    else:
        assert resume_warnings == []


def test_an_unseeded_restart_validates_a_shuffled_set_in_the_interrupted_runs_order(
    tmp_path: Path,
) -> None:
    # 10 validation items in batches of 4: the stage loss depends on how they are grouped.
    config = RunConfig(data_seed=3, samples=20, batch_size=4, epochs=3, valid_shuffle=True)
    expected = final_state(run(config, tmp_path / "straight"))
    resumed = interrupted_then_resumed(config, 12, tmp_path / "broken", restart_seed=12345)
    assert differences(expected, resumed) == []


@pytest.mark.parametrize("stop_at", [12, 17, 20])  # epoch 2: training, validation; epoch 3
def test_a_users_validation_loader_shuffling_from_its_own_generator_resumes_exactly(
    tmp_path: Path, stop_at: int
) -> None:
    # 8 validation samples in batches of 3: the stage loss depends on how they are grouped.
    config = RunConfig(data_seed=4, samples=16, batch_size=3, epochs=3, valid_loader_generator=True)
    expected = final_state(run(config, tmp_path / "straight"))
    resumed = interrupted_then_resumed(config, stop_at, tmp_path / "broken")
    assert differences(expected, resumed) == []


@pytest.mark.parametrize("stop_at", [9, 13])  # mid-way through epoch 2; as epoch 3 starts
def test_a_users_loader_shuffling_from_its_own_generator_resumes_exactly(
    tmp_path: Path, stop_at: int
) -> None:
    # DataLoader(shuffle=True, generator=g), torch's own reproducibility idiom: each epoch's
    # order comes from g, which the checkpoint must hold (the global generators are not it).
    config = RunConfig(
        data_seed=4, samples=16, batch_size=4, epochs=3, user_loader=True, loader_generator=True
    )
    expected = final_state(run(config, tmp_path / "straight"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResumeWarning)  # the documented fast-forward
        resumed = interrupted_then_resumed(config, stop_at, tmp_path / "broken")
    assert differences(expected, resumed) == []


@pytest.mark.parametrize("stop_at", [3, 7])
def test_resume_with_two_workers_and_augmentation_is_exact(stop_at: int, tmp_path: Path) -> None:
    config = RunConfig(data_seed=5, samples=12, batch_size=3, augment=True, num_workers=2)
    expected = final_state(run(config, tmp_path / "straight"))
    resumed = interrupted_then_resumed(config, stop_at, tmp_path / "broken")
    assert differences(expected, resumed) == []


def test_several_interruptions_in_a_row_still_end_identical(tmp_path: Path) -> None:
    config = RunConfig(data_seed=11, epochs=3, accumulation=2, dropout=0.3, augment=True)
    expected = final_state(run(config, tmp_path / "straight"))
    folder = tmp_path / "broken"
    for stop_at in (4, 3, 9, 2):  # counted from each restart
        with pytest.raises(SimulatedCrashError):
            run(config, folder, stop_at=stop_at)
    assert differences(expected, final_state(run(config, folder))) == []


def test_an_unseeded_restart_augments_in_workers_as_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """Loaders built with seed=None draw their seeds from the script's generator; the
    checkpoint keeps them, so worker augmentation (training and validation) reproduces."""
    config = RunConfig(
        data_seed=5, samples=12, batch_size=3, augment=True, num_workers=2, valid_num_workers=2
    )
    expected = final_state(run(config, tmp_path / "straight"))
    resumed = interrupted_then_resumed(config, 7, tmp_path / "broken", restart_seed=1234)
    assert differences(expected, resumed) == []


def test_a_user_dataloader_over_a_resumable_sampler_resumes_exactly(tmp_path: Path) -> None:
    """iter() of a loader without its own generator draws from the global generator: it draws
    as the interrupted run did, before the checkpoint's generator state is put back."""
    config = RunConfig(data_seed=3, samples=16, batch_size=4, dropout=0.3, user_sampler=True)
    expected = final_state(run(config, tmp_path / "straight"))
    resumed = interrupted_then_resumed(config, 9, tmp_path / "broken")
    assert differences(expected, resumed) == []


def test_a_sampler_with_its_own_generator_given_to_make_dataloader_resumes_exactly() -> None:
    """The sampler's generator is saved with the run state and put back: the resumed epoch
    draws the order the interrupted one drew (its consumed batches drawn and dropped)."""
    config = RunConfig(data_seed=3, samples=16, batch_size=4, epochs=3, kwargs_sampler=True)
    assert_resumes_exactly(config, Interruption(stop_at=11, restart_seed=None))  # epoch 2


# 16 samples in batches of 4 and 8 to validate in 2: an epoch is 6 forward passes. No interval
# checkpoints: the recipe's, at the end of an epoch (or of its training), are the last ones.
DRAWS_IN_FIT_START = RunConfig(
    data_seed=6,
    samples=16,
    batch_size=4,
    dropout=0.3,
    ckpt_interval_steps=100,
    draw_in_fit_start=True,
)


@pytest.mark.parametrize(
    ("save_point", "stop_at"),
    [("none", 7), ("train_end", 5)],  # epoch 2's first batch; epoch 1's validation
    ids=["after-the-epoch", "before-its-validation"],
)
def test_a_recipe_drawing_random_numbers_in_on_fit_start_resumes_exactly(
    save_point: Literal["none", "train_end"], stop_at: int
) -> None:
    """Its draws, after the recovery, must not shift the generators the next stage starts from."""
    config = attrs.evolve(DRAWS_IN_FIT_START, save_point=save_point)
    assert resume_differences(config, Interruption(stop_at=stop_at, restart_seed=None)) == []


def test_a_restart_with_another_batch_size_continues_after_the_samples_used_and_warns(
    tmp_path: Path,
) -> None:
    config = RunConfig(data_seed=3, samples=16, batch_size=4, valid=False, epochs=1)
    with pytest.raises(SimulatedCrashError):
        run(config, tmp_path, stop_at=3)  # the checkpoint after batch 2: 8 samples used
    with pytest.warns(typedbrain.ResumeWarning, match="batch size was 4 .* is 2 now"):
        brain = run(config, tmp_path, batch_size=2)
    assert brain.forward_calls == 4  # the other 8 samples, in batches of 2


# Negative controls: with a piece of the restoration switched off, the same comparison fails.
# They show that the property above can fail, i.e. that it checks what it claims to check.

CONTROL = RunConfig(data_seed=3, samples=16, batch_size=4, dropout=0.3, augment=True)
CONTROL_STOP = 9  # epoch 2, training batch 3: resumes after the checkpoint at batch 2


def test_control_without_rng_restoration_diverges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = final_state(run(CONTROL, tmp_path / "straight"))
    monkeypatch.setattr(typedbrain._brain, "restore_rng", lambda state: None)
    resumed = interrupted_then_resumed(CONTROL, CONTROL_STOP, tmp_path / "broken")
    assert differences(expected, resumed) != []


def test_control_without_sampler_positioning_diverges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = final_state(run(CONTROL, tmp_path / "straight"))

    def no_skip(
        loader: DataLoader[object], *, epoch: int, batches_done: int, batch_size: int | None
    ) -> bool:
        return position(loader, epoch=epoch, batches_done=0, batch_size=batch_size)

    # What batches_from positions the training loader with (its epoch is set already).
    position = typedbrain._sampler._position_for_epoch
    monkeypatch.setattr("typedbrain._sampler._position_for_epoch", no_skip)
    resumed = interrupted_then_resumed(CONTROL, CONTROL_STOP, tmp_path / "broken")
    assert differences(expected, resumed) != []


def test_control_without_the_control_is_identical_and_resumes_mid_epoch(tmp_path: Path) -> None:
    """The controls' set-up resumes exactly when nothing is switched off, from mid-epoch."""
    expected = final_state(run(CONTROL, tmp_path / "straight"))
    with pytest.raises(SimulatedCrashError):
        run(CONTROL, tmp_path / "broken", stop_at=CONTROL_STOP)
    brain = run(CONTROL, tmp_path / "broken")
    assert differences(expected, final_state(brain)) == []
    # 12 forward passes in all; the checkpoint after epoch 2's second batch leaves 2 training
    # and 2 validation passes to run.
    assert brain.forward_calls == 4


def test_the_resume_guide_example_runs_and_a_second_run_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = python_blocks("docs/resume.md")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "resume.md", "exec"), {})
    folder = tmp_path / "results" / "save"
    after_first = sorted(path.name for path in folder.iterdir())
    assert after_first
    second: dict[str, object] = {}
    exec(compile(example, "resume.md", "exec"), second)
    # The second run recovered the finished run: its counter was spent, so it trained no
    # batch and saved nothing new.
    assert sorted(path.name for path in folder.iterdir()) == after_first
    counter = second["counter"]
    assert isinstance(counter, typedbrain.EpochCounter)
    assert counter.current == counter.limit

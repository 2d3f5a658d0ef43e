"""A run interrupted anywhere and started again ends bit for bit where the uninterrupted run ends.

The interruption is an exception raised from a forward pass (training or validation), which,
like SIGKILL, saves nothing: the restarted run resumes from the last committed checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import typedbrain
import typedbrain._brain
from tests.resume_harness import (
    RunConfig,
    SimulatedCrashError,
    differences,
    final_state,
    run,
    total_forward_passes,
)
from typedbrain._sampler import position_loader


@st.composite
def configs_and_stops(draw: st.DrawFn) -> tuple[RunConfig, int]:
    batch_size = draw(st.integers(2, 5))
    config = RunConfig(
        data_seed=draw(st.integers(0, 2**31 - 1)),
        samples=draw(st.integers(batch_size * 2, 20)),
        batch_size=batch_size,
        epochs=draw(st.integers(1, 3)),
        accumulation=draw(st.integers(1, 3)),
        precision=draw(st.sampled_from(["fp32", "bf16"])),
        dropout=draw(st.sampled_from([0.0, 0.3])),
        augment=draw(st.booleans()),
        valid=draw(st.booleans()),
        ckpt_interval_steps=draw(st.integers(1, 4)),
        shuffle=draw(st.booleans()),
        user_loader=draw(st.booleans()),
        # Two workers now and then: each epoch starts worker processes, which is slow.
        num_workers=draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0, 2])),
    )
    stop_at = draw(st.integers(1, total_forward_passes(config)))
    return config, stop_at


def interrupted_then_resumed(config: RunConfig, stop_at: int, folder: Path) -> dict[str, object]:
    with pytest.raises(SimulatedCrashError):
        run(config, folder, stop_at=stop_at)
    return final_state(run(config, folder))


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(configs_and_stops())
def test_interrupted_and_resumed_run_ends_identical_to_uninterrupted(
    drawn: tuple[RunConfig, int],
) -> None:
    config, stop_at = drawn
    with tempfile.TemporaryDirectory() as straight, tempfile.TemporaryDirectory() as broken:
        expected = final_state(run(config, Path(straight)))
        resumed = interrupted_then_resumed(config, stop_at, Path(broken))
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

    def no_skip(loader: DataLoader[object], *, epoch: int, batches_done: int) -> bool:
        return position_loader(loader, epoch=epoch, batches_done=0)

    monkeypatch.setattr("typedbrain._sampler.position_loader", no_skip)
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
    page = (Path(__file__).resolve().parent.parent / "docs" / "resume.md").read_text()
    example = page.split("```python\n", 1)[1].split("```", 1)[0]
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

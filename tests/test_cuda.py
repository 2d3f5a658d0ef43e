"""On a CUDA device, a run interrupted anywhere and resumed ends bit for bit where it would have.

These tests need a GPU and are skipped without one (CI has none). tests/conftest.py hides the
GPUs from the other tests, which compare CPU runs; run these on a CUDA machine with
``TYPEDBRAIN_TEST_CUDA=1 pytest tests/test_cuda.py``. They check what the CPU tests cannot:
the CUDA generators (dropout on the GPU) are saved and put back, fp16's grad scaler resumes
with its scale, a checkpoint written from CUDA tensors loads on a machine without CUDA, the
collectives a brain runs work under ``nccl``, which reduces CUDA tensors only, and the seed
tutorial's samples, which never move their batches, train on the GPU unchanged.

Kernels run in torch's deterministic mode (as docs/resume.md tells GPU users to): without it,
some CUDA kernels give different bits from run to run, resumed or not.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Literal

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import typedbrain._rng
from tests import seed_tutorial_samples
from tests.resume_harness import RunConfig, SimulatedCrashError, differences, final_state, run
from tests.test_crash_resume import LONG, finish, kill_after_saves, load, start
from tests.test_ddp import assert_same_ranks, stopped_and_restarted, torchrun_job
from tests.test_resume import (
    Interruption,
    assert_resumes_exactly,
    configs_and_stops,
    interrupted_then_resumed,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device and TYPEDBRAIN_TEST_CUDA=1"
)

# cuBLAS reads it when its first handle is made: before any test here runs a matrix product.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def deterministic_kernels() -> Iterator[None]:
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


PRECISIONS: Final[tuple[Literal["fp32", "bf16", "fp16"], ...]] = ("fp32", "bf16", "fp16")


@st.composite
def cuda_configs_and_stops(draw: st.DrawFn) -> tuple[RunConfig, Interruption]:
    """test_resume's drawn set-ups, on the GPU, with fp16 (and its grad scaler) drawn too."""
    config, interruption = draw(configs_and_stops())
    precision = draw(st.sampled_from(PRECISIONS))
    return attrs.evolve(config, device="cuda", precision=precision), interruption


# The scheduler warning of a run resumed after its first epoch's training: see test_resume.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(cuda_configs_and_stops())
def test_a_cuda_run_interrupted_anywhere_and_resumed_ends_identical(
    drawn: tuple[RunConfig, Interruption],
) -> None:
    assert_resumes_exactly(*drawn)


# Dropout on the GPU draws from the CUDA generator; the restart's script seeds its generators
# differently, so only the checkpoint can put the CUDA generator back where it was.
DROPOUT = RunConfig(data_seed=3, samples=16, batch_size=4, dropout=0.3, device="cuda")
DROPOUT_STOP = 9  # epoch 2, training batch 3: resumes after the checkpoint at batch 2


def test_cuda_dropout_resumes_exactly_after_a_differently_seeded_restart(tmp_path: Path) -> None:
    expected = final_state(run(DROPOUT, tmp_path / "straight"))
    resumed = interrupted_then_resumed(
        DROPOUT, DROPOUT_STOP, tmp_path / "broken", restart_seed=1234
    )
    assert differences(expected, resumed) == []


def test_control_without_cuda_generator_restoration_diverges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = final_state(run(DROPOUT, tmp_path / "straight"))
    monkeypatch.setattr(typedbrain._rng, "_restore_cuda", lambda state: None)
    resumed = interrupted_then_resumed(
        DROPOUT, DROPOUT_STOP, tmp_path / "broken", restart_seed=1234
    )
    assert differences(expected, resumed) != []


def test_fp16_resumes_with_the_grad_scalers_scale(tmp_path: Path) -> None:
    config = attrs.evolve(DROPOUT, precision="fp16", epochs=3)
    expected = final_state(run(config, tmp_path / "straight"))
    resumed = interrupted_then_resumed(config, 15, tmp_path / "broken", restart_seed=99)
    assert expected["scaler"]  # the scaler was enabled and saved something
    assert differences(expected, resumed) == []


# In separate processes: a fresh process has not touched CUDA before the brain moves its
# modules there, and it must still get the CUDA generator state of the checkpoint.
LONG_CUDA = attrs.evolve(LONG, epochs=2, device="cuda")


def test_a_cuda_run_killed_in_new_processes_resumes_bit_for_bit(tmp_path: Path) -> None:
    code, stderr = finish(start(LONG_CUDA, tmp_path / "straight", tmp_path / "straight.pt"))
    assert code == 0, stderr
    folder, out = tmp_path / "killed", tmp_path / "killed.pt"
    for saves, jitter in ((2, 0.0), (3, 0.01), (2, 0.03)):
        assert kill_after_saves(start(LONG_CUDA, folder, out), folder, saves, jitter)
    code, stderr = finish(start(LONG_CUDA, folder, out))
    assert code == 0, stderr
    assert differences(load(tmp_path / "straight.pt"), load(out)) == []


def test_a_checkpoint_written_on_cuda_resumes_on_a_process_without_cuda_and_warns(
    tmp_path: Path,
) -> None:
    with pytest.raises(SimulatedCrashError):
        run(DROPOUT, tmp_path / "ckpt", stop_at=DROPOUT_STOP)
    # The crashed run's checkpointer (kept in a reference cycle through the exception's
    # traceback) holds the folder's writer lock until it is collected: the restart below is
    # another process, which would be refused the folder.
    gc.collect()
    # The same recipe, told to run on the CPU, in a process that sees no GPU.
    on_cpu = attrs.evolve(DROPOUT, device="cpu")
    out = tmp_path / "out.pt"
    code, stderr = finish(start(on_cpu, tmp_path / "ckpt", out, env={"CUDA_VISIBLE_DEVICES": ""}))
    assert code == 0, stderr
    count = torch.cuda.device_count()  # every device's generator is saved
    assert f"random generator states of {count} CUDA devices and this process sees 0" in stderr
    finished = load(out)
    model = finished["model"]
    assert isinstance(model, dict)
    assert all(tensor.device.type == "cpu" for tensor in model.values())


# One rank under torchrun: the brain starts an nccl group, wraps the model in DDP and averages
# its losses over the group with nccl collectives.
NCCL_RUN = RunConfig(
    data_seed=5,
    samples=16,
    batch_size=2,
    epochs=2,
    accumulation=2,
    dropout=0.3,
    augment=True,
    device="cuda",
    precision="bf16",
)


@pytest.mark.parametrize("stop_at", [5, 11])  # mid-accumulation in training; in validation
def test_a_one_rank_nccl_job_stopped_and_restarted_ends_identical(
    stop_at: int, tmp_path: Path
) -> None:
    expected = tmp_path / "straight.pt"
    assert torchrun_job(NCCL_RUN, tmp_path / "straight", expected, ranks=1) == 0
    resumed = stopped_and_restarted(NCCL_RUN, tmp_path, stop_at, ranks=1)
    assert_same_ranks(expected, resumed, ranks=1)


# The brain's default device is the GPU here, and the tutorial's batches are CPU tensors that
# its compute_forward uses as they come: Brain.move_batch puts them on the GPU first.
def test_the_seed_tutorials_first_sample_trains_on_the_gpu_unchanged() -> None:
    brain, model = seed_tutorial_samples.sample_1_usage()  # type: ignore[no-untyped-call]  # kept verbatim, untyped
    assert brain.device == "cuda:0"
    assert model.weight.is_cuda
    assert brain.optimizer_step == 10


def test_the_seed_tutorials_own_fit_batch_gets_batches_on_the_gpu() -> None:
    model = torch.nn.Linear(10, 10)
    before = model.weight.detach().clone()
    brain = seed_tutorial_samples.FitBatchBrain(
        {"model": model}, opt_class=lambda x: torch.optim.SGD(x, 0.1)
    )
    batches = [{"input": torch.rand(10, 10), "target": torch.rand(10, 10)} for _ in range(2)]
    brain.fit(range(3), batches, progressbar=False)
    assert model.weight.is_cuda
    assert not torch.equal(before, model.weight.detach().cpu())

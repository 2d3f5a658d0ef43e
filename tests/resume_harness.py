"""A small, fully checkpointed training run that can be interrupted at any forward pass.

The resume tests run it twice: once uninterrupted, once interrupted (by an exception, as a
SIGKILL would stop it: nothing is saved at the interruption) and then started again with fresh
objects, as a restarted script would be. :func:`final_state` gathers everything that must come
out identical.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

import attrs
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

import typedbrain as sb
from typedbrain._checkpoint import Checkpointer
from typedbrain._distributed import get_rank
from typedbrain._sampler import ResumableSampler

Batch = tuple[Tensor, Tensor]
FEATURES: Final = 4
CLASSES: Final = 3


class SimulatedCrashError(Exception):
    """Raised by the harness to stop a run, as SIGKILL would: nothing is saved."""


@attrs.frozen(kw_only=True)
class RunConfig:
    """One drawn training set-up."""

    data_seed: int
    samples: int = 24
    batch_size: int = 4
    epochs: int = 2
    accumulation: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "cpu"
    dropout: float = 0.0
    augment: bool = False
    valid: bool = True
    num_workers: int = 0
    ckpt_interval_steps: int = 2
    shuffle: bool = True
    valid_shuffle: bool = False  # the validation loader shuffles too (make_dataloader's seed)
    valid_loader_generator: bool = False  # a DataLoader shuffling the validation set from its own
    user_loader: bool = False  # a plain DataLoader (not positionable) instead of a dataset
    loader_generator: bool = False  # that DataLoader shuffles from a generator of its own
    user_sampler: bool = False  # a plain DataLoader over a ResumableSampler instead
    # make_dataloader given a sampler of yours, a RandomSampler drawing from its own generator
    kwargs_sampler: bool = False
    valid_num_workers: int = 0
    signal_at: int | None = None  # send this process SIGTERM at this forward pass
    signal_rank: int | None = None  # under a process group: only this rank signals itself
    kill_at_save: int | None = None  # SIGKILL this process in the middle of its n-th save
    user_save_at: int | None = None  # save a checkpoint from on_fit_batch_end at this pass
    # Also save a checkpoint in this hook, every epoch: on_stage_start(TRAIN), on_stage_end(TRAIN)
    # (after logging and stepping the scheduler) or on_stage_start(VALID).
    save_point: Literal["none", "train_start", "train_end", "valid_start"] = "none"
    stop_on_signals: bool = True
    fsdp: bool = False  # under a process group: shard the model with FSDP2 instead of DDP
    # The checkpointer commits in a background thread (a save returns before its commit).
    commit_in_background: bool = False
    # The recipe draws from Python's, NumPy's and torch's generators in on_fit_start, after the
    # recovery (its own set-up, say): a resumed run must still train as the interrupted one.
    draw_in_fit_start: bool = False
    # The learning-rate schedule: StepLR stepped as each epoch's training ends, OneCycleLR stepped
    # after every optimizer step (from on_fit_batch_end), or ReduceLROnPlateau stepped on the
    # last stage's loss of each epoch.
    schedule: Literal["step_epoch", "onecycle_batch", "plateau"] = "step_epoch"
    # Two optimizers (Adam for the first layer, SGD with momentum for the last) that
    # freeze_optimizers alternates between, one per optimizer step; the schedule drives the first.
    two_optimizers: bool = False


class NoisyDataset(Dataset[Batch]):
    """Fixed examples; with ``augment``, each item gets noise from Python, NumPy and torch."""

    def __init__(self, seed: int, samples: int, augment: bool) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(samples, FEATURES, generator=generator)
        self.targets = torch.randint(0, CLASSES, (samples,), generator=generator)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Batch:
        inputs = self.inputs[index]
        if self.augment:
            noise = random.random() + float(np.random.rand()) + torch.rand(FEATURES)
            inputs = inputs + 0.01 * noise
        return inputs, self.targets[index]


class LossLog:
    """Every stage's loss by (stage, epoch): a training log that is saved with the run."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, int, float]] = []

    def state_dict(self) -> dict[str, object]:
        return {"entries": [list(entry) for entry in self.entries]}

    def load_state_dict(self, state: Mapping[str, object], /) -> None:
        entries = state["entries"]
        assert isinstance(entries, list)
        self.entries = [(str(s), int(e), float(v)) for s, e, v in entries]


class Tripwire:
    """A recoverable that kills the process while its ``at``-th checkpoint is being written.

    It is saved after the model, the counter and the log, and before the brain's own state and
    the optimizer, so the folder it leaves behind has some files and no manifest.
    """

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.saves = 0

    def state_dict(self) -> dict[str, object]:
        self.saves += 1
        if self.saves == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    def load_state_dict(self, state: Mapping[str, object], /) -> None:
        del state


class HarnessBrain(sb.Brain[Batch, Tensor]):
    """Counts forward passes and raises :class:`SimulatedCrashError` at ``stop_at`` (if set)."""

    stop_at: int | None = None
    forward_calls = 0
    log: LossLog
    scheduler: torch.optim.lr_scheduler.LRScheduler
    counter: sb.EpochCounter
    ckpt: Checkpointer

    def compute_forward(self, batch: Batch, stage: sb.Stage) -> Tensor:
        self.forward_calls += 1
        if self.forward_calls == self.hparams["signal_at"] and self.hparams["signal_rank"] in (
            None,
            get_rank(),
        ):
            os.kill(os.getpid(), signal.SIGTERM)
        if self.stop_at is not None and self.forward_calls == self.stop_at:
            raise SimulatedCrashError(f"stopped at forward pass {self.forward_calls}")
        inputs, _ = batch
        return self.modules["model"](inputs.to(self.device))  # type: ignore[no-any-return]  # ModuleDict items are untyped

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: sb.Stage) -> Tensor:
        _, targets = batch
        return torch.nn.functional.cross_entropy(predictions.float(), targets.to(self.device))

    def init_optimizers(self) -> None:
        if self.hparams["two_optimizers"]:
            layers = self.modules["model"]
            assert isinstance(layers, torch.nn.Sequential)  # not wrapped: one process only
            first = torch.optim.Adam(layers[0].parameters(), lr=0.01)
            last = torch.optim.SGD(layers[-1].parameters(), lr=0.05, momentum=0.9)
            self.optimizers_dict = {"first": first, "last": last}
            self.optimizer = first
            self.ckpt.add_recoverables({"first": first, "last": last})
        else:
            super().init_optimizers()
        schedule = self.hparams["schedule"]
        if schedule == "onecycle_batch":
            passes = self.hparams["passes"]
            assert isinstance(passes, int)
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=0.05, total_steps=passes
            )
        elif schedule == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=0.5, patience=0
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        self.ckpt.add_recoverable("scheduler", self.scheduler)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams["draw_in_fit_start"]:
            random.random()
            np.random.rand()
            torch.rand(1)

    def on_stage_start(self, stage: sb.Stage, epoch: int | None = None) -> None:
        point = {sb.Stage.TRAIN: "train_start", sb.Stage.VALID: "valid_start"}.get(stage)
        if point == self.hparams["save_point"]:
            self.ckpt.save_checkpoint(meta={"by": point}, end_of_epoch=False)

    def on_stage_end(self, stage: sb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        assert epoch is not None
        self.log.entries.append((stage.name, epoch, stage_loss))
        if stage is sb.Stage.TRAIN:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.StepLR):
                self.scheduler.step()
            if self.hparams["save_point"] == "train_end":
                self.ckpt.save_checkpoint(meta={"by": "train_end"}, end_of_epoch=False)
        last_stage = sb.Stage.VALID if self.hparams["valid"] else sb.Stage.TRAIN
        if stage is last_stage:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(stage_loss)
            self.ckpt.save_and_keep_only(meta={"loss": stage_loss}, min_keys=["loss"])


class BatchHookBrain(HarnessBrain):
    """Also acts after each training batch: saves a checkpoint itself at pass ``user_save_at``
    and steps a per-batch schedule after each optimizer step.

    Overriding that hook takes the brain off the inline step path, so only runs that ask for
    it use this class.
    """

    def on_fit_batch_end(
        self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
    ) -> None:
        if should_step and self.hparams["schedule"] == "onecycle_batch":
            self.scheduler.step()
        if self.forward_calls == self.hparams["user_save_at"]:
            self.ckpt.save_checkpoint(meta={"by": "on_fit_batch_end"}, end_of_epoch=False)


class AlternatingBrain(HarnessBrain):
    """Steps its two optimizers in turn: the first at even optimizer steps, the last at odd."""

    def freeze_optimizers(
        self, optimizers: Mapping[str, torch.optim.Optimizer]
    ) -> Mapping[str, torch.optim.Optimizer]:
        name = "first" if self.optimizer_step % 2 == 0 else "last"
        return {name: optimizers[name]}


class AlternatingBatchHookBrain(AlternatingBrain, BatchHookBrain):
    """Both of the above."""


BRAIN_CLASSES: Final[dict[tuple[bool, bool], type[HarnessBrain]]] = {
    # (acts after each batch, alternates two optimizers)
    (False, False): HarnessBrain,
    (True, False): BatchHookBrain,
    (False, True): AlternatingBrain,
    (True, True): AlternatingBatchHookBrain,
}


def build(config: RunConfig, folder: Path, *, seed: int) -> tuple[HarnessBrain, sb.EpochCounter]:
    """Everything a recipe script builds, seeded the way a script seeds itself."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 8),
        torch.nn.Dropout(config.dropout),
        torch.nn.ReLU(),
        torch.nn.Linear(8, CLASSES),
    )
    counter = sb.EpochCounter(config.epochs)
    log = LossLog()
    checkpointer = Checkpointer(
        folder,
        recoverables={
            "model": model,
            "counter": counter,
            "log": log,
            "tripwire": Tripwire(config.kill_at_save),
        },
        commit_in_background=config.commit_in_background,
    )
    batch_hook = config.user_save_at is not None or config.schedule == "onecycle_batch"
    brain_class = BRAIN_CLASSES[batch_hook, config.two_optimizers]
    brain = brain_class(
        modules={"model": model},
        opt_class=lambda params: torch.optim.Adam(params, lr=0.01),
        hparams={
            "valid": config.valid,
            "signal_at": config.signal_at,
            "signal_rank": config.signal_rank,
            "user_save_at": config.user_save_at,
            "save_point": config.save_point,
            "draw_in_fit_start": config.draw_in_fit_start,
            "schedule": config.schedule,
            "two_optimizers": config.two_optimizers,
            "passes": total_forward_passes(config),  # more than the optimizer steps
        },
        run_opts={
            "precision": config.precision,
            "grad_accumulation_factor": config.accumulation,
            "ckpt_interval_steps": config.ckpt_interval_steps,
            "noprogressbar": True,
            "device": config.device,
            "stop_on_signals": config.stop_on_signals,
            "fsdp": config.fsdp,
        },
        checkpointer=checkpointer,
    )
    brain.log = log
    brain.counter = counter
    brain.ckpt = checkpointer
    return brain, counter


def run(
    config: RunConfig,
    folder: Path,
    *,
    stop_at: int | None = None,
    script_seed: int | None = None,
    batch_size: int | None = None,
) -> HarnessBrain:
    """Train ``config``, checkpointing in ``folder``; crash at forward pass ``stop_at``.

    ``script_seed`` is what the script seeds its generators with (default: the data seed);
    ``batch_size`` overrides the training batch size (a restart that changed it).
    """
    brain, counter = build(
        config, folder, seed=config.data_seed if script_seed is None else script_seed
    )
    brain.stop_at = stop_at
    train = NoisyDataset(config.data_seed, config.samples, config.augment)
    valid = NoisyDataset(config.data_seed + 1, config.samples // 2, config.augment)
    train_batch = config.batch_size if batch_size is None else batch_size
    loader_kwargs: sb.LoaderKwargs = {
        "batch_size": train_batch,
        "shuffle": config.shuffle,
        "num_workers": config.num_workers,
    }
    train_set: sb.DataSource = train
    if config.user_loader:
        own = torch.Generator().manual_seed(config.data_seed) if config.loader_generator else None
        train_set = DataLoader(train, batch_size=train_batch, shuffle=config.shuffle, generator=own)
    elif config.user_sampler:
        sampler = ResumableSampler(train, shuffle=config.shuffle, seed=config.data_seed)
        train_set = DataLoader(train, batch_size=train_batch, sampler=sampler)
    elif config.kwargs_sampler:
        drawn_from = torch.Generator().manual_seed(config.data_seed)
        del loader_kwargs["shuffle"]  # the sampler orders the epoch
        loader_kwargs["sampler"] = RandomSampler(train, generator=drawn_from)
    valid_set: sb.DataSource = valid
    if config.valid_loader_generator:
        own_valid = torch.Generator().manual_seed(config.data_seed + 1)
        valid_set = DataLoader(
            valid, batch_size=config.batch_size, shuffle=True, generator=own_valid
        )
    valid_kwargs: sb.LoaderKwargs = {
        "batch_size": config.batch_size,
        "num_workers": config.valid_num_workers,
        "shuffle": config.valid_shuffle,
    }
    brain.fit(  # loader options for the sets the brain makes loaders of
        counter,
        train_set,
        valid_set if config.valid else None,
        train_loader_kwargs=None if isinstance(train_set, DataLoader) else loader_kwargs,
        valid_loader_kwargs=None if isinstance(valid_set, DataLoader) else valid_kwargs,
    )
    return brain


def total_forward_passes(config: RunConfig) -> int:
    """How many forward passes an uninterrupted run makes."""
    train = -(-config.samples // config.batch_size)
    valid = -(-(config.samples // 2) // config.batch_size) if config.valid else 0
    return config.epochs * (train + valid)


def final_state(brain: HarnessBrain) -> dict[str, object]:
    """Everything that must be identical after an interrupted and resumed run."""
    return {
        "model": brain.modules.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in brain.optimizers_dict.items()},
        "scheduler": brain.scheduler.state_dict(),
        "counter": brain.counter.state_dict(),
        "optimizer_step": brain.optimizer_step,
        "log": list(brain.log.entries),
        "rng": torch.get_rng_state(),
        "scaler": brain.scaler.state_dict(),  # empty unless fp16
        # The generators of the devices the run used (none on a CPU run).
        "cuda_rng": torch.cuda.get_rng_state_all() if brain.device.startswith("cuda") else [],
    }


def differences(left: object, right: object, path: str = "$") -> list[str]:
    """Where two nested states differ, compared exactly (tensors bit for bit)."""
    if isinstance(left, Tensor) and isinstance(right, Tensor):
        if left.device != right.device:  # a resumed tensor must be where the original was
            return [f"{path} on {left.device} != {right.device}"]
        same = left.dtype == right.dtype and left.shape == right.shape and torch.equal(left, right)
        return [] if same else [path]
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        if set(left) != set(right):
            return [f"{path} keys {sorted(map(str, left))} != {sorted(map(str, right))}"]
        return [d for key in left for d in differences(left[key], right[key], f"{path}.{key}")]
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        if len(left) != len(right):
            return [f"{path} length {len(left)} != {len(right)}"]
        return [
            d
            for index, (a, b) in enumerate(zip(left, right, strict=True))
            for d in differences(a, b, f"{path}[{index}]")
        ]
    return [] if left == right else [f"{path}: {left!r} != {right!r}"]

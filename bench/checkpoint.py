"""Cost of typedbrain's checkpoints against plain ``torch.save`` / ``torch.load``.

Usage::

    python bench/checkpoint.py [--repeats N] [--quick] [--dir PATH]

Part (b), save/load cost: an MLP (about 25 M float32 parameters, 100 MB; ``--quick``: about
2.5 M) and its Adam optimizer (state filled by one step), 307 MB in all, both sides starting
from and ending in the same state:

* save: ``Checkpointer.save_checkpoint`` (one file per object written through a SHA-256 hashing
  stream, each fsynced, then an atomically renamed, fsynced manifest) against plain
  ``torch.save`` of the two state dicts to new files, and against plain ``torch.save`` plus
  ``os.fsync`` of both files and their folder (what saving durably costs anyway).
* load: ``Checkpointer.recover_if_possible`` (find the newest checkpoint, check every file's size
  and SHA-256 while decoding it with ``torch.load(weights_only=True)``, then
  ``load_state_dict``) against ``torch.load(path, weights_only=True)`` + ``load_state_dict``,
  into the same model and optimizer. For context: the plain load preceded by ``hashlib``'s
  SHA-256 of both files (checking them by hand, one after the other), and that hashing alone,
  which is the work typedbrain's load cannot avoid on top of the plain one.

Every repetition writes new files on both sides (the previous round's are deleted untimed).
Repetitions alternate the order of the two sides; the table shows medians and the ratio
typedbrain / plain. The issue's target is a ratio of at most 1.2 against plain ``torch.save``
and plain ``torch.load``; PASS/MISS is printed for those rows, the fsync row is for context.
The exit status is 0 either way: this is a benchmark, not a test.

Part (a), resume cost: an epoch of 1,001,000 one-item batches over a lazy dataset (nothing is
stored), and an intra-epoch checkpoint taken after 0, 10^3, 10^5 or 10^6 batches (``--quick``:
up to 10^5). Measured: the time from ``fit()`` to the first batch it trains, which includes
recovering the checkpoint and positioning the loader. The ratio is against resuming at batch
0; it must stay flat (at most 1.5: the positions differ by a factor of a million).

Each part is one function returning table rows, listed in ``PARTS``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import attrs
import torch
from torch.utils.data import Dataset

from typedbrain import Brain, EpochCounter, Phase, Stage
from typedbrain._checkpoint import Checkpoint, Checkpointer
from typedbrain._rng import capture_rng

TARGET_RATIO: Final = 1.2


@attrs.frozen
class Row:
    """One line of a result table: a measurement of typedbrain against its plain baseline."""

    part: str
    what: str
    typedbrain_s: float
    plain_s: float
    target: float | None

    @property
    def ratio(self) -> float:
        return self.typedbrain_s / self.plain_s

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.ratio <= self.target else "MISS"


@attrs.frozen
class Options:
    repeats: int
    quick: bool
    directory: Path | None


def _model(quick: bool) -> torch.nn.Module:
    width = 1000 if quick else 3200
    torch.manual_seed(0)
    # Two hidden layers: 2 * width^2 + small terms parameters (20.5 M at 3200, plus the ends).
    return torch.nn.Sequential(
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width // 2),
    )


def _adam(model: torch.nn.Module) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = next(iter(model.parameters()))
    model(torch.randn(2, first.shape[1])).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def part_save_load(options: Options) -> list[Row]:
    """Save and load time of a Checkpointer checkpoint against plain torch.save / torch.load."""
    model = _model(options.quick)
    optimizer = _adam(model)
    parameters = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=options.directory) as directory:
        folder = Path(directory)
        checkpointer = Checkpointer(folder / "typedbrain", {"model": model, "optimizer": optimizer})
        rounds = itertools.count()
        plain_folders: list[Path] = []

        def new_plain_folder() -> Path:
            plain = folder / f"plain{next(rounds)}"
            plain.mkdir()
            plain_folders.append(plain)
            return plain

        def plain_save() -> None:
            plain = new_plain_folder()
            torch.save(model.state_dict(), plain / "model.pt")
            torch.save(optimizer.state_dict(), plain / "optimizer.pt")

        def plain_durable_save() -> None:
            plain = new_plain_folder()
            for name, state in (
                ("model", model.state_dict()),
                ("optimizer", optimizer.state_dict()),
            ):
                torch.save(state, plain / f"{name}.pt")
                _fsync(plain / f"{name}.pt")
            _fsync(plain)

        def plain_load() -> None:
            plain = plain_folders[-1]
            model.load_state_dict(torch.load(plain / "model.pt", weights_only=True))
            optimizer.load_state_dict(torch.load(plain / "optimizer.pt", weights_only=True))

        def plain_hash() -> None:
            for name in ("model", "optimizer"):
                _sha256(plain_folders[-1] / f"{name}.pt")

        def plain_checked_load() -> None:
            plain_hash()
            plain_load()

        saved: list[Checkpoint] = []

        def typed_save() -> None:
            saved.append(checkpointer.save_checkpoint())

        def typed_load() -> None:
            recovered = checkpointer.recover_if_possible()
            assert recovered == saved[-1]

        actions: dict[str, Callable[[], None]] = {
            "typed save": typed_save,
            "plain save": plain_save,
            "plain durable save": plain_durable_save,
            "typed load": typed_load,
            "plain load": plain_load,
            "plain checked load": plain_checked_load,
            "plain hash": plain_hash,
        }
        times: dict[str, list[float]] = {name: [] for name in actions}
        # One untimed round first: page cache, allocator and lazy imports warm up.
        for round_index in range(options.repeats + 1):
            order = list(actions) if round_index % 2 else list(reversed(actions))
            # Loads follow saves, so each side loads what it has just written.
            order.sort(key=lambda name: not name.endswith("save"))
            for name in order:
                # Untimed: write back what earlier actions left in the page cache, so no action
                # pays for another's writes (plain torch.save does not wait for its own).
                os.sync()
                elapsed = _timed(actions[name])
                if round_index:
                    times[name].append(elapsed)
            # Untimed: only the newest files of each side stay on disk.
            for old in saved[:-1]:
                shutil.rmtree(old.path)
            del saved[:-1]
            for plain in plain_folders[:-1]:
                shutil.rmtree(plain)
            del plain_folders[:-1]
        size_mb = sum(p.stat().st_size for p in plain_folders[-1].iterdir()) / 1e6

    label = f"{parameters / 1e6:.1f} M params + Adam, {size_mb:.0f} MB"
    median = statistics.median

    def row(what: str, typed: str, plain: str, target: float | None) -> Row:
        return Row("save/load", what, median(times[typed]), median(times[plain]), target)

    return [
        row(f"save vs torch.save ({label})", "typed save", "plain save", TARGET_RATIO),
        row("save vs torch.save + fsync", "typed save", "plain durable save", None),
        row("load vs torch.load + load_state_dict", "typed load", "plain load", TARGET_RATIO),
        row(
            "load vs SHA-256 of each file, then the plain load",
            "typed load",
            "plain checked load",
            None,
        ),
        row(
            "(floor) SHA-256 of the files alone vs the plain load", "plain hash", "plain load", None
        ),
    ]


# ------------------------------------------------------------------------------------------
# Part (a): what resuming costs, by how far into the epoch the checkpoint was taken

RESUME_POSITIONS: Final = (0, 1_000, 100_000, 1_000_000)
FLAT_RATIO: Final = 1.5  # resuming deep into an epoch may cost at most this much more


class _LazyItems(Dataset[torch.Tensor]):
    """A dataset of ``length`` items made on demand (nothing is stored)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((4,), float(index))


class _FirstBatchReached(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Stops ``fit`` at the first batch it trains."""


class _ResumeBrain(Brain[torch.Tensor, torch.Tensor]):
    def compute_forward(self, batch: torch.Tensor, stage: Stage) -> torch.Tensor:
        raise _FirstBatchReached

    def compute_objectives(
        self, predictions: torch.Tensor, batch: torch.Tensor, stage: Stage
    ) -> torch.Tensor:
        return predictions.sum()


def _resume_brain(folder: Path) -> tuple[_ResumeBrain, EpochCounter]:
    model = torch.nn.Linear(4, 1)
    counter = EpochCounter(1)
    checkpointer = Checkpointer(folder, {"model": model, "counter": counter})
    brain = _ResumeBrain(
        {"model": model},
        lambda params: torch.optim.SGD(params, lr=0.1),
        run_opts={"noprogressbar": True, "device": "cpu"},
        checkpointer=checkpointer,
    )
    return brain, counter


def _checkpoint_at(folder: Path, data: Dataset[torch.Tensor], position: int) -> None:
    """Write the intra-epoch checkpoint a run stopped after ``position`` batches would leave.

    Running a million batches first would take long; the brain's counters are set to what they
    would be instead, and its own save routine writes the checkpoint.
    """
    brain, counter = _resume_brain(folder)
    loader = brain.make_dataloader(data, Stage.TRAIN, batch_size=1, shuffle=True)
    brain.init_optimizers()
    next(iter(counter))
    brain._train_loader = loader
    brain._epoch = 1
    brain._in_train_stage = True
    brain._epoch_rng = capture_rng()
    brain.step = position
    brain._machine.move(Phase.FIT_START)
    brain._machine.move(Phase.TRAIN)
    brain._save_intra_epoch_ckpt()


def _time_to_first_batch(folder: Path, data: Dataset[torch.Tensor]) -> float:
    brain, counter = _resume_brain(folder)
    start = time.perf_counter()
    try:
        brain.fit(counter, data, train_loader_kwargs={"batch_size": 1, "shuffle": True})
    except _FirstBatchReached:
        return time.perf_counter() - start
    raise RuntimeError("fit() ended without training a batch")


def part_resume(options: Options) -> list[Row]:
    """(a) Time from ``fit()`` to the first trained batch, resuming at growing positions."""
    positions = RESUME_POSITIONS[:3] if options.quick else RESUME_POSITIONS
    data = _LazyItems(positions[-1] + 1_000)
    samples: dict[int, list[float]] = {position: [] for position in positions}
    with tempfile.TemporaryDirectory(dir=options.directory) as root:
        for position in positions:
            _checkpoint_at(Path(root) / str(position), data, position)
        _time_to_first_batch(Path(root) / str(positions[0]), data)  # warm-up, not timed
        for _ in range(options.repeats):
            for position in positions:
                samples[position].append(_time_to_first_batch(Path(root) / str(position), data))
    base = statistics.median(samples[positions[0]])
    return [
        Row(
            part="resume",
            what=f"resume at batch {position:,} (vs batch 0)",
            typedbrain_s=statistics.median(samples[position]),
            plain_s=base,
            target=None if position == 0 else FLAT_RATIO,
        )
        for position in positions
    ]


PARTS: Final[Sequence[Callable[[Options], list[Row]]]] = (part_resume, part_save_load)
"""The benchmark's parts, run in order; each returns its table rows."""


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            models = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
    except OSError:
        models = []
    if models:
        cpu = models[0]
    load = f", load average {os.getloadavg()[0]:.2f} at start" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} CPUs{load}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )


def print_table(rows: Sequence[Row], repeats: int, machine: str) -> None:
    """Print ``rows`` as a Markdown table with medians over ``repeats`` runs."""
    print(f"machine: {machine}; medians of {repeats} interleaved repetitions")
    print()
    print("| part | measurement | typedbrain (s) | plain (s) | ratio | target | |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        target = f"<= {row.target:.2f}" if row.target is not None else ""
        print(
            f"| {row.part} | {row.what} | {row.typedbrain_s:.3f} | {row.plain_s:.3f} | "
            f"{row.ratio:.2f} | {target} | {row.verdict} |"
        )
    print()
    print(
        f"Target (the issue's): typedbrain / plain torch.save and torch.load <= {TARGET_RATIO}; "
        "rows without a target are context (torch.save + fsync is what a durable save costs "
        "without typedbrain; the floor row is hashlib's SHA-256 of the plain files, which no "
        "checked load can skip). PASS/MISS compares the medians above; the exit status is 0 "
        "either way."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--quick", action="store_true", help="a 10x smaller model")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    arguments = parser.parse_args(argv)
    options = Options(
        repeats=max(1, arguments.repeats), quick=arguments.quick, directory=arguments.dir
    )
    machine = _machine()
    rows = [row for part in PARTS for row in part(options)]
    print_table(rows, options.repeats, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())

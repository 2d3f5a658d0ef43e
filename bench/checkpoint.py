"""Cost of typedbrain's checkpoints against plain ``torch.save`` / ``torch.load``.

Usage::

    python bench/checkpoint.py [--repeats N] [--quick] [--dir PATH]

Part (b), save/load cost: an MLP (about 25 M float32 parameters, 100 MB; ``--quick``: about
2.5 M) and its Adam optimizer (state filled by one step), 307 MB in all, both sides starting
from and ending in the same state:

* save: ``Checkpointer.save_checkpoint`` (one file per object written through a stream that
  takes the SHA-256 of each 16 MiB piece, the pieces of a large write in parallel threads, each
  file fsynced, then an atomically renamed, fsynced manifest) against plain
  ``torch.save`` of the two state dicts to new files, and against plain ``torch.save`` plus
  ``os.fsync`` of both files and their folder (what saving durably costs anyway). Twice: with
  a ``Checkpointer(commit_in_background=True)``, timed until ``save_checkpoint`` returns (the
  files written; what a training loop waits for) and until ``wait()`` returns (the hashing,
  the fsyncs and the commit, which ran in a background thread, done), and with the default
  checkpointer, whose save returns once committed.
* load: ``Checkpointer.recover_if_possible`` (find the newest checkpoint, check every file's
  size and the SHA-256 of its pieces in parallel threads while decoding it with
  ``torch.load(weights_only=True)``, the model's file memory-mapped for ``load_state_dict`` to
  copy from, then ``load_state_dict``) against ``torch.load(path, weights_only=True)`` +
  ``load_state_dict``, into the same model and optimizer. For context: the plain load preceded
  by ``hashlib``'s SHA-256 of both files (checking them by hand, one after the other); that
  hashing alone; and the SHA-256 of the files' pieces alone, in as many threads as typedbrain's
  load hashes them with, which is the work typedbrain's load cannot avoid on top of the plain
  one.
* models of a checked load, for the checksum decision the 1.2x target needs: the plain files
  decoded as typedbrain decodes them (the model's memory-mapped, the optimizer's read) while
  their pieces are hashed in that many threads, without a
  checksum, with SHA-256 (which models typedbrain's load) and with each checksum of
  ``OTHER_CHECKSUMS`` whose package is installed (BLAKE3, cryptographic; XXH3-128, not); and
  each of those checksums of the files alone.

Every repetition writes new files on both sides (the previous round's are deleted untimed).
Repetitions alternate the order of the two sides; the table shows medians, the ratio
typedbrain / plain and each side's range (the plain load alone ranges over 2-4x here: fresh
memory for the loaded tensors costs what the kernel and the allocator make it cost at the
moment). So the loads are measured twice: again and again in the benchmark's process, and as
a resumed job makes its load, the first in a new process (one per repetition and side, the
model and optimizer built untimed; the files of the last repetition). The issue's
target is a ratio of at most 1.2 against plain ``torch.save`` and plain ``torch.load``;
PASS/MISS is printed for those rows, the others are for context.
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
import functools
import hashlib
import importlib
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Protocol, cast

import attrs
import torch
from torch.utils.data import Dataset
from typing_extensions import Buffer

from typedbrain import Brain, EpochCounter, Phase, Stage
from typedbrain._checkpoint import Checkpoint, Checkpointer
from typedbrain._manifest import PIECE_BYTES, hash_workers, pieces
from typedbrain._rng import capture_rng

TARGET_RATIO: Final = 1.2


@attrs.frozen
class Row:
    """One line of a result table: a measurement of typedbrain against its plain baseline.

    ``typedbrain`` and ``plain`` are the timed samples in seconds; the table shows their
    medians, their ratio and their ranges.
    """

    part: str
    what: str
    typedbrain: tuple[float, ...]
    plain: tuple[float, ...]
    target: float | None

    @property
    def typedbrain_s(self) -> float:
        return statistics.median(self.typedbrain)

    @property
    def plain_s(self) -> float:
        return statistics.median(self.plain)

    @property
    def ranges(self) -> str:
        """The samples' ranges, ``min..max`` of typedbrain's, then of the plain ones."""
        return " / ".join(
            f"{min(samples):.3f}..{max(samples):.3f}" for samples in (self.typedbrain, self.plain)
        )

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


class _Hash(Protocol):
    """The part of a hash object the benchmark uses (hashlib's, blake3's and xxhash's)."""

    def update(self, data: Buffer, /) -> object: ...

    def hexdigest(self) -> str: ...


OTHER_CHECKSUMS: Final = (("BLAKE3", "blake3", "blake3"), ("XXH3-128", "xxhash", "xxh3_128"))
"""Checksums measured when their package is installed: (label, module, constructor)."""


def _other_checksums() -> dict[str, Callable[[], _Hash]]:
    """The constructors of the ``OTHER_CHECKSUMS`` whose packages are installed, by label."""
    found: dict[str, Callable[[], _Hash]] = {}
    for label, module_name, attribute in OTHER_CHECKSUMS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        constructor: Callable[[], _Hash] = getattr(module, attribute)
        found[label] = constructor
    return found


def _digest(path: Path, new_hash: Callable[[], _Hash]) -> str:
    """The hex digest of the file ``path``, read in 4 MiB chunks (as typedbrain reads it)."""
    digest = new_hash()
    with path.open("rb", buffering=0) as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_piece(path: Path, offset: int, length: int, new_hash: Callable[[], _Hash]) -> str:
    """The hex digest of ``length`` bytes of the file ``path`` from ``offset`` (4 MiB reads)."""
    digest = new_hash()
    with path.open("rb", buffering=0) as stream:
        stream.seek(offset)
        while length > 0 and (chunk := stream.read(min(1 << 22, length))):
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


def _digest_pieces(
    paths: Sequence[Path], new_hash: Callable[[], _Hash], pool: ThreadPoolExecutor
) -> list[Future[str]]:
    """Start hashing every ``PIECE_BYTES`` piece of ``paths`` in ``pool``, as typedbrain does."""
    return [
        pool.submit(_digest_piece, path, offset, length, new_hash)
        for path in paths
        for offset, length in pieces(path.stat().st_size, PIECE_BYTES)
    ]


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fresh_load(side: str, typed_folder: Path, plain_folder: Path, quick: bool) -> float:
    """Seconds a new process takes to load the checkpoint of ``side``, as it measures them.

    ``side`` is ``typed`` (``recover_if_possible`` from ``typed_folder``) or ``plain`` (the
    plain load of ``plain_folder``'s files); see :func:`load_worker`.
    """
    command = [sys.executable, __file__, "--load-worker", side, str(typed_folder)]
    command += [str(plain_folder), *(["--quick"] if quick else [])]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(result.stdout.split()[-1])


def load_worker(side: str, typed_folder: Path, plain_folder: Path, quick: bool) -> int:
    """Build the model and optimizer (untimed), time one load of ``side`` and print it.

    What a resumed job does: its first load, into memory the process has not used yet.
    """
    model = _model(quick)
    optimizer = _adam(model)
    if side == "typed":
        checkpointer = Checkpointer(typed_folder, {"model": model, "optimizer": optimizer})
        elapsed = _timed(checkpointer.recover_if_possible)
    else:

        def plain_load() -> None:
            model.load_state_dict(torch.load(plain_folder / "model.pt", weights_only=True))
            optimizer.load_state_dict(torch.load(plain_folder / "optimizer.pt", weights_only=True))

        elapsed = _timed(plain_load)
    print(f"{elapsed:.6f}")
    return 0


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

        def plain_digests(new_hash: Callable[[], _Hash]) -> None:
            for name in ("model", "optimizer"):
                _digest(plain_folders[-1] / f"{name}.pt", new_hash)

        plain_hash = functools.partial(plain_digests, hashlib.sha256)

        def pieces_hash() -> None:
            paths = [plain_folders[-1] / f"{name}.pt" for name in ("model", "optimizer")]
            with ThreadPoolExecutor(hash_workers()) as pool:
                for hashed in _digest_pieces(paths, hashlib.sha256, pool):
                    hashed.result()

        def plain_checked_load() -> None:
            plain_hash()
            plain_load()

        def modelled_load(new_hash: Callable[[], _Hash] | None) -> Callable[[], None]:
            """The plain files decoded as typedbrain decodes them, their pieces hashed meanwhile.

            The model's file is memory-mapped (``torch.load(mmap=True)``: ``load_state_dict``
            copies from the mapping), the optimizer's read, while the pieces are hashed in
            threads (none without a hash).
            """

            def load() -> None:
                paths = [plain_folders[-1] / f"{name}.pt" for name in ("model", "optimizer")]
                with ThreadPoolExecutor(hash_workers()) as pool:
                    digests = _digest_pieces(paths, new_hash, pool) if new_hash else []
                    states = [
                        torch.load(path, weights_only=True, mmap=mapped)
                        for path, mapped in zip(paths, (True, False), strict=True)
                    ]
                    for hashed in digests:
                        hashed.result()  # a real check compares it with the manifest
                model.load_state_dict(cast(dict[str, Any], states[0]))
                optimizer.load_state_dict(cast(dict[str, Any], states[1]))

            return load

        saved: list[Checkpoint] = []
        background = Checkpointer(
            folder / "background",
            {"model": model, "optimizer": optimizer},
            commit_in_background=True,
        )
        saved_background: list[Checkpoint] = []
        returned: list[float] = []  # until the background save returned (timed whole: committed)

        def typed_save() -> None:
            saved.append(checkpointer.save_checkpoint())

        def typed_background_save() -> None:
            start = time.perf_counter()
            saved_background.append(background.save_checkpoint())
            returned.append(time.perf_counter() - start)
            background.wait()

        def typed_load() -> None:
            recovered = checkpointer.recover_if_possible()
            assert recovered == saved[-1]

        actions: dict[str, Callable[[], None]] = {
            "typed save": typed_save,
            "typed background save": typed_background_save,
            "plain save": plain_save,
            "plain durable save": plain_durable_save,
            "typed load": typed_load,
            "plain load": plain_load,
            "plain checked load": plain_checked_load,
            "plain hash": plain_hash,
            "pieces hash": pieces_hash,
            "mapped load": modelled_load(None),
            "SHA-256 mapped load": modelled_load(hashlib.sha256),
        }
        others = _other_checksums()
        for label, new_hash in others.items():
            actions[f"{label} mapped load"] = modelled_load(new_hash)
            actions[f"{label} hash"] = functools.partial(plain_digests, new_hash)
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
            for kept in (saved, saved_background):
                for old in kept[:-1]:
                    shutil.rmtree(old.path)
                del kept[:-1]
            for plain in plain_folders[:-1]:
                shutil.rmtree(plain)
            del plain_folders[:-1]
        # Each side's first load in a new process, as a resumed job makes it.
        for side in ("typed", "plain"):
            times[f"fresh {side} load"] = []
        for round_index in range(options.repeats):
            for side in ("typed", "plain") if round_index % 2 else ("plain", "typed"):
                typed_folder, plain_folder = checkpointer.checkpoints_dir, plain_folders[-1]
                times[f"fresh {side} load"].append(
                    _fresh_load(side, typed_folder, plain_folder, options.quick)
                )
        size_mb = sum(p.stat().st_size for p in plain_folders[-1].iterdir()) / 1e6
        times["typed background save returned"] = returned[1:]  # not the untimed first round

    label = f"{parameters / 1e6:.1f} M params + Adam, {size_mb:.0f} MB"

    def row(what: str, typed: str, plain: str, target: float | None) -> Row:
        return Row("save/load", what, tuple(times[typed]), tuple(times[plain]), target)

    rows = [
        row(
            f"save, committing in the background, until it returns, vs torch.save ({label})",
            "typed background save returned",
            "plain save",
            TARGET_RATIO,
        ),
        row(
            "save, committing in the background, until committed (wait()) vs torch.save + fsync",
            "typed background save",
            "plain durable save",
            None,
        ),
        row(
            "save, default (returns once committed), vs torch.save",
            "typed save",
            "plain save",
            TARGET_RATIO,
        ),
        row("save, default, vs torch.save + fsync", "typed save", "plain durable save", None),
        row(
            "load in a new process (as a resumed job does) vs the plain load in one",
            "fresh typed load",
            "fresh plain load",
            TARGET_RATIO,
        ),
        row(
            "load again in the same process vs torch.load + load_state_dict",
            "typed load",
            "plain load",
            TARGET_RATIO,
        ),
        row(
            "load vs SHA-256 of each file, then the plain load",
            "typed load",
            "plain checked load",
            None,
        ),
        row(
            "(floor) SHA-256 of the files alone, one thread, vs the plain load",
            "plain hash",
            "plain load",
            None,
        ),
        row(
            f"(floor) SHA-256 of the files' 16 MiB pieces alone, {hash_workers()} threads, vs "
            "the plain load",
            "pieces hash",
            "plain load",
            None,
        ),
        row(
            "(model) decoded as typedbrain decodes, no checksum, vs the plain load",
            "mapped load",
            "plain load",
            None,
        ),
        row(
            "(model) decoded as typedbrain decodes, SHA-256 of the pieces in threads, vs the "
            "plain load",
            "SHA-256 mapped load",
            "plain load",
            None,
        ),
    ]
    for label in others:
        rows += [
            row(
                f"(model) decoded as typedbrain decodes, {label} of the pieces in threads, vs the "
                "plain load",
                f"{label} mapped load",
                "plain load",
                None,
            ),
            row(
                f"(floor) {label} of the files alone vs the plain load",
                f"{label} hash",
                "plain load",
                None,
            ),
        ]
    return rows


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
    return [
        Row(
            part="resume",
            what=f"resume at batch {position:,} (vs batch 0)",
            typedbrain=tuple(samples[position]),
            plain=tuple(samples[positions[0]]),
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
    print(
        "| part | measurement | typedbrain (s) | plain (s) | ratio | target | "
        "| min..max (s): typedbrain / plain |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|")
    for row in rows:
        target = f"<= {row.target:.2f}" if row.target is not None else ""
        print(
            f"| {row.part} | {row.what} | {row.typedbrain_s:.3f} | {row.plain_s:.3f} | "
            f"{row.ratio:.2f} | {target} | {row.verdict} | {row.ranges} |"
        )
    print()
    print(
        f"Target (the issue's): typedbrain / plain torch.save and torch.load <= {TARGET_RATIO}; "
        "rows without a target are context (torch.save + fsync is what a durable save costs "
        "without typedbrain; a floor row is one checksum of the plain files alone, which no "
        "load checked with it can skip; the (model) rows are the plain files decoded as "
        "typedbrain decodes them, their pieces hashed in threads meanwhile: with SHA-256 it "
        "models typedbrain's load, with another checksum what that checksum would cost). "
        "PASS/MISS compares the medians above; the exit status is 0 either way."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--quick", action="store_true", help="a 10x smaller model")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument(
        "--load-worker", nargs=3, metavar=("SIDE", "TYPED", "PLAIN"), help=argparse.SUPPRESS
    )
    arguments = parser.parse_args(argv)
    if arguments.load_worker is not None:
        side, typed_folder, plain_folder = arguments.load_worker
        return load_worker(side, Path(typed_folder), Path(plain_folder), arguments.quick)
    options = Options(
        repeats=max(1, arguments.repeats), quick=arguments.quick, directory=arguments.dir
    )
    machine = _machine()
    rows = [row for part in PARTS for row in part(options)]
    print_table(rows, options.repeats, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-step overhead of ``typedbrain.Brain.fit`` against a hand-written PyTorch loop.

Usage::

    python bench/overhead.py [--repeats N] [--quick] [--json PATH]

Two models (tiny: ``Linear(10, 10)``, batch 8, MSE; mlp: 64-256-256-10 with ReLU, batch 64,
cross-entropy), SGD for both loops, and two configurations:

``clip-off``
    typedbrain with ``max_grad_norm=0`` against a raw loop doing forward, loss, backward,
    step, zero_grad and ``loss.item()`` for a running mean.
``defaults``
    typedbrain's default options (clipping at 5.0, non-finite loss check) against a raw loop
    with the same ``clip_grad_norm_`` and the same ``math.isfinite(loss.item())`` check.

Each measurement runs in a fresh subprocess (``--worker``) with one torch thread: a warm-up
epoch, then one timed epoch over pre-generated batches. Repetitions alternate raw and
typedbrain; the table shows medians per step. Targets are printed as PASS/MISS, but the exit
status is 0 either way: this is a benchmark, not a test. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, TypeAlias, get_args

import attrs
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from typedbrain import Brain, RunOptionsDict, Stage

Batch: TypeAlias = tuple[Tensor, Tensor]
LossFn: TypeAlias = Callable[[Tensor, Tensor], Tensor]
ModelName: TypeAlias = Literal["tiny", "mlp"]
ConfigName: TypeAlias = Literal["clip-off", "defaults", "hooked"]
LoopName: TypeAlias = Literal["raw", "typedbrain"]

MODELS: Final[tuple[ModelName, ...]] = get_args(ModelName)
CONFIGS: Final[tuple[ConfigName, ...]] = get_args(ConfigName)
LOOPS: Final[tuple[LoopName, ...]] = get_args(LoopName)

LEARNING_RATE: Final = 0.01
MAX_GRAD_NORM: Final = 5.0  # typedbrain's (and SpeechBrain's) default
DATA_SEED: Final = 1234
MODEL_SEED: Final = 0


@attrs.frozen
class StepCounts:
    """Batches in the warm-up epoch and in each timed epoch."""

    warmup: int
    timed: int


# A fresh process runs its first few hundred steps markedly slower (caches, lazy
# initialisation, the interpreter specialising its bytecode): the warm-up epoch is as long as a
# timed one, and each worker times TIMED_EPOCHS epochs and reports their median.
FULL_STEPS: Final[dict[ModelName, StepCounts]] = {
    "tiny": StepCounts(warmup=1000, timed=1000),
    "mlp": StepCounts(warmup=300, timed=300),
}
QUICK_STEPS: Final[dict[ModelName, StepCounts]] = {
    "tiny": StepCounts(warmup=300, timed=300),
    "mlp": StepCounts(warmup=50, timed=50),
}
TIMED_EPOCHS: Final = 3
DEFAULT_REPEATS: Final = 7
QUICK_REPEATS: Final = 3


@attrs.frozen
class Target:
    """What a configuration must achieve: a ratio, or an absolute difference in µs/step."""

    max_ratio: float | None = None
    max_diff_us: float | None = None

    def met(self, ratio: float, diff_us: float) -> bool:
        if self.max_ratio is not None and ratio > self.max_ratio:
            return False
        return self.max_diff_us is None or diff_us <= self.max_diff_us

    @property
    def exists(self) -> bool:
        return self.max_ratio is not None or self.max_diff_us is not None

    def describe(self) -> str:
        if self.max_ratio is not None:
            return f"ratio <= {self.max_ratio:.2f}"
        if self.max_diff_us is not None:
            return f"diff <= {self.max_diff_us:g} us"
        return "(for information)"


TARGETS: Final[dict[tuple[ConfigName, ModelName], Target]] = {
    ("clip-off", "tiny"): Target(max_ratio=1.10),
    ("clip-off", "mlp"): Target(max_ratio=1.03),
    ("defaults", "tiny"): Target(max_diff_us=10.0),
    ("defaults", "mlp"): Target(max_diff_us=10.0),
    # The defaults again, with a per-batch hook overridden: the loop then calls every hook.
    ("hooked", "tiny"): Target(),
    ("hooked", "mlp"): Target(),
}


# ------------------------------------------------------------------------------------------
# Models and data: identical for both loops


@attrs.frozen
class ModelSpec:
    batch_size: int
    in_features: int
    out_features: int
    classify: bool  # cross-entropy on class indices; otherwise MSE on float targets

    def build(self, name: ModelName) -> torch.nn.Module:
        torch.manual_seed(MODEL_SEED)
        if name == "tiny":
            return torch.nn.Linear(self.in_features, self.out_features)
        return torch.nn.Sequential(
            torch.nn.Linear(self.in_features, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, self.out_features),
        )

    def loss_fn(self) -> LossFn:
        return F.cross_entropy if self.classify else F.mse_loss

    def batches(self, count: int, seed: int) -> list[Batch]:
        """``count`` ready batches, the same for a given seed (each its own contiguous tensor)."""
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(count, self.batch_size, self.in_features, generator=generator)
        if self.classify:
            targets = torch.randint(
                0, self.out_features, (count, self.batch_size), generator=generator
            )
        else:
            targets = torch.randn(count, self.batch_size, self.out_features, generator=generator)
        return [(x.clone(), y.clone()) for x, y in zip(inputs, targets, strict=True)]


SPECS: Final[dict[ModelName, ModelSpec]] = {
    "tiny": ModelSpec(batch_size=8, in_features=10, out_features=10, classify=False),
    "mlp": ModelSpec(batch_size=64, in_features=64, out_features=10, classify=True),
}


class ReadyBatches(Dataset[Batch]):
    """A list of ready batches, served one per index."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self._batches = batches

    def __getitem__(self, index: int) -> Batch:
        return self._batches[index]

    def __len__(self) -> int:
        return len(self._batches)


def _as_is(batch: object) -> object:
    # With batch_size=None the loader hands each item to collate_fn on its own.
    return batch


def batch_loader(batches: Sequence[Batch]) -> DataLoader[Batch]:
    """The one data path both loops use: no batching, no collation, no workers."""
    return DataLoader(ReadyBatches(batches), batch_size=None, collate_fn=_as_is)


# ------------------------------------------------------------------------------------------
# The raw loops: what a competent person writes by hand


def raw_epoch_plain(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Batch],
    loss_fn: LossFn,
) -> float:
    """Forward, loss, backward, step, zero_grad; the loss read once for a running mean."""
    total = 0.0
    count = 0
    for inputs, targets in loader:
        loss = loss_fn(model(inputs), targets)
        torch.autograd.backward(loss)  # what loss.backward() calls
        optimizer.step()
        optimizer.zero_grad()
        total += loss.item()
        count += 1
    return total / count if count else math.nan


def raw_epoch_checked(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Batch],
    loss_fn: LossFn,
) -> float:
    """As ``raw_epoch_plain``, plus what typedbrain's defaults do.

    A non-finite loss skips its backward pass and step, and the gradient norm over all
    parameters is clipped to ``MAX_GRAD_NORM``.
    """
    parameters = list(model.parameters())
    total = 0.0
    count = 0
    for inputs, targets in loader:
        loss = loss_fn(model(inputs), targets)
        value = loss.item()
        if not math.isfinite(value):
            continue
        torch.autograd.backward(loss)  # what loss.backward() calls
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        total += value
        count += 1
    return total / count if count else math.nan


# ------------------------------------------------------------------------------------------
# The typedbrain loop


class BenchBrain(Brain[Batch, Tensor]):
    """The same forward pass and loss as the raw loops, as ``Brain`` hooks."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, run_opts: RunOptionsDict) -> None:
        super().__init__(
            modules={"model": model},
            opt_class=lambda params: torch.optim.SGD(params, lr=LEARNING_RATE),
            run_opts=run_opts,
        )
        self.model = model
        self.loss_fn = loss_fn
        self.last_train_loss = math.nan

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        predictions: Tensor = self.model(batch[0])
        return predictions

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        return self.loss_fn(predictions, batch[1])

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is Stage.TRAIN:
            self.last_train_loss = stage_loss


class HookedBenchBrain(BenchBrain):
    """Overrides one per-batch hook (doing nothing more), so the loop calls every hook."""

    def on_fit_batch_end(
        self, batch: Batch, outputs: Tensor, loss: Tensor, should_step: bool
    ) -> None:
        del batch, outputs, loss, should_step


def brain_run_opts(config: ConfigName) -> RunOptionsDict:
    options: RunOptionsDict = {"noprogressbar": True}
    if config == "clip-off":
        options["max_grad_norm"] = 0.0
    return options


# ------------------------------------------------------------------------------------------
# The worker: one measurement in a fresh process


@attrs.frozen
class Measurement:
    """One timed epoch: wall time (the headline) and the main thread's CPU time."""

    elapsed_ns: int
    cpu_ns: int
    steps: int
    mean_loss: float

    @property
    def us_per_step(self) -> float:
        return self.elapsed_ns / self.steps / 1000.0

    @property
    def cpu_us_per_step(self) -> float:
        return self.cpu_ns / self.steps / 1000.0


def measure(
    model_name: ModelName, config: ConfigName, loop: LoopName, steps: StepCounts
) -> Measurement:
    """Warm up on one epoch, then time ``TIMED_EPOCHS`` epochs; the median epoch counts."""
    torch.set_num_threads(1)
    spec = SPECS[model_name]
    model = spec.build(model_name)
    model.train()
    loss_fn = spec.loss_fn()
    warmup_loader = batch_loader(spec.batches(steps.warmup, DATA_SEED))
    timed_loader = batch_loader(spec.batches(steps.timed, DATA_SEED + 1))

    run_epoch: Callable[[DataLoader[Batch]], float]
    if loop == "raw":
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        epoch = raw_epoch_plain if config == "clip-off" else raw_epoch_checked  # hooked: checked

        def run_epoch(loader: DataLoader[Batch]) -> float:
            return epoch(model, optimizer, loader, loss_fn)
    else:
        brain_class = HookedBenchBrain if config == "hooked" else BenchBrain
        brain = brain_class(model, loss_fn, brain_run_opts(config))

        def run_epoch(loader: DataLoader[Batch]) -> float:
            brain.fit(range(1, 2), loader, progressbar=False)
            return brain.last_train_loss

    run_epoch(warmup_loader)
    timings: list[tuple[int, int]] = []
    mean_loss = math.nan
    for _ in range(TIMED_EPOCHS):
        cpu_start = time.thread_time_ns()
        start = time.perf_counter_ns()
        mean_loss = run_epoch(timed_loader)
        timings.append((time.perf_counter_ns() - start, time.thread_time_ns() - cpu_start))
    elapsed = sorted(wall for wall, _ in timings)[len(timings) // 2]
    cpu = sorted(cpu for _, cpu in timings)[len(timings) // 2]
    return Measurement(elapsed_ns=elapsed, cpu_ns=cpu, steps=steps.timed, mean_loss=mean_loss)


# ------------------------------------------------------------------------------------------
# The driver: interleaved repetitions, medians, table


@attrs.frozen
class Result:
    """Both loops' measurements for one configuration and model, repetition by repetition."""

    model: ModelName
    config: ConfigName
    steps: int
    raw: tuple[Measurement, ...]
    typedbrain: tuple[Measurement, ...]

    @property
    def raw_us(self) -> float:
        return statistics.median(m.us_per_step for m in self.raw)

    @property
    def typedbrain_us(self) -> float:
        return statistics.median(m.us_per_step for m in self.typedbrain)

    @property
    def ratio(self) -> float:
        return self.typedbrain_us / self.raw_us

    @property
    def diff_us(self) -> float:
        return self.typedbrain_us - self.raw_us

    @property
    def raw_cpu_us(self) -> float:
        return statistics.median(m.cpu_us_per_step for m in self.raw)

    @property
    def typedbrain_cpu_us(self) -> float:
        return statistics.median(m.cpu_us_per_step for m in self.typedbrain)

    @property
    def paired_ratio(self) -> float:
        """Median over repetitions of typedbrain/raw within a repetition (adjacent runs)."""
        return statistics.median(
            t.us_per_step / r.us_per_step for r, t in zip(self.raw, self.typedbrain, strict=True)
        )

    @property
    def paired_diff_us(self) -> float:
        """Median over repetitions of typedbrain - raw within a repetition."""
        return statistics.median(
            t.us_per_step - r.us_per_step for r, t in zip(self.raw, self.typedbrain, strict=True)
        )

    @property
    def target(self) -> Target:
        return TARGETS[self.config, self.model]

    @property
    def passed(self) -> bool:
        return self.target.met(self.ratio, self.diff_us)

    @property
    def same_loss(self) -> bool:
        """Whether both loops saw the same mean training loss (they did the same work)."""
        return math.isclose(self.raw[0].mean_loss, self.typedbrain[0].mean_loss, rel_tol=1e-6)

    def as_json(self) -> dict[str, object]:
        return {
            "model": self.model,
            "config": self.config,
            "steps": self.steps,
            "raw_us_per_step": self.raw_us,
            "typedbrain_us_per_step": self.typedbrain_us,
            "ratio": self.ratio,
            "diff_us_per_step": self.diff_us,
            "target": self.target.describe(),
            "passed": self.passed,
            "raw_cpu_us_per_step": self.raw_cpu_us,
            "typedbrain_cpu_us_per_step": self.typedbrain_cpu_us,
            "cpu_ratio": self.typedbrain_cpu_us / self.raw_cpu_us,
            "paired_ratio": self.paired_ratio,
            "paired_diff_us_per_step": self.paired_diff_us,
            "cpu_diff_us_per_step": self.typedbrain_cpu_us - self.raw_cpu_us,
            "raw_samples_us": [m.us_per_step for m in self.raw],
            "typedbrain_samples_us": [m.us_per_step for m in self.typedbrain],
            "raw_cpu_samples_us": [m.cpu_us_per_step for m in self.raw],
            "typedbrain_cpu_samples_us": [m.cpu_us_per_step for m in self.typedbrain],
            "raw_mean_loss": self.raw[0].mean_loss,
            "typedbrain_mean_loss": self.typedbrain[0].mean_loss,
            "same_loss": self.same_loss,
        }


def run_worker(
    model: ModelName, config: ConfigName, loop: LoopName, steps: StepCounts
) -> Measurement:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        model,
        "--config",
        config,
        "--loop",
        loop,
        "--warmup",
        str(steps.warmup),
        "--steps",
        str(steps.timed),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {model}/{config}/{loop} failed:\n{done.stderr}")
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    return Measurement(
        elapsed_ns=int(payload["elapsed_ns"]),
        cpu_ns=int(payload["cpu_ns"]),
        steps=int(payload["steps"]),
        mean_loss=float(payload["mean_loss"]),
    )


def run_all(repeats: int, step_counts: dict[ModelName, StepCounts]) -> list[Result]:
    samples: dict[tuple[ConfigName, ModelName, LoopName], list[Measurement]] = {
        (config, model, loop): [] for config in CONFIGS for model in MODELS for loop in LOOPS
    }
    for repeat in range(repeats):
        print(f"repetition {repeat + 1}/{repeats}", file=sys.stderr, flush=True)
        for config in CONFIGS:
            for model in MODELS:
                # Alternate which loop goes first, so neither always runs right after the other.
                order = LOOPS if repeat % 2 == 0 else tuple(reversed(LOOPS))
                for loop in order:
                    found = run_worker(model, config, loop, step_counts[model])
                    samples[config, model, loop].append(found)
    return [
        Result(
            model=model,
            config=config,
            steps=step_counts[model].timed,
            raw=tuple(samples[config, model, "raw"]),
            typedbrain=tuple(samples[config, model, "typedbrain"]),
        )
        for config in CONFIGS
        for model in MODELS
    ]


def format_table(results: Sequence[Result]) -> str:
    header = (
        f"{'config':<9} {'model':<5} {'steps':>5} {'raw us':>8} {'typedbrain us':>13} "
        f"{'ratio':>6} {'diff us':>8}  {'target':<16} {'result':<6}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.config:<9} {r.model:<5} {r.steps:>5} {r.raw_us:>8.1f} "
            f"{r.typedbrain_us:>13.1f} {r.ratio:>6.3f} {r.diff_us:>+8.1f}  "
            f"{r.target.describe():<16} {_verdict(r):<6}"
        )
    return "\n".join(lines)


def _verdict(result: Result) -> str:
    if not result.target.exists:
        return "-"
    return "PASS" if result.passed else "MISS"


def format_details(results: Sequence[Result]) -> str:
    header = (
        f"{'config':<9} {'model':<5} {'paired ratio':>12} {'paired diff':>11} "
        f"{'cpu ratio':>9} {'raw wall min..max':>18} {'tb wall min..max':>18}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        raw_wall = [m.us_per_step for m in r.raw]
        tb_wall = [m.us_per_step for m in r.typedbrain]
        lines.append(
            f"{r.config:<9} {r.model:<5} {r.paired_ratio:>12.3f} {r.paired_diff_us:>+11.1f} "
            f"{r.typedbrain_cpu_us / r.raw_cpu_us:>9.3f} "
            f"{_span(raw_wall):>18} {_span(tb_wall):>18}"
        )
    return "\n".join(lines)


def _span(values: Sequence[float]) -> str:
    return f"{min(values):.1f}..{max(values):.1f}"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment() -> dict[str, object]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "torch_threads": 1,
    }


# ------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repetitions")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
    worker = parser.add_argument_group("worker (internal)")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    worker.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    worker.add_argument("--loop", choices=LOOPS, help=argparse.SUPPRESS)
    worker.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker_main(args: argparse.Namespace) -> None:
    # argparse has checked the choices; these lookups give them their Literal types.
    model = {name: name for name in MODELS}[args.model]
    config = {name: name for name in CONFIGS}[args.config]
    loop = {name: name for name in LOOPS}[args.loop]
    steps = StepCounts(warmup=int(args.warmup), timed=int(args.steps))
    print(json.dumps(attrs.asdict(measure(model, config, loop, steps))))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    quick = bool(args.quick)
    repeats = int(args.repeats) if args.repeats is not None else None
    if repeats is None:
        repeats = QUICK_REPEATS if quick else DEFAULT_REPEATS
    if repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    step_counts = QUICK_STEPS if quick else FULL_STEPS

    env = environment()
    print(
        f"typedbrain overhead benchmark: torch {env['torch']}, {env['cpu']}, 1 thread, "
        f"{repeats} interleaved repetitions{' (quick)' if quick else ''}",
        flush=True,
    )
    start = time.monotonic()
    results = run_all(repeats, step_counts)
    wall = time.monotonic() - start
    print()
    print("median us/step (each repetition a fresh process; warm-up excluded)")
    print(format_table(results))
    print()
    print(
        "medians of per-repetition ratios and differences (raw and typedbrain ran back to "
        "back),\nratio of median main-thread CPU time, and the spread of wall us/step"
    )
    print(format_details(results))
    for r in results:
        if not r.same_loss:
            print(
                f"WARNING: {r.config}/{r.model}: the loops' mean losses differ "
                f"(raw {r.raw[0].mean_loss!r}, typedbrain {r.typedbrain[0].mean_loss!r})"
            )
    print(f"\nwall time {wall:.0f} s")
    if args.json is not None:
        document = {
            "environment": env,
            "repeats": repeats,
            "quick": quick,
            "step_counts": {name: attrs.asdict(counts) for name, counts in step_counts.items()},
            "wall_s": wall,
            "results": [r.as_json() for r in results],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

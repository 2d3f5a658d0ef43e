"""Train a small MLP on scikit-learn's handwritten digits: a complete typed typedbrain recipe.

Run it from the repository root::

    python examples/digits/train.py examples/digits/hparams.yaml --number_of_epochs 5

The pieces, and how the types connect them:

* ``hparams.yaml`` builds the model, the optimizer and scheduler factories, the epoch counter,
  the train loggers and the checkpointer (HyperPyYAML); :class:`DigitsHparams` is its typed
  shape: :func:`typedbrain.structure_hparams` checks every key and type and reports every
  problem at once, with file and line;
* :class:`Batch`, a typed batch, built by :func:`collate`;
* :class:`DigitsBrain`, a ``Brain[Batch, Tensor, DigitsHparams]``: ``self.hparams.lr`` is a
  ``float`` to mypy;
* :func:`main`: parse the command line, load the YAML, create the experiment folder, train with
  intra-epoch checkpoints (stop it with Ctrl-C or SIGTERM and run it again: it resumes exactly),
  then test the checkpoint with the lowest validation error.

The same script runs on several processes, unchanged::

    torchrun --nproc_per_node 2 examples/digits/train.py examples/digits/hparams.yaml

The data (1,797 grey-scale 8x8 images of the digits 0-9) ship with scikit-learn: nothing is
downloaded.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple, NoReturn

import attrs
import numpy as np
import torch
from numpy.typing import NDArray

# scikit-learn ships no type information; stubs/sklearn types the two functions used here.
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import TensorDataset

import typedbrain as tb

logger = logging.getLogger(__name__)

TARGET_ACCURACY: Final = 0.95  # the script exits with status 1 below this test accuracy


@attrs.frozen(kw_only=True)
class DigitsHparams:
    """The hyperparameters of ``hparams.yaml``, typed.

    Keys of the YAML named like a run option (``ckpt_interval_steps``...) are run options and are
    not listed here.
    """

    seed: int
    split_seed: int
    output_folder: str
    save_folder: str
    train_log: str
    train_log_jsonl: str
    number_of_epochs: int
    batch_size: int
    lr: float
    hidden_size: int
    dropout: float
    valid_fraction: float
    test_fraction: float
    model: nn.Module
    opt_class: tb.OptimizerFactory
    lr_scheduler: Callable[[torch.optim.Optimizer], LRScheduler]
    epoch_counter: tb.EpochCounterWithStopper
    train_logger: tb.FileTrainLogger
    jsonl_logger: tb.JsonlTrainLogger
    checkpointer: tb.Checkpointer


class Batch(NamedTuple):
    """One batch: ``(batch, 64)`` float32 pixels in ``[0, 1]`` and ``(batch,)`` int64 labels."""

    pixels: Tensor
    labels: Tensor


def collate(examples: list[tuple[Tensor, ...]]) -> Batch:
    """Stack ``(pixels, label)`` items of a ``TensorDataset`` into a :class:`Batch`."""
    return Batch(
        pixels=torch.stack([pixels for pixels, _ in examples]),
        labels=torch.stack([label for _, label in examples]),
    )


@attrs.frozen
class DigitsSplits:
    """The three datasets; each item is a ``(pixels, label)`` pair of tensors."""

    train: TensorDataset
    valid: TensorDataset
    test: TensorDataset


def _dataset(pixels: NDArray[np.float32], labels: NDArray[np.int64]) -> TensorDataset:
    return TensorDataset(torch.from_numpy(pixels), torch.from_numpy(labels))


def load_splits(split_seed: int, valid_fraction: float, test_fraction: float) -> DigitsSplits:
    """Load the digits, scale the pixels to ``[0, 1]`` and split them, stratified by label."""
    data, target = load_digits(return_X_y=True)
    pixels: NDArray[np.float32] = np.asarray(data, dtype=np.float32) / 16.0  # values are 0..16
    labels: NDArray[np.int64] = np.asarray(target, dtype=np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(
        pixels, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
    )
    # valid_fraction is a share of all the images; rescale it to the share of what is left.
    valid_share = valid_fraction / (1.0 - test_fraction)
    train_x, valid_x, train_y, valid_y = train_test_split(
        rest_x, rest_y, test_size=valid_share, stratify=rest_y, random_state=split_seed
    )
    return DigitsSplits(
        train=_dataset(train_x, train_y),
        valid=_dataset(valid_x, valid_y),
        test=_dataset(test_x, test_y),
    )


class DigitsBrain(tb.Brain[Batch, Tensor, DigitsHparams]):
    """Classifies digits with the ``"model"`` module, measures the error rate, logs, saves.

    Attributes:
        test_accuracy: the accuracy measured by the last ``evaluate``, ``None`` before one.
    """

    test_accuracy: float | None = None
    _errors = 0
    _seen = 0
    _train_loss = math.nan

    def compute_forward(self, batch: Batch, stage: tb.Stage) -> Tensor:
        # nn.Module.__call__ returns Any: the annotation states what this model returns.
        logits: Tensor = self.modules["model"](batch.pixels)  # the loop moved the batch
        return logits

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: tb.Stage) -> Tensor:
        labels = batch.labels
        if stage is not tb.Stage.TRAIN:
            self._errors += int((predictions.argmax(dim=1) != labels).sum().item())
            self._seen += labels.numel()
        return nn.functional.cross_entropy(predictions, labels)

    def init_optimizers(self) -> None:
        super().init_optimizers()
        self.scheduler = self.hparams.lr_scheduler(self.optimizer)
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("lr_scheduler", self.scheduler)

    def on_stage_start(self, stage: tb.Stage, epoch: int | None = None) -> None:
        self._errors = 0
        self._seen = 0

    def on_stage_end(self, stage: tb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        hparams = self.hparams
        if stage is tb.Stage.TRAIN:
            self._train_loss = stage_loss
            return
        # Under torchrun each process saw its own shard: add up the counts of every process
        # (without a process group this is the identity).
        errors, seen = tb.all_reduce_sum(torch.tensor([self._errors, self._seen])).tolist()
        error = errors / seen if seen else math.nan
        if stage is tb.Stage.TEST:
            self.test_accuracy = 1.0 - error
            stats = {"loss": stage_loss, "error": error}
            epochs = {"epoch loaded": hparams.epoch_counter.current}
            for log in (hparams.train_logger, hparams.jsonl_logger):
                log.log_stats(epochs, test_stats=stats)
            return
        assert epoch is not None  # fit() numbers the epochs of its TRAIN and VALID stages
        meta = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        train = {"loss": self._train_loss}
        valid = {"loss": stage_loss, "error": error}
        # Log first, then save: the checkpoint records how far the logs go.
        for log in (hparams.train_logger, hparams.jsonl_logger):
            log.log_stats(meta, train_stats=train, valid_stats=valid)
        self.scheduler.step()
        hparams.epoch_counter.update_metric(error)
        hparams.checkpointer.save_and_keep_only(meta={"error": error}, min_keys=["error"])


def _usage_error(error: Exception) -> NoReturn:
    """Say ``error`` (a mistake in the recipe or in the command line) as argparse would; exit 2.

    No traceback: the message names the key, file or value. What Python noted on the way (the
    key being built, the file being loaded) is said too.
    """
    said = (
        str(error)
        if isinstance(error, tb.ConfigurationError)
        else f"{type(error).__name__}: {error}"
    )
    notes = "".join(f" ({note})" for note in getattr(error, "__notes__", ()))
    print(f"train.py: error: {said}{notes}", file=sys.stderr)
    raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> float:
    """Train and test as the command line says; returns the test accuracy."""
    arguments = tb.parse_arguments_or_exit(argv)
    try:
        loaded = tb.load_hparams(arguments.hparams_file, arguments.overrides)
        yaml_options, rest = tb.split_run_options(loaded)
        hparams = tb.structure_hparams(rest, DigitsHparams, source=str(arguments.hparams_file))
        # Run options: the YAML's keys, then the command line's, each value checked (an
        # interval given on the command line replaces the other one set in the YAML).
        run_opts = tb.RunOptions.from_sources(hparams=yaml_options, run_opts=arguments.run_opts)
    except (tb.ConfigurationError, ImportError, FileNotFoundError) as error:
        # A mistake in the recipe or in an override (a key, a value, an !include: file or a
        # !new: class that does not exist): said like a bad command line.
        _usage_error(error)
    tb.create_experiment_directory(
        hparams.output_folder,
        hyperparams_to_save=arguments.hparams_file,
        overrides=arguments.overrides,
        run_opts=attrs.asdict(run_opts),
    )
    splits = load_splits(hparams.split_seed, hparams.valid_fraction, hparams.test_fraction)
    try:
        brain = DigitsBrain(
            modules={"model": hparams.model},
            opt_class=hparams.opt_class,
            hparams=hparams,
            run_opts=run_opts,
            checkpointer=hparams.checkpointer,
        )
    except tb.ConfigurationError as error:  # a run option this machine cannot honour (device)
        _usage_error(error)
    loader: tb.LoaderKwargs = {"batch_size": hparams.batch_size, "collate_fn": collate}
    brain.fit(
        hparams.epoch_counter,
        splits.train,
        splits.valid,
        train_loader_kwargs={**loader, "shuffle": True},
        valid_loader_kwargs=loader,
    )
    brain.evaluate(splits.test, min_key="error", test_loader_kwargs=loader)
    if brain.test_accuracy is None:  # cannot happen: evaluate() ends with the TEST stage
        raise RuntimeError("evaluate() did not record a test accuracy")
    return brain.test_accuracy


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # A model this small trains fastest on one thread: more threads add synchronisation, and on
    # a busy machine they wait for each other.
    torch.set_num_threads(1)
    test_accuracy = main()
    print(f"test accuracy: {test_accuracy:.2%}")
    sys.exit(0 if test_accuracy >= TARGET_ACCURACY else 1)

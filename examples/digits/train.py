"""Train a small MLP on scikit-learn's handwritten digits with a typed ``Brain``.

This example shows the parts of a typedbrain recipe and how the types connect them:

* :class:`Batch`, a typed batch, and :func:`collate`, which builds it from dataset items;
* :class:`DigitsHparams`, frozen attrs hyperparameters: passed as ``hparams=``, they are
  ``self.hparams`` inside the brain, with their real types;
* :class:`DigitsBrain`, a ``Brain[Batch, Tensor, DigitsHparams]``: ``compute_forward`` takes a
  ``Batch`` and returns logits, ``compute_objectives`` turns them into a loss, and the stage hooks
  count correct predictions to report accuracy;
* :func:`run`, which trains with ``fit`` over an :class:`~typedbrain.EpochCounter` and tests
  with ``evaluate``.

The data (1,797 grey-scale 8x8 images of the digits 0-9) ship with scikit-learn: nothing is
downloaded. Run it from the repository root::

    python examples/digits/train.py

It trains for 20 epochs and reaches about 97% test accuracy in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
from collections.abc import Sequence
from typing import Final, NamedTuple

import attrs
import numpy as np
import torch
from numpy.typing import NDArray

# scikit-learn ships no type information; stubs/sklearn types the two functions used here.
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import typedbrain as tb

logger = logging.getLogger(__name__)

NUM_PIXELS: Final = 64  # 8 x 8 images, flattened
NUM_CLASSES: Final = 10
TARGET_ACCURACY: Final = 0.95  # the script exits with status 1 below this test accuracy


@attrs.frozen(kw_only=True)
class DigitsHparams:
    """The hyperparameters of the digits example.

    None of the names is a run option's name; a field called, say, ``max_grad_norm`` would set
    that run option too.

    Attributes:
        seed: seeds torch: model initialisation, dropout and the order of training batches.
        split_seed: seeds the train / valid / test split, kept apart from ``seed`` so that runs
            with different seeds are tested on the same images.
        epochs: training epochs.
        batch_size: examples per batch.
        lr: Adam's learning rate.
        hidden_size: units in the hidden layer.
        dropout: dropout probability after the hidden layer.
        valid_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing.
    """

    seed: int = 1234
    split_seed: int = 0
    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    hidden_size: int = 128
    dropout: float = 0.1
    valid_fraction: float = 0.1
    test_fraction: float = 0.2


class Batch(NamedTuple):
    """One batch of digits, as :func:`collate` builds it.

    Attributes:
        pixels: ``(batch, 64)`` float32 pixel intensities in ``[0, 1]``.
        labels: ``(batch,)`` int64 digit labels.
    """

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


def load_splits(hparams: DigitsHparams) -> DigitsSplits:
    """Load the digits, scale the pixels to ``[0, 1]`` and split them, stratified by label.

    The split depends on ``hparams.split_seed`` and the two fractions only.
    """
    data, target = load_digits(return_X_y=True)
    pixels: NDArray[np.float32] = np.asarray(data, dtype=np.float32) / 16.0  # values are 0..16
    labels: NDArray[np.int64] = np.asarray(target, dtype=np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(
        pixels,
        labels,
        test_size=hparams.test_fraction,
        stratify=labels,
        random_state=hparams.split_seed,
    )
    # valid_fraction is a share of all the images; rescale it to the share of what is left.
    valid_share = hparams.valid_fraction / (1.0 - hparams.test_fraction)
    train_x, valid_x, train_y, valid_y = train_test_split(
        rest_x, rest_y, test_size=valid_share, stratify=rest_y, random_state=hparams.split_seed
    )
    return DigitsSplits(
        train=_dataset(train_x, train_y),
        valid=_dataset(valid_x, valid_y),
        test=_dataset(test_x, test_y),
    )


def build_model(hparams: DigitsHparams) -> nn.Module:
    """A one-hidden-layer perceptron from 64 pixels to 10 logits."""
    return nn.Sequential(
        nn.Linear(NUM_PIXELS, hparams.hidden_size),
        nn.ReLU(),
        nn.Dropout(hparams.dropout),
        nn.Linear(hparams.hidden_size, NUM_CLASSES),
    )


@attrs.frozen
class EpochStats:
    """What one epoch of training and validation measured.

    Attributes:
        epoch: the epoch number, from 1.
        train_loss: mean training loss over the epoch's batches.
        valid_loss: mean validation loss over the batches.
        valid_accuracy: share of validation images classified correctly, in ``[0, 1]``.
    """

    epoch: int
    train_loss: float
    valid_loss: float
    valid_accuracy: float


class DigitsBrain(tb.Brain[Batch, Tensor, DigitsHparams]):
    """Classifies digits with the ``"model"`` module and measures accuracy.

    Args:
        model: maps ``(batch, 64)`` pixels to ``(batch, 10)`` logits.
        hparams: the hyperparameters; ``lr`` configures the Adam optimizer.
        run_opts: run options (device, progress bars...), see :class:`typedbrain.RunOptions`.

    Attributes:
        history: one :class:`EpochStats` per epoch, appended when its validation ends.
        test_accuracy: the accuracy measured by the last ``evaluate``, ``None`` before one.
    """

    def __init__(
        self,
        model: nn.Module,
        hparams: DigitsHparams,
        run_opts: tb.RunOptionsDict | None = None,
    ) -> None:
        super().__init__(
            modules={"model": model},
            opt_class=functools.partial(torch.optim.Adam, lr=hparams.lr),
            hparams=hparams,
            run_opts=run_opts,
        )
        self.history: list[EpochStats] = []
        self.test_accuracy: float | None = None
        self._train_loss = math.nan
        self._correct = 0
        self._seen = 0

    def compute_forward(self, batch: Batch, stage: tb.Stage) -> Tensor:
        # Read the model from self.modules, where fit() puts it on the device and, when run
        # options ask for it, compiled or wrapped for distributed training.
        model = self.modules["model"]
        # nn.Module.__call__ returns Any: the annotation states what this model returns.
        logits: Tensor = model(batch.pixels.to(self.device))
        return logits

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: tb.Stage) -> Tensor:
        labels = batch.labels.to(predictions.device)
        if stage is not tb.Stage.TRAIN:
            self._correct += int((predictions.argmax(dim=1) == labels).sum().item())
            self._seen += labels.numel()
        return nn.functional.cross_entropy(predictions, labels)

    def on_stage_start(self, stage: tb.Stage, epoch: int | None = None) -> None:
        self._correct = 0
        self._seen = 0

    def on_stage_end(self, stage: tb.Stage, stage_loss: float, epoch: int | None = None) -> None:
        if stage is tb.Stage.TRAIN:
            self._train_loss = stage_loss
            return
        accuracy = self._correct / self._seen if self._seen else math.nan
        if stage is tb.Stage.TEST:
            self.test_accuracy = accuracy
            logger.info("test: loss %.4f, accuracy %.2f%%", stage_loss, 100 * accuracy)
            return
        if epoch is None:  # cannot happen: fit() numbers the epochs of TRAIN and VALID stages
            raise ValueError("on_stage_end(Stage.VALID) needs the epoch number")
        stats = EpochStats(epoch, self._train_loss, stage_loss, accuracy)
        self.history.append(stats)
        logger.info(
            "epoch %d: train loss %.4f, valid loss %.4f, valid accuracy %.2f%%",
            stats.epoch,
            stats.train_loss,
            stats.valid_loss,
            100 * stats.valid_accuracy,
        )


def run(hparams: DigitsHparams, run_opts: tb.RunOptionsDict | None = None) -> DigitsBrain:
    """Train a model on the digits, then test it.

    Args:
        hparams: the hyperparameters.
        run_opts: run options for the brain, e.g. ``{"noprogressbar": True}``.

    Returns:
        The trained brain: its ``history`` holds the per-epoch statistics and its
        ``test_accuracy`` the accuracy on the test set.
    """
    splits = load_splits(hparams)
    torch.manual_seed(hparams.seed)
    brain = DigitsBrain(build_model(hparams), hparams, run_opts)
    brain.fit(
        tb.EpochCounter(limit=hparams.epochs),
        splits.train,
        splits.valid,
        train_loader_kwargs={
            "batch_size": hparams.batch_size,
            "shuffle": True,
            "collate_fn": collate,
        },
        valid_loader_kwargs={"batch_size": hparams.batch_size, "collate_fn": collate},
    )
    brain.evaluate(
        splits.test,
        test_loader_kwargs={"batch_size": hparams.batch_size, "collate_fn": collate},
    )
    return brain


def main(argv: Sequence[str] | None = None) -> float:
    """Parse the command line, train and test; returns the test accuracy.

    Args:
        argv: the command-line arguments (``sys.argv[1:]`` when ``None``).
    """
    defaults = DigitsHparams()
    parser = argparse.ArgumentParser(description="Train an MLP on the digits, then test it.")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="torch's random seed")
    parser.add_argument("--noprogressbar", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    hparams = attrs.evolve(defaults, epochs=args.epochs, seed=args.seed)
    brain = run(hparams, run_opts={"noprogressbar": args.noprogressbar})
    if brain.test_accuracy is None:  # cannot happen: evaluate() ends with the TEST stage
        raise RuntimeError("evaluate() did not record a test accuracy")
    return brain.test_accuracy


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # A model this small trains fastest on one thread: more threads add synchronisation, and on
    # a busy machine they wait for each other (ten times slower on a loaded 2-core CPU).
    torch.set_num_threads(1)
    test_accuracy = main()
    print(f"test accuracy: {test_accuracy:.2%}")
    sys.exit(0 if test_accuracy >= TARGET_ACCURACY else 1)

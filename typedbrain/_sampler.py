"""A sampler whose order is a pure function of (seed, epoch, rank, world size), and can resume.

``ResumableSampler`` replaces ``shuffle=True`` in the loaders that ``make_dataloader`` builds: it
derives each epoch's order from its seed and the epoch alone, never from the global RNG, so a new
process rebuilds exactly the order an interrupted run was following, and ``start_at`` skips the
samples already consumed without loading them. ``Positionable`` is the one-method protocol that
lets your own samplers and batch samplers opt in to the same skipping.

``set_loader_epoch`` and ``position_loader`` prepare any ``DataLoader`` for an epoch (and, on a
resume, position it); ``find_resumable_sampler`` finds the sampler whose state a checkpoint keeps.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, replace
from typing import Protocol, cast, runtime_checkable

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler

from typedbrain._checks import check_bool, check_int
from typedbrain._errors import CheckpointError, ConfigurationError, ResumeWarning
from typedbrain._warn import warn

__all__ = [
    "Positionable",
    "RemainingBatches",
    "ResumableSampler",
    "batches_from",
    "find_resumable_sampler",
    "loader_batch_size",
    "loader_seed",
    "mix_seed",
    "position_loader",
    "register_loader_seeding",
    "set_loader_epoch",
    "set_loader_seed",
]

logger = logging.getLogger(__name__)

_SEED_BITS = 63
"""Derived seeds are non-negative 63-bit integers: every RNG we seed accepts them."""


def mix_seed(purpose: str, *values: int | str) -> int:
    """A well-mixed, non-negative 63-bit seed derived from ``purpose`` and ``values``.

    The same arguments give the same seed in every process, platform and Python version (it is a
    BLAKE2b digest, not Python's salted ``hash``), and nearby inputs (seed 1 and 2, epoch 3 and 4)
    give unrelated seeds, which ``seed + epoch`` would not. ``purpose`` separates the streams
    derived from one seed (the sampler order, the worker seeds...).

    Args:
        purpose: a short tag naming what the seed is for.
        values: what the seed depends on: integers (any size, any sign) or strings (``1`` and
            ``"1"`` give different seeds).

    Returns:
        An integer in ``[0, 2**63)``.
    """
    text = ",".join([repr(purpose), *(repr(value) for value in values)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


@runtime_checkable
class Positionable(Protocol):
    """A sampler or batch sampler that can start its next iteration part-way through.

    Implement ``start_at`` on your own sampler (counted in samples) or batch sampler (counted in
    batches) and a resumed run skips what was consumed without loading it; without it, the loader
    is fast-forwarded by drawing batches (see :func:`position_loader`).
    """

    def start_at(self, position: int) -> None:
        """Make the next iteration start at ``position`` (0-based) of the epoch's sequence.

        The position applies to the next iteration only; the one after starts from 0 again.
        """


class ResumableSampler(Sampler[int]):
    """Indices of a map-style dataset, in an order fixed by (seed, epoch, rank, world size).

    Each epoch's order is a permutation of ``range(n)`` drawn by a private ``torch.Generator``
    seeded from a hash of (seed, epoch), or ``0 .. n-1`` without shuffling; the global RNG is
    never used. With ``world_size > 1`` the permutation is padded by repeating it from the start
    to a multiple of ``world_size``, and rank ``r`` takes positions ``r, r + world_size, ...``
    (``DistributedSampler``'s layout), so the ranks partition the padded epoch. With
    ``pad=False`` (for evaluation, where a repeated sample would be counted twice) nothing is
    repeated: the ranks partition the epoch exactly and the first ``n % world_size`` ranks get
    one index more.

    Example:
        >>> sampler = ResumableSampler(10, shuffle=True, seed=7)
        >>> sampler.set_epoch(3)
        >>> full = list(sampler)
        >>> sampler.start_at(4)  # e.g. 2 batches of 2 were consumed before an interruption
        >>> list(sampler) == full[4:]
        True
        >>> list(sampler) == full  # the position applied once
        True

    Args:
        data_source: the dataset (only its length is used, read at each iteration) or the
            number of samples.
        shuffle: draw a new permutation each epoch; ``False`` keeps ``0 .. n-1``.
        seed: the seed the orders derive from; the same seed gives the same orders anywhere.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: the number of ranks sharing the epoch.
        pad: repeat indices so that every rank gets as many (training); ``False`` shards
            without repeats (evaluation).

    Raises:
        ConfigurationError: an argument of the wrong type or out of range (the message names it
            and the value).
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        if isinstance(data_source, int) and not isinstance(data_source, bool):
            check_int("data_source", data_source, minimum=0)
        elif not isinstance(data_source, Sized):
            raise ConfigurationError(
                f"data_source must be a sized dataset or an int, got {type(data_source).__name__}"
            )
        check_bool("shuffle", shuffle)
        check_bool("pad", pad)
        check_int("seed", seed, minimum=None)
        check_int("world_size", world_size, minimum=1)
        check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ConfigurationError(f"rank must be < world_size={world_size}, got {rank!r}")
        self._source = data_source
        self._shuffle = shuffle
        self._seed = seed
        self._rank = rank
        self._world_size = world_size
        self._pad = pad
        self._epoch = 0
        self._position = 0

    @property
    def seed(self) -> int:
        """The seed every epoch's order derives from."""
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration yields (0 until ``set_epoch``)."""
        return self._epoch

    @property
    def shuffle(self) -> bool:
        """Whether each epoch draws a new permutation."""
        return self._shuffle

    @property
    def rank(self) -> int:
        """This process's rank among ``world_size``."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of ranks sharing each epoch."""
        return self._world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields, and drop any pending ``start_at``.

        Raises:
            ConfigurationError: ``epoch`` is negative or not an int.
        """
        self._epoch = check_int("epoch", epoch, minimum=0)
        self._position = 0

    def start_at(self, position: int) -> None:
        """Make the next iteration start at ``position`` of this rank's sequence (in samples).

        Positions count from 0; ``position == len(self)`` makes the next iteration empty. The
        position applies to the next iteration only (and ``set_epoch`` cancels it). Skipping
        costs the same at any position: the epoch's order is sliced, nothing skipped is visited.

        Raises:
            ConfigurationError: ``position`` is negative, not an int, or beyond ``len(self)``.
        """
        check_int("position", position, minimum=0)
        length = len(self)
        if position > length:
            raise ConfigurationError(
                f"position must be <= {length} (this rank's samples per epoch), got {position!r}"
            )
        self._position = position

    def _size(self) -> int:
        return self._source if isinstance(self._source, int) else len(self._source)

    def __len__(self) -> int:
        """The number of indices this rank yields per epoch, padding included."""
        if not self._pad:
            return len(range(self._rank, self._size(), self._world_size))
        return (self._size() + self._world_size - 1) // self._world_size

    def epoch_order(self) -> torch.Tensor:
        """This rank's full index sequence for the current epoch, as a 1-D int64 tensor.

        It ignores any pending ``start_at`` and changes no state.
        """
        size = self._size()
        if size == 0:
            return torch.empty(0, dtype=torch.int64)
        if self._shuffle:
            generator = torch.Generator()
            generator.manual_seed(mix_seed("typedbrain.sampler", self._seed, self._epoch))
            order = torch.randperm(size, generator=generator)
        else:
            order = torch.arange(size, dtype=torch.int64)
        if self._world_size == 1:
            return order
        total = -(-size // self._world_size) * self._world_size
        if self._pad and total > size:
            order = order.repeat(-(-total // size))[:total]
        return order[self._rank :: self._world_size]

    def __iter__(self) -> Iterator[int]:
        """The current epoch's indices from the pending position (then the position resets)."""
        position, self._position = self._position, 0
        order = self.epoch_order()[position:]
        return iter(order.tolist())

    def state_dict(self) -> dict[str, int]:
        """The seed and epoch: with the constructor arguments, all that fixes the order."""
        return {"seed": self._seed, "epoch": self._epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a ``state_dict``: seed and epoch (a pending ``start_at`` is dropped).

        Raises:
            ConfigurationError: ``state`` lacks ``seed`` or ``epoch``, or one is not an int.
        """
        for key in ("seed", "epoch"):
            if key not in state:
                raise ConfigurationError(f"sampler state lacks {key!r}; it has {sorted(state)!r}")
        seed = check_int("seed", state["seed"], minimum=None)
        self.set_epoch(state["epoch"])
        self._seed = seed
        logger.debug("sampler state loaded: seed=%d epoch=%d", seed, self._epoch)


# --- positioning loaders -------------------------------------------------------------------


@dataclass(frozen=True)
class _LoaderSeeding:
    """What ``make_dataloader`` installed on a loader, to be reseeded for each epoch."""

    seed: int
    generator: torch.Generator | None
    set_dataset_epoch: Callable[[int], None] | None
    set_dataset_seed: Callable[[int], None] | None
    sampler: ResumableSampler | None


_SEEDINGS: weakref.WeakKeyDictionary[DataLoader[object], _LoaderSeeding] = (
    weakref.WeakKeyDictionary()
)


def register_loader_seeding(
    loader: DataLoader[object],
    *,
    seed: int,
    generator: torch.Generator | None,
    set_dataset_epoch: Callable[[int], None] | None,
    set_dataset_seed: Callable[[int], None] | None,
    sampler: ResumableSampler | None,
) -> None:
    """Record what ``make_dataloader`` installed, for :func:`set_loader_epoch` to reseed.

    Args:
        loader: the loader just built (held weakly: registering keeps nothing alive).
        seed: the loader's seed.
        generator: the loader's own generator, reseeded from (seed, epoch) each epoch; ``None``
            when the user supplied one (it is left alone).
        set_dataset_epoch: tells the worker-seeding dataset wrapper the epoch, if there is one.
        set_dataset_seed: gives that wrapper another seed (see :func:`set_loader_seed`).
        sampler: the sampler it built with ``seed``; ``None`` when the user supplied one.
    """
    _SEEDINGS[loader] = _LoaderSeeding(
        seed, generator, set_dataset_epoch, set_dataset_seed, sampler
    )


def loader_seed(loader: DataLoader[object]) -> int | None:
    """The seed ``make_dataloader`` gave ``loader``'s generator and workers, if it built it.

    A checkpoint keeps it: with ``seed=None`` the seed is drawn from the global RNG when the
    loader is built, which an unseeded script's restarted process would draw differently.
    """
    seeding = _SEEDINGS.get(loader)
    return None if seeding is None else seeding.seed


def set_loader_seed(loader: DataLoader[object], seed: int) -> None:
    """Give what ``make_dataloader`` installed on ``loader`` the seed ``seed`` from now on.

    The sampler ``make_dataloader`` built (the order), the loader's own generator (reseeded at
    each epoch) and the workers' per-item seeds then follow ``seed``, as in the run that saved
    it. A loader that ``make_dataloader`` did not build is left alone, and so is a sampler the
    user passed to it.
    """
    seeding = _SEEDINGS.get(loader)
    if seeding is None or seeding.seed == seed:
        return
    _SEEDINGS[loader] = replace(seeding, seed=seed)
    if seeding.set_dataset_seed is not None:
        seeding.set_dataset_seed(seed)
    if seeding.sampler is not None:
        seeding.sampler.load_state_dict({"seed": seed, "epoch": seeding.sampler.epoch})
    logger.debug("loader seed set to %d (was %d)", seed, seeding.seed)


def loader_generators(loader: DataLoader[object]) -> list[torch.Generator]:
    """The random generators of a loader that the run does not reseed itself, each once.

    Its own (``generator=``, from which ``iter(loader)`` draws the workers' base seed and a
    ``shuffle=True`` loader's sampler its order) and its samplers' (``RandomSampler(...,
    generator=g)``). A checkpoint keeps their states so that a resumed run draws as the
    interrupted one did. The generator ``make_dataloader`` made for a loader it built is left
    out: it is reseeded from (seed, epoch) instead. A generator or sampler you gave
    ``make_dataloader`` is not, so it is kept.
    """
    seeding = _SEEDINGS.get(loader)
    reseeded = None if seeding is None else seeding.generator
    found: list[torch.Generator] = []
    candidates = [loader.generator, *(getattr(s, "generator", None) for s in _samplers(loader))]
    for candidate in candidates:
        if (
            isinstance(candidate, torch.Generator)
            and candidate is not reseeded
            and all(candidate is not g for g in found)
        ):
            found.append(candidate)
    return found


def _samplers(loader: DataLoader[object]) -> list[object]:
    """The loader's sampler, batch sampler and batch sampler's sampler, each once."""
    batch_sampler = loader.batch_sampler
    found: list[object] = []
    for candidate in (loader.sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        if candidate is not None and all(candidate is not seen for seen in found):
            found.append(candidate)
    return found


def set_loader_epoch(loader: DataLoader[object], epoch: int) -> None:
    """Prepare ``loader`` for ``epoch``: tell its samplers, reseed what ``make_dataloader`` added.

    Samplers with a ``set_epoch`` method (``ResumableSampler``, ``DistributedSampler``, your
    own) use it to draw the epoch's order. The sampler, the batch sampler and the sampler inside
    the batch sampler are each told once, so your batch samplers hear of the epoch too (which
    SpeechBrain omits). A loader built by ``make_dataloader`` also gets its generator
    reseeded from (seed, epoch) and, with workers, its dataset wrapper's epoch set. Call it
    before ``iter(loader)``.
    """
    for candidate in _samplers(loader):
        set_epoch = getattr(candidate, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
    seeding = _SEEDINGS.get(loader)
    if seeding is not None:
        if seeding.generator is not None:
            seeding.generator.manual_seed(mix_seed("typedbrain.loader", seeding.seed, epoch))
        if seeding.set_dataset_epoch is not None:
            seeding.set_dataset_epoch(epoch)


def _batch_count(batcher: object) -> int | None:
    try:
        return len(cast(Sized, batcher))
    except TypeError:
        return None


def _check_batches_done(batches_done: int, available: int | None) -> None:
    if available is not None and batches_done > available:
        raise ConfigurationError(
            f"batches_done must be <= {available} (the loader's batches per epoch), "
            f"got {batches_done!r}"
        )


def position_loader(
    loader: DataLoader[object],
    *,
    epoch: int,
    batches_done: int,
    batch_size: int | None = None,
) -> bool:
    """Prepare ``loader`` for ``epoch`` so its next iteration skips ``batches_done`` batches.

    It calls :func:`set_loader_epoch`, then arranges for the skip without loading anything:

    - a torch ``BatchSampler`` (what ``batch_size=...`` builds) over a
      :class:`Positionable` sampler: the sampler starts at ``batches_done * batch_size``;
    - a ``Positionable`` batch sampler: it starts at ``batches_done``;
    - no automatic batching (``batch_size=None``) and a ``Positionable`` sampler: it starts at
      ``batches_done``.

    The position applies to the next iteration only. Anything else (a sampler without
    ``start_at``, an ``IterableDataset``) cannot be positioned: with ``batches_done > 0`` this
    warns and returns ``False``, and the caller fast-forwards by drawing and discarding
    ``batches_done`` batches.

    Args:
        loader: the loader the epoch iterates over.
        epoch: the epoch about to run.
        batches_done: how many of the epoch's batches were consumed before the interruption
            (0 for a fresh epoch).
        batch_size: the batch size those batches had, when known. If the loader's differs,
            a torch ``BatchSampler`` over a positionable sampler skips the samples they held
            (``batches_done * batch_size``), and a warning says the run is not an exact
            continuation; ``None`` takes the loader's own.

    Returns:
        ``True`` when the next iteration starts where the consumed batches end (always so for
        0), ``False`` when the caller must skip the batches itself.

    Raises:
        ConfigurationError: ``batches_done`` is negative or more than the epoch holds.

    Warns:
        ResumeWarning: the loader cannot be positioned and ``batches_done > 0``, or its batch
            size is not ``batch_size``, or it is positioned but has workers whose randomness
            ``make_dataloader`` does not reseed per item (a positioned epoch starts them
            afresh).
    """
    set_loader_epoch(loader, epoch)
    return _position_for_epoch(
        loader, epoch=epoch, batches_done=batches_done, batch_size=batch_size
    )


def loader_batch_size(loader: DataLoader[object]) -> int | None:
    """The loader's batch size: its own, or its torch ``BatchSampler``'s when it was given one.

    ``None`` without automatic batching or with another batch sampler (its batches' size is
    its own business).
    """
    if loader.batch_size is not None:
        return loader.batch_size
    batch_sampler: object = loader.batch_sampler
    return batch_sampler.batch_size if type(batch_sampler) is BatchSampler else None


def _position_for_epoch(
    loader: DataLoader[object], *, epoch: int, batches_done: int, batch_size: int | None
) -> bool:
    """:func:`position_loader` once the loader is set for ``epoch``."""
    check_int("batches_done", batches_done, minimum=0)
    current = loader_batch_size(loader)
    if batches_done and batch_size is not None and current is not None and current != batch_size:
        warn(
            f"the training batch size was {batch_size} when the checkpoint was taken and is "
            f"{current} now: epoch {epoch} continues after the {batches_done * batch_size} "
            "samples already used (where the loader can skip them), and the run will not "
            "continue exactly as the interrupted one would have",
            ResumeWarning,
        )
    positioned = _position(loader, epoch=epoch, batches_done=batches_done, batch_size=batch_size)
    if positioned and batches_done and loader.num_workers > 0 and loader not in _SEEDINGS:
        warn(
            f"epoch {epoch} continues after batch {batches_done} with a fresh set of "
            f"{loader.num_workers} workers: this loader was not built by make_dataloader, so "
            "its workers draw random numbers in sequence rather than per item, and randomness "
            "drawn in them (augmentation in __getitem__, say) will differ from the "
            "interrupted run; build it with make_dataloader, or use num_workers=0, for an "
            "exact resume",
            ResumeWarning,
        )
    return positioned


def _position(
    loader: DataLoader[object], *, epoch: int, batches_done: int, batch_size: int | None
) -> bool:
    """:func:`position_loader`'s positioning, once the epoch is set and checks are made."""
    # Typed as object: mypy cannot intersect torch's declared types with Positionable.
    batch_sampler: object = loader.batch_sampler
    sampler: object = loader.sampler
    if isinstance(batch_sampler, Positionable):
        _check_batches_done(batches_done, _batch_count(batch_sampler))
        batch_sampler.start_at(batches_done)
        return True
    if type(batch_sampler) is BatchSampler and isinstance(batch_sampler.sampler, Positionable):
        samples = _batch_count(batch_sampler.sampler)
        if batch_size is None or batch_size == batch_sampler.batch_size:
            _check_batches_done(batches_done, _batch_count(batch_sampler))
            batch_size = batch_sampler.batch_size
        elif samples is not None and batches_done > -(-samples // batch_size):
            raise ConfigurationError(
                f"batches_done must be <= {-(-samples // batch_size)} (the epoch's batches of "
                f"{batch_size}), got {batches_done!r}"
            )
        position = batches_done * batch_size
        # The last partial batch may be shorter: skipping all the batches skips all samples.
        batch_sampler.sampler.start_at(position if samples is None else min(position, samples))
        return True
    if batch_sampler is None and isinstance(sampler, Positionable):
        _check_batches_done(batches_done, _batch_count(sampler))
        sampler.start_at(batches_done)
        return True
    if batches_done == 0:
        return True
    if isinstance(loader.dataset, IterableDataset):
        culprit = f"the IterableDataset {type(loader.dataset).__qualname__}"
    elif type(batch_sampler) is BatchSampler:
        # The sampler inside the batch sampler orders the batches (``loader.sampler`` is one
        # DataLoader made itself when it was given a batch sampler).
        culprit = f"the sampler {type(batch_sampler.sampler).__qualname__}"
    elif batch_sampler is not None:
        culprit = f"the batch sampler {type(batch_sampler).__qualname__}"
    else:
        culprit = f"the sampler {type(sampler).__qualname__}"
    warn(
        f"cannot skip the {batches_done} batches already consumed in epoch {epoch} without "
        f"loading them: {culprit} has no start_at method (see typedbrain's Positionable); "
        f"the loader will be fast-forwarded by drawing and discarding {batches_done} batches, "
        "which loads their data and is slower, and which gives the interrupted run's "
        f"remaining batches only if {culprit} orders the epoch as it did there: it does when "
        "its order is set by set_epoch or drawn from the global torch RNG or a torch.Generator "
        "(the loader's, or its generator attribute), which the checkpoint restores, not when "
        "it draws from a random.Random or NumPy generator of its own",
        ResumeWarning,
    )
    return False


def find_resumable_sampler(loader: DataLoader[object]) -> ResumableSampler | None:
    """The loader's :class:`ResumableSampler`, if it has one.

    It looks at the sampler, the batch sampler and the batch sampler's sampler, in that order.
    The training loop saves and restores the sampler's ``state_dict`` through it.
    """
    for candidate in _samplers(loader):
        if isinstance(candidate, ResumableSampler):
            return candidate
    return None


class RemainingBatches(Iterable[object]):
    """The rest of a positioned loader's epoch, iterable once."""

    def __init__(self, iterator: Iterator[object]) -> None:
        self._iterator = iterator

    def __iter__(self) -> Iterator[object]:
        return self._iterator

    def close(self) -> None:
        """Drop the loader's iterator, which ends its worker processes once nothing holds it."""
        self._iterator = iter(())


def batches_from(
    loader: DataLoader[object],
    *,
    epoch: int,
    batches_done: int,
    batch_size: int | None = None,
    epoch_set: bool = False,
) -> RemainingBatches:
    """The loader's batches for ``epoch`` after the first ``batches_done``, iterable once.

    With ``epoch_set``, :func:`set_loader_epoch` has been called for ``epoch`` already (to read
    the epoch's length, say) and is not called again: a sampler's ``set_epoch`` runs once per
    epoch.

    The loader is iterated now, so whatever ``iter(loader)`` draws from the global generators
    (a loader without its own ``generator`` draws its workers' base seed there) is drawn from
    their state at this call, whatever the caller restores afterwards. A loader that
    :func:`position_loader` can position then skips the consumed batches without loading
    them; any other is fast-forwarded: they are drawn and dropped (a ``ResumeWarning`` has
    said so). ``batch_size`` is passed to :func:`position_loader`.

    Raises:
        CheckpointError: the loader has fewer than ``batches_done`` batches.
    """
    position = _position_for_epoch if epoch_set else position_loader
    try:
        positioned = position(loader, epoch=epoch, batches_done=batches_done, batch_size=batch_size)
    except ConfigurationError as error:
        if not batches_done:
            raise
        raise CheckpointError(
            f"the checkpoint was taken after batch {batches_done} of epoch {epoch}, but the "
            f"training loader cannot continue from there ({error}): is the training set "
            "smaller than it was?"
        ) from error
    iterator = iter(loader)
    if positioned:
        return RemainingBatches(iterator)
    for drawn in range(batches_done):
        try:
            next(iterator)
        except StopIteration:
            raise CheckpointError(
                f"the checkpoint was taken after batch {batches_done} of epoch {epoch}, but "
                f"the training loader has only {drawn} batches"
            ) from None
    return RemainingBatches(iterator)

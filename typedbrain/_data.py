"""Turning datasets into data loaders that resume exactly, and the loader facts the loop needs.

``make_dataloader`` builds loaders whose order and augmentation randomness derive from one seed
(see ``docs/data-order.md``); ``position_loader`` prepares a loader for an epoch and, on a resume,
makes its next iteration skip the batches already consumed without loading them.
"""

from __future__ import annotations

import difflib
import logging
import multiprocessing.context
import operator
import random
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any, SupportsIndex, TypeAlias, TypedDict, cast

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from typing_extensions import Unpack

from typedbrain._checks import check_int
from typedbrain._errors import ConfigurationError, ResumeWarning
from typedbrain._sampler import (
    ResumableSampler,
    find_resumable_sampler,
    mix_seed,
    position_loader,
    register_loader_seeding,
    set_loader_epoch,
)
from typedbrain._warn import warn

__all__ = [
    "DataSource",
    "LoaderKwargs",
    "Shard",
    "find_resumable_sampler",
    "loader_length",
    "make_dataloader",
    "position_loader",
    "seed_worker",
    "set_loader_epoch",
]

logger = logging.getLogger(__name__)


DataSource: TypeAlias = DataLoader[object] | Dataset[object] | Sequence[object]
"""What ``fit`` and ``evaluate`` accept: a ready ``DataLoader``, or a dataset (a torch
``Dataset`` or any sequence) that ``Brain.make_dataloader`` turns into one."""


class LoaderKwargs(TypedDict, total=False):
    """The keyword arguments of ``torch.utils.data.DataLoader``, typed.

    ``Any`` appears where the loader passes your own items to your own functions.
    """

    batch_size: int | None
    shuffle: bool | None
    sampler: Sampler[int] | Iterable[int] | None
    batch_sampler: Sampler[list[int]] | Iterable[list[int]] | None
    num_workers: int
    collate_fn: Callable[[list[Any]], object] | None
    pin_memory: bool
    drop_last: bool
    timeout: float
    worker_init_fn: Callable[[int], None] | None
    multiprocessing_context: multiprocessing.context.BaseContext | str | None
    generator: torch.Generator | None
    prefetch_factor: int | None
    persistent_workers: bool
    pin_memory_device: str
    in_order: bool


_LOADER_KEYS = frozenset(LoaderKwargs.__annotations__)

_MASK32 = 0xFFFF_FFFF


def _seed_numpy_and_random(seed: int) -> None:
    """Seed NumPy's and Python's global RNGs with distinct seeds derived from ``seed``.

    Both are MT19937 seeded the same way from an integer, so one seed for both would make
    ``np.random.rand()`` and ``random.random()`` return the same numbers.
    """
    numpy_seed = mix_seed("typedbrain.numpy", seed)
    np.random.seed([numpy_seed & _MASK32, numpy_seed >> 32])
    random.seed(mix_seed("typedbrain.random", seed))


def _reseed_globals(seed: int) -> None:
    """Seed torch's, NumPy's and Python's global RNGs from one ``seed``."""
    torch.manual_seed(mix_seed("typedbrain.torch", seed))
    _seed_numpy_and_random(seed)


def seed_worker(worker_id: int) -> None:
    """Seed Python's ``random`` and NumPy's global RNG in a loader worker from torch's seed.

    torch seeds each worker's torch RNG with ``base_seed + worker_id``, where ``base_seed`` is
    drawn from the loader's generator at ``iter(loader)``; this derives the other two RNGs from
    that seed, so they are a function of the loader's generator as well. It is the
    ``worker_init_fn`` that ``make_dataloader`` installs (before yours, if you give one); being a
    module-level function, it pickles for the ``spawn`` start method.

    Args:
        worker_id: the worker's number (unused: ``torch.initial_seed()`` already includes it).
    """
    del worker_id
    _seed_numpy_and_random(torch.initial_seed())


class _ChainedWorkerInit:
    """``seed_worker`` then the user's ``worker_init_fn``; picklable when the user's is."""

    def __init__(self, user_fn: Callable[[int], None]) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        seed_worker(worker_id)
        self.user_fn(worker_id)


def _index_key(index: object) -> int | str:
    """An index as the seed derivation sees it: an int when it is one (NumPy ints included)."""
    if isinstance(index, SupportsIndex):
        try:
            return operator.index(index)
        except TypeError:  # a float tensor has __index__ but refuses it
            pass
    return repr(index)


class _SeededDataset(Dataset[object]):
    """Reseeds the global RNGs from (seed, epoch, index) before each item, in loader workers.

    Which worker loads an item depends on where an iteration started (after a resume at batch
    ``k`` the first batch goes to worker 0, not to worker ``k % num_workers``), so a worker's RNG
    stream is not reproducible across a resume; an RNG reseeded per item is. In the main process
    (``num_workers=0``) nothing is reseeded: the checkpoint saves and restores that process's
    RNG state, which is exact there. Attributes the wrapper lacks are read from the dataset.
    """

    def __init__(self, dataset: Dataset[object] | Sequence[object], seed: int) -> None:
        self._dataset = dataset
        self._seed = seed
        self._epoch = 0

    @property
    def dataset(self) -> Dataset[object] | Sequence[object]:
        """The wrapped dataset."""
        return self._dataset

    @property
    def epoch(self) -> int:
        """The epoch whose seeds the items are loaded with."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration (workers copy it when they start)."""
        self._epoch = epoch

    def set_seed(self, seed: int) -> None:
        """Seed the items of the next iterations from ``seed`` (a resumed run's saved seed)."""
        self._seed = seed

    def _reseed(self, *indices: object) -> None:
        if torch.utils.data.get_worker_info() is not None:
            keys = [_index_key(index) for index in indices]
            _reseed_globals(mix_seed("typedbrain.item", self._seed, self._epoch, *keys))

    def __len__(self) -> int:
        return len(cast(Sized, self._dataset))

    def __getitem__(self, index: int) -> object:
        self._reseed(index)
        return self._dataset[index]

    def __getattr__(self, name: str) -> object:
        # Only reached for attributes the wrapper lacks. Dunders are not forwarded: torch looks
        # for __getitems__ with hasattr, and pickle looks for __setstate__ before __init__ ran.
        dataset = self.__dict__.get("_dataset")
        if name.startswith("__") or dataset is None:
            raise AttributeError(name)
        return getattr(dataset, name)


class _SeededBatchedDataset(_SeededDataset):
    """``_SeededDataset`` for a dataset with ``__getitems__``: one reseed per batch of indices.

    The seed derives from (seed, epoch, all the batch's indices): a resumed run fetches the same
    index batches as the uninterrupted one, so its batches match; calling ``__getitems__`` one
    index at a time instead would defeat the point of a batched fetch.
    """

    def __getitems__(self, indices: list[int]) -> list[object]:
        self._reseed(*indices)
        fetch = cast(Callable[[list[int]], list[object]], self._dataset.__getitems__)  # type: ignore[union-attr]  # present: checked in make_dataloader
        return fetch(indices)


@attrs.frozen
class Shard:
    """Which part of each epoch a process loads under distributed training.

    Attributes:
        rank: this process's rank.
        world_size: the number of processes.
        pad: repeat indices so every rank has as many batches (training, where DDP needs the
            ranks in step); ``False`` for validation and test, where a repeated sample would be
            counted twice.
    """

    rank: int
    world_size: int
    pad: bool = True


def _draw_seed(generator: torch.Generator | None) -> int:
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def make_dataloader(
    dataset: Dataset[object] | Sequence[object],
    *,
    seed: int | None = None,
    shard: Shard | None = None,
    **loader_kwargs: Unpack[LoaderKwargs],
) -> DataLoader[object]:
    """A ``DataLoader`` over ``dataset`` whose order and randomness resume exactly.

    For a map-style dataset (one with ``__len__``):

    - unless you pass ``sampler`` or ``batch_sampler``, ``shuffle`` is replaced by a
      :class:`~typedbrain._sampler.ResumableSampler` with that ``seed``, so each epoch's order is
      a function of (seed, epoch) and a resume can skip consumed batches without loading them;
    - unless you pass ``generator``, the loader gets its own ``torch.Generator``, reseeded for
      each epoch by :func:`set_loader_epoch`, so ``iter(loader)`` never draws from the global
      torch RNG (it draws the worker base seed from the loader's generator, even without
      workers);
    - with ``num_workers > 0``, the dataset is wrapped so that each item is loaded with torch,
      NumPy and ``random`` reseeded from (seed, epoch, index), and :func:`seed_worker` runs in
      each worker before your ``worker_init_fn``.

    Samplers, batch samplers and generators you pass are used as they are. An
    ``IterableDataset``, or a dataset without ``__len__``, is passed to ``DataLoader`` unchanged.

    Args:
        dataset: a torch ``Dataset`` or any sequence of examples.
        seed: the seed of the order and of the workers' randomness. ``None`` draws one, once,
            here: from your ``generator`` if you pass one, else from the global torch RNG (so a
            script that calls ``torch.manual_seed`` first gets the same seed every run).
        shard: this process's part of each epoch under distributed training: the sampler
            built here takes only this rank's indices (see :class:`Shard`).
        loader_kwargs: ``DataLoader`` options (``batch_size``, ``shuffle``...).

    Raises:
        ConfigurationError: an option that ``DataLoader`` does not have (the message names it
            and suggests the closest one), or a ``seed`` that is not an int.

    Warns:
        ResumeWarning: ``persistent_workers=True`` with workers: the workers keep the first
            epoch's state, so a resume after that epoch is not exact.
    """
    for key in loader_kwargs:
        if key not in _LOADER_KEYS:
            close = difflib.get_close_matches(key, sorted(_LOADER_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(f"unknown DataLoader option {key!r}{hint}")
    num_workers = check_int("num_workers", loader_kwargs.get("num_workers", 0), minimum=0)
    if shard is not None and not isinstance(shard, Shard):
        raise ConfigurationError(f"shard must be a Shard or None, got {shard!r}")
    if num_workers > 0 and loader_kwargs.get("persistent_workers", False):
        warn(
            "persistent_workers=True keeps each worker's state (the dataset's epoch and the "
            "worker seeds) from the first epoch for the whole run, so a resumed run will not "
            "reproduce the uninterrupted one exactly after the first epoch; "
            "use persistent_workers=False for exact resumes",
            ResumeWarning,
        )
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        _warn_if_unsharded(dataset, loader_kwargs, shard, iterable=True)
        # A sequence works as a map-style dataset: DataLoader only needs __getitem__ and
        # __len__.
        return DataLoader(cast(Dataset[object], dataset), **loader_kwargs)
    _warn_if_unsharded(dataset, loader_kwargs, shard, iterable=False)
    user_generator = loader_kwargs.get("generator")
    seed = _draw_seed(user_generator) if seed is None else check_int("seed", seed, minimum=None)
    built_sampler: ResumableSampler | None = None
    if loader_kwargs.get("sampler") is None and loader_kwargs.get("batch_sampler") is None:
        shuffle = loader_kwargs.pop("shuffle", None)
        loader_kwargs["sampler"] = built_sampler = ResumableSampler(
            dataset,
            shuffle=bool(shuffle),
            seed=seed,
            rank=0 if shard is None else shard.rank,
            world_size=1 if shard is None else shard.world_size,
            pad=True if shard is None else shard.pad,
        )
    generator: torch.Generator | None = None
    if user_generator is None:
        generator = torch.Generator()
        generator.manual_seed(mix_seed("typedbrain.loader", seed, 0))
        loader_kwargs["generator"] = generator
    wrapper: _SeededDataset | None = None
    if num_workers > 0:
        batched = callable(getattr(dataset, "__getitems__", None))
        wrapper = (_SeededBatchedDataset if batched else _SeededDataset)(dataset, seed)
        user_init = loader_kwargs.get("worker_init_fn")
        loader_kwargs["worker_init_fn"] = (
            seed_worker if user_init is None else _ChainedWorkerInit(user_init)
        )
    loader = DataLoader(
        wrapper if wrapper is not None else cast(Dataset[object], dataset), **loader_kwargs
    )
    register_loader_seeding(
        loader,
        seed=seed,
        generator=generator,
        set_dataset_epoch=None if wrapper is None else wrapper.set_epoch,
        set_dataset_seed=None if wrapper is None else wrapper.set_seed,
        sampler=built_sampler,
    )
    logger.debug("data loader built with seed %d (workers: %d)", seed, num_workers)
    return loader


def _warn_if_unsharded(
    dataset: object, loader_kwargs: Mapping[str, object], shard: Shard | None, *, iterable: bool
) -> None:
    """Warn when ``shard`` cannot be applied: the data as given is not split among the ranks.

    A sampler that shards itself (``DistributedSampler``, a :class:`ResumableSampler` with
    ``world_size > 1``: both have ``num_replicas`` or ``world_size`` above 1) is trusted.
    """
    if shard is None or shard.world_size == 1:
        return
    given = loader_kwargs.get("batch_sampler")
    if given is None:  # not `or`: an empty sampler is falsy
        given = loader_kwargs.get("sampler")
    if given is not None:
        inner = getattr(given, "sampler", None)
        for candidate in (given, inner):
            replicas = getattr(candidate, "num_replicas", getattr(candidate, "world_size", 1))
            if isinstance(replicas, int) and replicas > 1:
                return
        what = f"the {type(given).__qualname__} you passed is used as it is"
    elif iterable:
        what = f"the iterable dataset {type(dataset).__qualname__} is read as it is"
    else:
        return
    warn(
        f"make_dataloader cannot shard this loader for rank {shard.rank} of "
        f"{shard.world_size}: {what}, so unless it splits the data among the processes "
        "itself, every process loads all of it (give a sampler that shards, such as "
        "torch's DistributedSampler or typedbrain's ResumableSampler with rank and world_size)",
        UserWarning,
    )


def loader_length(loader: Iterable[object]) -> int | None:
    """The number of batches ``loader`` yields, or ``None`` when it cannot tell."""
    try:
        return len(cast(Sequence[object], loader))
    except TypeError:
        return None

"""Turning datasets into data loaders that resume exactly, and the loader facts the loop needs.

``make_dataloader`` builds loaders whose order and augmentation randomness derive from one seed
(see ``docs/data-order.md``); ``position_loader`` prepares a loader for an epoch and, on a resume,
makes its next iteration skip the batches already consumed without loading them.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import multiprocessing.context
import operator
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, SupportsIndex, TypeAlias, TypedDict, cast

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from typing_extensions import Unpack

from typedbrain._checks import check_int
from typedbrain._errors import ConfigurationError, ResumeWarning, with_article
from typedbrain._loader_workers import _exit_flag, _WorkerInit
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


def _index_key(index: object) -> int | str:
    """An index as the seed derivation sees it: an int when it is one (NumPy ints included)."""
    if isinstance(index, SupportsIndex):
        try:
            return operator.index(index)
        except TypeError:  # a float tensor has __index__ but refuses it
            pass
    return repr(index)


_INT64_LIMIT = 2**63


class _ItemSeeds:
    """The (seed, epoch) that items are loaded with, in memory the loader's workers share.

    The main process writes it (``set_epoch``, ``set_seed``) and workers read it as they load
    each item, so workers started before a change (``persistent_workers=True``) see it too. The
    loader's seed is kept as a 63-bit digest, so any int fits.
    """

    def __init__(self, seed: int) -> None:
        state = torch.zeros(2, dtype=torch.int64)
        self._state: torch.Tensor = state.share_memory_()  # type: ignore[no-untyped-call]  # untyped in torch
        self.set_seed(seed)

    def set_seed(self, seed: int) -> None:
        """Load items from ``seed`` from now on (a resumed run's saved seed)."""
        self._state[0] = mix_seed("typedbrain.items", seed)

    def set_epoch(self, epoch: int) -> None:
        """Load items with ``epoch``'s seeds from now on.

        Raises:
            ConfigurationError: ``epoch`` is not an int in ``[0, 2**63)``.
        """
        check_int("epoch", epoch, minimum=0)
        if epoch >= _INT64_LIMIT:
            raise ConfigurationError(f"epoch must be < 2**63, got {epoch!r}")
        self._state[1] = epoch

    def reseed(self, keys: Iterable[int | str]) -> None:
        """Seed torch's, NumPy's and Python's global RNGs from (seed, epoch, ``keys``).

        One BLAKE2b digest gives the three seeds (distinct, so no two libraries draw in step).
        Each is set the cheapest exact way: torch's default CPU generator alone
        (``torch.manual_seed`` would seed every CUDA device too, and costs a hundred times
        more), NumPy's from 32 bits (its integer seeding), ``random``'s from 63.
        """
        seed, epoch = self._state.tolist()
        text = ",".join(["typedbrain.item", str(seed), str(epoch), *map(repr, keys)])
        digest = hashlib.blake2b(text.encode(), digest_size=20).digest()
        torch.default_generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        np.random.seed(int.from_bytes(digest[8:12], "little"))
        random.seed(int.from_bytes(digest[12:20], "little") >> 1)


class _SeededDataset(Dataset[object]):
    """Reseeds the global RNGs from (seed, epoch, index) before each item, in loader workers.

    Which worker loads an item depends on where an iteration started (after a resume at batch
    ``k`` the first batch goes to worker 0, not to worker ``k % num_workers``), so a worker's RNG
    stream is not reproducible across a resume; an RNG reseeded per item is. In the main process
    (``num_workers=0``) nothing is reseeded: the checkpoint saves and restores that process's
    RNG state, which is exact there.

    The wrapper stands in for the user's dataset: reading, setting and deleting an attribute
    acts on the dataset (``loader.dataset.set_epoch(3)`` calls the dataset's own), and
    ``__wrapped__`` is the dataset itself. Its own state has names no dataset uses.
    """

    _typedbrain_dataset: Dataset[object] | Sequence[object]
    _typedbrain_seeds: _ItemSeeds

    def __init__(self, dataset: Dataset[object] | Sequence[object], seeds: _ItemSeeds) -> None:
        object.__setattr__(self, "_typedbrain_dataset", dataset)
        object.__setattr__(self, "_typedbrain_seeds", seeds)

    @property
    def __wrapped__(self) -> Dataset[object] | Sequence[object]:
        """The wrapped dataset (the name ``functools.wraps`` gives a wrapped function)."""
        return self._typedbrain_dataset

    def _typedbrain_reseed(self, *indices: object) -> None:
        if torch.utils.data.get_worker_info() is not None:
            self._typedbrain_seeds.reseed([_index_key(index) for index in indices])

    def __len__(self) -> int:
        return len(cast(Sized, self._typedbrain_dataset))

    def __getitem__(self, index: int) -> object:
        self._typedbrain_reseed(index)
        return self._typedbrain_dataset[index]

    def __getattr__(self, name: str) -> object:
        # Only reached for attributes the wrapper lacks. Dunders are not forwarded: torch looks
        # for __getitems__ with hasattr, and pickle looks for __setstate__ before __init__ ran.
        dataset = self.__dict__.get("_typedbrain_dataset")
        if name.startswith("__") or dataset is None:
            raise AttributeError(name)
        return getattr(dataset, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self._typedbrain_dataset, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._typedbrain_dataset, name)


class _SeededBatchedDataset(_SeededDataset):
    """``_SeededDataset`` for a dataset with ``__getitems__``: one reseed per batch of indices.

    The seed derives from (seed, epoch, all the batch's indices): a resumed run fetches the same
    index batches as the uninterrupted one, so its batches match; calling ``__getitems__`` one
    index at a time instead would defeat the point of a batched fetch.
    """

    def __getitems__(self, indices: list[int]) -> list[object]:
        self._typedbrain_reseed(*indices)
        fetch = cast(Callable[[list[int]], list[object]], self._typedbrain_dataset.__getitems__)  # type: ignore[union-attr]  # present: checked in make_dataloader
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


def check_data_source(data: object, name: str, *, loader_too: bool) -> None:
    """Refuse what a ``DataLoader`` cannot read as a dataset, naming it and its type.

    A dataset is a torch ``Dataset`` (an ``IterableDataset`` included), or an object read by
    index: a sequence other than a str, or anything else with ``__getitem__`` (or
    ``__getitems__``) that is not a mapping (a NumPy array, a tensor).

    Args:
        data: what was given.
        name: how the message names it, such as ``"fit(): valid_set"``.
        loader_too: whether a ``DataLoader`` is accepted there as well (it is not checked
            here; the message then offers one).

    Raises:
        ConfigurationError: ``data`` is ``None``, a str or bytes (a file name, say), a mapping
            whose keys are not 0, 1, 2... (``DataLoader`` reads a dataset by those), a class,
            or an object not read by index (a number, a generator, a set).
    """
    if isinstance(data, Dataset):
        return
    accepted = "a DataLoader or a dataset" if loader_too else "a dataset"
    shown = f"{with_article(type(data).__name__)} {data!r:.80}"
    if data is None:
        raise ConfigurationError(f"{name} is None: give {accepted}")
    if isinstance(data, str | bytes | bytearray):
        raise ConfigurationError(
            f"{name} is the {type(data).__name__} {data!r:.80}, not a dataset: load the data it "
            f"names and give {accepted}"
        )
    if isinstance(data, DataLoader):
        raise ConfigurationError(f"{name} is already a DataLoader: use it as it is")
    if isinstance(data, type):
        raise ConfigurationError(
            f"{name} is the class {data.__qualname__}, not a dataset: give an instance of it"
        )
    if isinstance(data, Mapping) and set(data) != set(range(len(data))):
        # One keyed by the positions 0, 1, 2... reads as a sequence would.
        raise ConfigurationError(
            f"{name} is {with_article(type(data).__name__)} (a mapping) whose keys are not the "
            "indices 0, 1, 2... a DataLoader reads a dataset by; give a list of its examples "
            "(list(mapping.values())) or a Dataset"
        )
    if hasattr(type(data), "__getitem__") or hasattr(type(data), "__getitems__"):
        return
    if isinstance(data, Iterator):
        raise ConfigurationError(
            f"{name} is {shown}, not a dataset: a DataLoader reads a dataset by index (or an "
            "IterableDataset), and an iterator can be read only once; give a list of its "
            "examples, or an IterableDataset that yields them"
        )
    raise ConfigurationError(
        f"{name} is {shown}, not a dataset: give {accepted} (a torch Dataset, an "
        "IterableDataset, or a sequence of examples)"
    )


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
      NumPy and ``random`` reseeded from (seed, epoch, index); each worker runs
      :func:`seed_worker` and then ignores SIGTERM and SIGINT until its iteration shuts down,
      leaving them to its main process (so that a job stopped by a scheduler or Ctrl-C still
      finishes its batch and saves its checkpoint), before your ``worker_init_fn``. The
      wrapper passes attribute reads and writes on to your dataset, which is
      ``loader.dataset.__wrapped__``.

    Samplers, batch samplers and generators you pass are used as they are. An
    ``IterableDataset``, or a dataset without ``__len__``, is passed to ``DataLoader`` unchanged
    (its workers only get the signal handling).

    Args:
        dataset: a torch ``Dataset`` or any sequence of examples.
        seed: the seed of the order and of the workers' randomness. ``None`` draws one, once,
            here: from your ``generator`` if you pass one, else from the global torch RNG (so a
            script that calls ``torch.manual_seed`` first gets the same seed every run).
        shard: this process's part of each epoch under distributed training: the sampler
            built here takes only this rank's indices (see :class:`Shard`).
        loader_kwargs: ``DataLoader`` options (``batch_size``, ``shuffle``...).

    Raises:
        ConfigurationError: a ``dataset`` that a ``DataLoader`` cannot read (``None``, a str, a
            mapping, a generator, a number: see :func:`check_data_source`), an option that
            ``DataLoader`` does not have (the message names it and suggests the closest one), a
            ``seed`` that is not an int, or ``in_order=False`` (batches in the order workers
            finish them cannot be resumed).

    Warns:
        ResumeWarning: ``persistent_workers=True`` with workers: state your dataset keeps in
            the workers carries over from epoch to epoch there, which a resumed run's fresh
            workers cannot reproduce.
    """
    check_data_source(dataset, "make_dataloader(): dataset", loader_too=False)
    for key in loader_kwargs:
        if key not in _LOADER_KEYS:
            close = difflib.get_close_matches(key, sorted(_LOADER_KEYS | {"seed", "shard"}), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(f"unknown DataLoader option {key!r}{hint}")
    num_workers = check_int("num_workers", loader_kwargs.get("num_workers", 0), minimum=0)
    if shard is not None and not isinstance(shard, Shard):
        raise ConfigurationError(f"shard must be a Shard or None, got {shard!r}")
    if loader_kwargs.get("in_order", True) is not True:
        raise ConfigurationError(
            f"in_order must be True, got {loader_kwargs['in_order']!r}: with in_order=False, "
            "workers hand over batches in the order they finish them, so the order a run sees "
            "is not a function of the seed and the epoch, and a resume would skip other batches "
            "than the ones consumed (losing some, repeating others)"
        )
    if num_workers > 0 and loader_kwargs.get("persistent_workers", False):
        warn(
            "persistent_workers=True keeps the workers, and their copies of the dataset, from "
            "one epoch to the next: what your dataset changes in itself while loading (a "
            "private RNG, a cache) carries over in them, and what you change in it from the "
            "main process after they started (its set_epoch, say) does not reach them, while "
            "a resumed run starts them afresh; the global RNGs are reseeded for each item "
            "either way. Use persistent_workers=False for exact resumes",
            ResumeWarning,
        )
    map_style = not isinstance(dataset, IterableDataset) and isinstance(dataset, Sized)
    if num_workers > 0:
        loader_kwargs["worker_init_fn"] = _WorkerInit(
            _exit_flag(), loader_kwargs.get("worker_init_fn"), seed=map_style
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
    item_seeds: _ItemSeeds | None = None
    if num_workers > 0:
        batched = callable(getattr(dataset, "__getitems__", None))
        item_seeds = _ItemSeeds(seed)
        wrapper = (_SeededBatchedDataset if batched else _SeededDataset)(dataset, item_seeds)
    loader = DataLoader(
        wrapper if wrapper is not None else cast(Dataset[object], dataset), **loader_kwargs
    )
    register_loader_seeding(
        loader,
        seed=seed,
        generator=generator,
        set_dataset_epoch=None if item_seeds is None else item_seeds.set_epoch,
        set_dataset_seed=None if item_seeds is None else item_seeds.set_seed,
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

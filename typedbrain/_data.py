"""Turning datasets into data loaders, and the loader facts the training loop needs."""

from __future__ import annotations

import difflib
import multiprocessing.context
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias, TypedDict, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import Unpack

from typedbrain._errors import ConfigurationError

__all__ = ["DataSource", "LoaderKwargs", "loader_length", "make_dataloader", "set_loader_epoch"]


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


def make_dataloader(
    dataset: Dataset[object] | Sequence[object], **loader_kwargs: Unpack[LoaderKwargs]
) -> DataLoader[object]:
    """A ``DataLoader`` over ``dataset`` with the given options.

    Raises:
        ConfigurationError: an option that ``DataLoader`` does not have (the message names it
            and suggests the closest one).
    """
    for key in loader_kwargs:
        if key not in _LOADER_KEYS:
            close = difflib.get_close_matches(key, sorted(_LOADER_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(f"unknown DataLoader option {key!r}{hint}")
    # A sequence works as a map-style dataset: DataLoader only needs __getitem__ and __len__.
    return DataLoader(cast(Dataset[object], dataset), **loader_kwargs)


def set_loader_epoch(loader: DataLoader[object], epoch: int) -> None:
    """Tell the loader's sampler and batch sampler which epoch starts, where they listen.

    Samplers with a ``set_epoch`` method (``DistributedSampler``, for instance) use it to draw a
    new order each epoch. Both the sampler and the batch sampler (and the sampler inside a batch
    sampler) are told, each once.
    """
    batch_sampler = loader.batch_sampler
    seen: set[int] = set()
    for candidate in (loader.sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        set_epoch = getattr(candidate, "set_epoch", None)
        if callable(set_epoch) and id(candidate) not in seen:
            seen.add(id(candidate))
            set_epoch(epoch)


def loader_length(loader: Iterable[object]) -> int | None:
    """The number of batches ``loader`` yields, or ``None`` when it cannot tell."""
    try:
        return len(cast(Sequence[object], loader))
    except TypeError:
        return None

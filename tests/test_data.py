"""make_dataloader and position_loader: resumable order, skipping without loading, workers."""

from __future__ import annotations

import pickle
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data.distributed import DistributedSampler

from tests.helpers import python_blocks
from typedbrain._data import (
    LoaderKwargs,
    Shard,
    _index_key,
    _ItemSeeds,
    find_resumable_sampler,
    make_dataloader,
    position_loader,
    set_loader_epoch,
)
from typedbrain._errors import ConfigurationError, ResumeWarning
from typedbrain._loader_workers import seed_worker
from typedbrain._sampler import ResumableSampler, loader_seed, set_loader_seed


def as_lists(batches: Sequence[object]) -> list[object]:
    return [batch.tolist() if isinstance(batch, Tensor) else batch for batch in batches]


class CountingDataset(Dataset[int]):
    """Item ``i`` is ``i``; ``fetched`` records every index loaded. Its length can be huge."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        self.fetched.append(index)
        return index


# --- order and the global RNG -------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterating_a_made_loader_leaves_the_global_torch_rng_untouched(
    shuffle: bool, num_workers: int
) -> None:
    loader = make_dataloader(
        list(range(12)), seed=4, batch_size=5, shuffle=shuffle, num_workers=num_workers
    )
    before = torch.get_rng_state()
    position_loader(loader, epoch=1, batches_done=1)
    list(loader)
    list(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_plain_dataloader_does_draw_from_the_global_rng() -> None:
    # The control for the test above: the trap it guards against is real.
    loader = DataLoader(CountingDataset(12), batch_size=5, shuffle=True)
    before = torch.get_rng_state()
    list(loader)
    assert not torch.equal(torch.get_rng_state(), before)


def test_same_seed_gives_same_batches_and_epochs_differ() -> None:
    def epoch_batches(epoch: int) -> list[object]:
        loader = make_dataloader(list(range(20)), seed=9, batch_size=4, shuffle=True)
        position_loader(loader, epoch=epoch, batches_done=0)
        return as_lists(list(loader))

    assert epoch_batches(1) == epoch_batches(1)
    assert epoch_batches(1) != epoch_batches(2)


def test_without_shuffle_the_loader_is_sequential() -> None:
    loader = make_dataloader(list(range(7)), seed=1, batch_size=3)
    position_loader(loader, epoch=5, batches_done=0)
    assert as_lists(list(loader)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_seed_none_is_drawn_from_the_global_rng_once() -> None:
    torch.manual_seed(123)
    first = find_resumable_sampler(make_dataloader(list(range(5)), shuffle=True))
    torch.manual_seed(123)
    second = find_resumable_sampler(make_dataloader(list(range(5)), shuffle=True))
    third = find_resumable_sampler(make_dataloader(list(range(5)), shuffle=True))
    assert first is not None
    assert second is not None
    assert third is not None
    assert first.seed == second.seed != third.seed


def test_seed_none_is_drawn_from_the_users_generator_when_given() -> None:
    def drawn_seed() -> int:
        generator = torch.Generator().manual_seed(8)
        sampler = find_resumable_sampler(
            make_dataloader(list(range(5)), shuffle=True, generator=generator)
        )
        assert sampler is not None
        return sampler.seed

    torch.manual_seed(1)
    first = drawn_seed()
    torch.manual_seed(2)
    assert drawn_seed() == first


def test_set_loader_epoch_reseeds_the_loaders_generator_from_seed_and_epoch() -> None:
    def generator_state(epoch: int) -> Tensor:
        loader = make_dataloader(list(range(6)), seed=3, batch_size=2)
        list(loader)  # draws from the generator: the reseed must not depend on it
        set_loader_epoch(loader, epoch)
        assert loader.generator is not None
        state = loader.generator.get_state()
        assert isinstance(state, Tensor)
        return state

    assert torch.equal(generator_state(2), generator_state(2))
    assert not torch.equal(generator_state(2), generator_state(3))


# --- positioning -------------------------------------------------------------------------


@given(
    size=st.integers(0, 40),
    seed=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 100),
    batch_size=st.integers(1, 7),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    data=st.data(),
)
def test_positioned_loader_yields_exactly_the_batches_after_the_first_k(
    size: int,
    seed: int,
    epoch: int,
    batch_size: int,
    drop_last: bool,
    shuffle: bool,
    data: st.DataObject,
) -> None:
    def fresh() -> DataLoader[object]:
        return make_dataloader(
            list(range(size)),
            seed=seed,
            batch_size=batch_size,
            drop_last=drop_last,
            shuffle=shuffle,
        )

    uninterrupted = fresh()
    assert position_loader(uninterrupted, epoch=epoch, batches_done=0)
    full = as_lists(list(uninterrupted))
    done = data.draw(st.integers(0, len(full)), label="batches_done")
    resumed = fresh()
    assert position_loader(resumed, epoch=epoch, batches_done=done)
    assert as_lists(list(resumed)) == full[done:]
    assert as_lists(list(resumed)) == full  # the position applied to one iteration only


def test_skipping_loads_only_the_remaining_items() -> None:
    dataset = CountingDataset(10)
    loader = make_dataloader(dataset, seed=0, batch_size=3, shuffle=True)
    position_loader(loader, epoch=1, batches_done=2)
    remaining = [index for batch in loader if isinstance(batch, Tensor) for index in batch.tolist()]
    assert len(remaining) == 4
    assert sorted(dataset.fetched) == sorted(remaining)


def test_positioning_a_million_batches_in_loads_nothing_skipped() -> None:
    batches, batch_size, tail = 1_000_000, 2, 3
    dataset = CountingDataset(batches * batch_size + tail)
    loader = make_dataloader(dataset, seed=0, batch_size=batch_size, shuffle=False)
    assert position_loader(loader, epoch=0, batches_done=batches)
    assert as_lists(list(loader)) == [[2_000_000, 2_000_001], [2_000_002]]
    assert dataset.fetched == [2_000_000, 2_000_001, 2_000_002]


def test_positioning_without_automatic_batching_counts_items() -> None:
    loader = make_dataloader(list(range(6)), seed=2, batch_size=None, shuffle=True)
    position_loader(loader, epoch=1, batches_done=0)
    full = as_lists(list(loader))
    position_loader(loader, epoch=1, batches_done=4)
    assert as_lists(list(loader)) == full[4:]


class PositionableBatches(Sampler[list[int]]):
    """A user batch sampler that can be positioned, recording what it is told."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.positions: list[int] = []
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def start_at(self, position: int) -> None:
        self.positions.append(position)
        self._start = position

    def __len__(self) -> int:
        return 3

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        return iter([[0, 1], [2, 3], [4]][start:])


def test_a_positionable_batch_sampler_is_started_at_the_batch_count() -> None:
    batches = PositionableBatches()
    loader = make_dataloader(list(range(5)), batch_sampler=batches)
    assert position_loader(loader, epoch=1, batches_done=2)
    assert batches.positions == [2]
    assert as_lists(list(loader)) == [[4]]


def test_user_batch_sampler_is_told_the_epoch_each_epoch() -> None:
    batches = PositionableBatches()
    loader = make_dataloader(list(range(5)), batch_sampler=batches)
    for epoch in (1, 2, 3):
        position_loader(loader, epoch=epoch, batches_done=0)
        list(loader)
    assert batches.epochs == [1, 2, 3]


class EpochRecordingSampler(SequentialSampler):
    """A sampler recording ``set_epoch`` calls."""

    def __init__(self, data: Sequence[object]) -> None:
        super().__init__(data)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_a_sampler_reachable_twice_is_told_the_epoch_once() -> None:
    sampler = EpochRecordingSampler(list(range(4)))
    loader = DataLoader(CountingDataset(4), sampler=sampler, batch_size=2)
    assert loader.sampler is sampler
    assert getattr(loader.batch_sampler, "sampler", None) is sampler
    set_loader_epoch(loader, 6)
    assert sampler.epochs == [6]


def test_unpositionable_sampler_warns_names_its_type_and_returns_false() -> None:
    loader = make_dataloader(list(range(8)), batch_size=2, sampler=RandomSampler(range(8)))
    with pytest.warns(ResumeWarning, match="RandomSampler.*drawing and discarding 2 batches"):
        assert not position_loader(loader, epoch=1, batches_done=2)


def test_iterable_dataset_warns_and_returns_false() -> None:
    class Stream(IterableDataset[int]):
        def __iter__(self) -> Iterator[int]:
            return iter(range(6))

    loader = make_dataloader(Stream(), batch_size=2)
    with pytest.warns(ResumeWarning, match="IterableDataset .*Stream"):
        assert not position_loader(loader, epoch=1, batches_done=1)


def test_batch_sampler_subclass_is_not_assumed_to_batch_contiguously() -> None:
    class Shuffled(BatchSampler):
        pass

    sampler = ResumableSampler(6, shuffle=False, seed=0)
    loader = make_dataloader(list(range(6)), batch_sampler=Shuffled(sampler, 2, False))
    with pytest.warns(ResumeWarning, match="batch sampler .*Shuffled"):
        assert not position_loader(loader, epoch=0, batches_done=1)


def test_batches_done_zero_never_warns() -> None:
    loaders = [
        make_dataloader(list(range(8)), batch_size=2, sampler=RandomSampler(range(8))),
        make_dataloader(list(range(8)), batch_size=2, shuffle=True),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(position_loader(loader, epoch=1, batches_done=0) for loader in loaders)


@pytest.mark.parametrize(
    ("batches_done", "fragment"),
    [(-1, "batches_done must be >= 0, got -1"), (4, "batches_done must be <= 3 .*got 4")],
)
def test_batches_done_outside_the_epoch_is_rejected(batches_done: int, fragment: str) -> None:
    loader = make_dataloader(list(range(5)), batch_size=2, shuffle=True)
    with pytest.raises(ConfigurationError, match=fragment):
        position_loader(loader, epoch=1, batches_done=batches_done)


def test_a_batch_sampler_over_an_unpositionable_sampler_names_that_sampler() -> None:
    data = CountingDataset(8)
    loader: DataLoader[int] = DataLoader(
        data, batch_sampler=BatchSampler(RandomSampler(data), 2, False)
    )
    with pytest.warns(ResumeWarning, match="the sampler RandomSampler has no start_at"):
        assert not position_loader(loader, epoch=1, batches_done=1)


@pytest.mark.parametrize(("saved", "now", "first"), [(4, 2, 8), (2, 4, 4), (3, 2, 6)])
def test_a_changed_batch_size_skips_the_samples_the_saved_batches_held_and_warns(
    saved: int, now: int, first: int
) -> None:
    loader = make_dataloader(list(range(16)), batch_size=now, shuffle=False)
    with pytest.warns(ResumeWarning, match=f"batch size was {saved} .* is {now} now"):
        assert position_loader(loader, epoch=1, batches_done=2, batch_size=saved)
    samples = [int(sample) for batch in loader if isinstance(batch, Tensor) for sample in batch]
    assert samples == list(range(first, 16))


def test_the_saved_batch_size_bounds_the_batches_done() -> None:
    loader = make_dataloader(list(range(10)), batch_size=2, shuffle=False)
    with pytest.warns(ResumeWarning), pytest.raises(ConfigurationError, match=r"<= 3 .*of 4"):
        position_loader(loader, epoch=1, batches_done=4, batch_size=4)
    with pytest.warns(ResumeWarning):  # 3 batches of 4 used all 10 samples
        assert position_loader(loader, epoch=1, batches_done=3, batch_size=4)
    assert list(loader) == []


def test_an_unchanged_batch_size_does_not_warn() -> None:
    loader = make_dataloader(list(range(8)), batch_size=2, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert position_loader(loader, epoch=1, batches_done=2, batch_size=2)


# --- make_dataloader's options -------------------------------------------------------------


def test_user_sampler_batch_sampler_and_generator_are_kept() -> None:
    sampler = RandomSampler(range(6))
    generator = torch.Generator()
    loader = make_dataloader(list(range(6)), sampler=sampler, generator=generator, batch_size=2)
    assert loader.sampler is sampler
    assert loader.generator is generator
    assert find_resumable_sampler(loader) is None
    batches = PositionableBatches()
    assert make_dataloader(list(range(5)), batch_sampler=batches).batch_sampler is batches


def test_default_loader_has_a_resumable_sampler_and_its_own_generator() -> None:
    loader = make_dataloader(list(range(6)), seed=17, batch_size=2, shuffle=True)
    sampler = find_resumable_sampler(loader)
    assert sampler is not None
    assert (sampler.seed, sampler.shuffle) == (17, True)
    assert loader.generator is not None
    assert loader.generator is not torch.default_generator


def test_iterable_dataset_is_passed_through_unchanged() -> None:
    class Stream(IterableDataset[int]):
        def __iter__(self) -> Iterator[int]:
            return iter(range(3))

    stream = Stream()
    loader = make_dataloader(stream, batch_size=2, num_workers=0)
    assert loader.dataset is stream
    assert loader.generator is None


def test_unknown_option_is_rejected_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError, match="'batch_szie'; did you mean 'batch_size'"):
        make_dataloader(list(range(3)), batch_szie=2)  # type: ignore[call-arg]  # the typo under test


def _three() -> Iterator[int]:
    yield from range(3)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: None, "None: give a dataset"),
        (lambda: 5, "an int 5, not a dataset: give a dataset (a torch Dataset, an"),
        (lambda: "data.csv", "the str 'data.csv', not a dataset: load the data it names"),
        (lambda: b"data.csv", "the bytes b'data.csv', not a dataset: load the data it names"),
        (_three, "a generator <generator object"),
        (lambda: {"a": 1}, "a dict (a mapping) whose keys are not the indices 0, 1, 2..."),
        (lambda: {1: "a", 2: "b"}, "a dict (a mapping) whose keys are not the indices"),
        (lambda: {1, 2}, "a set {1, 2}, not a dataset"),
        (lambda: DataLoader(CountingDataset(2)), "already a DataLoader: use it as it is"),
        (lambda: Words, "the class Words, not a dataset: give an instance of it"),
    ],
)
def test_what_a_dataloader_cannot_read_is_refused_naming_the_argument_and_its_type(
    make: Callable[[], object], message: str
) -> None:
    # Without the check, the loader is built and fails when read (torch's `KeyError: 0` for
    # a dict, "object of type 'int' has no len()" for a number), or yields characters.
    with pytest.raises(ConfigurationError) as caught:
        make_dataloader(make())  # type: ignore[arg-type]  # the mistakes under test
    assert str(caught.value).startswith(f"make_dataloader(): dataset is {message}")


class Words:
    """Read by index and sized, but neither a torch Dataset nor a Sequence."""

    def __getitem__(self, index: int) -> str:
        return f"word{index}"

    def __len__(self) -> int:
        return 4


def test_what_a_dataloader_reads_by_index_is_taken_though_no_sequence() -> None:
    words = make_dataloader(Words(), batch_size=2, collate_fn=list)  # type: ignore[arg-type]  # read by index, not a Sequence
    assert list(words) == [["word0", "word1"], ["word2", "word3"]]
    numbers = make_dataloader(torch.arange(6), batch_size=3)  # type: ignore[arg-type]  # idem
    assert as_lists(list(numbers)) == [[0, 1, 2], [3, 4, 5]]
    assert len(make_dataloader(np.arange(4), batch_size=2)) == 2  # type: ignore[arg-type]  # idem
    # A mapping keyed by the positions 0, 1, 2... reads as a sequence does.
    by_position = make_dataloader({0: 10, 1: 11, 2: 12}, batch_size=3)  # type: ignore[arg-type]  # idem
    assert as_lists(list(by_position)) == [[10, 11, 12]]


def test_a_seed_that_is_not_an_int_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="seed must be an int, got '7'"):
        make_dataloader(list(range(3)), seed="7")  # type: ignore[arg-type]  # wrong on purpose


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"num_workers": "2"}, "num_workers must be an int, got '2'"),
        ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
        ({"num_workers": True}, "num_workers must be an int, got True"),
    ],
)
def test_a_bad_num_workers_is_rejected_naming_it(options: LoaderKwargs, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        make_dataloader(list(range(3)), **options)


def test_a_shard_that_is_not_a_shard_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="shard must be a Shard or None, got \\(0, 2\\)"):
        make_dataloader(list(range(3)), shard=(0, 2))  # type: ignore[arg-type]  # wrong on purpose


def test_pad_that_is_not_a_bool_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="pad must be a bool, got 'no'"):
        ResumableSampler(4, shuffle=False, seed=0, pad="no")  # type: ignore[arg-type]  # wrong on purpose


class _Stream(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(4))


@pytest.mark.parametrize(
    ("dataset", "options", "fragment"),
    [
        (list(range(8)), {"sampler": RandomSampler(range(8))}, "the RandomSampler you passed"),
        (
            list(range(8)),
            {"batch_sampler": BatchSampler(SequentialSampler(range(8)), 2, False)},
            "the BatchSampler you passed",
        ),
        (_Stream(), {}, "the iterable dataset _Stream"),
    ],
)
def test_data_that_cannot_be_sharded_warns_that_every_process_loads_all_of_it(
    dataset: Dataset[int] | list[int], options: LoaderKwargs, fragment: str
) -> None:
    with pytest.warns(UserWarning, match=f"rank 1 of 2: {fragment}.*every process loads all"):
        make_dataloader(dataset, shard=Shard(rank=1, world_size=2), **options)


def test_samplers_that_shard_themselves_are_trusted_under_a_shard() -> None:
    data = CountingDataset(8)
    sharded = [
        {"sampler": DistributedSampler(data, num_replicas=2, rank=1)},
        {"sampler": ResumableSampler(data, shuffle=True, seed=0, rank=1, world_size=2)},
        {"batch_sampler": BatchSampler(DistributedSampler(data, num_replicas=2, rank=1), 2, False)},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for options in sharded:
            make_dataloader(data, shard=Shard(rank=1, world_size=2), **options)  # type: ignore[arg-type]  # each dict is one option
        make_dataloader(data, shard=Shard(rank=0, world_size=1), sampler=RandomSampler(data))


@pytest.mark.slow
def test_set_loader_seed_moves_the_generator_and_the_workers_item_seeds() -> None:
    def noise_of(loader: DataLoader[object]) -> list[Tensor]:
        set_loader_epoch(loader, 2)
        return [batch for batch in loader if isinstance(batch, Tensor)]

    def made(seed: int) -> DataLoader[object]:
        # The order is the sampler's own (seed 0 for both): only the loader's seed differs.
        sampler = ResumableSampler(6, shuffle=True, seed=0)
        return make_dataloader(
            NoisyDataset(6), seed=seed, batch_size=2, sampler=sampler, num_workers=1
        )

    expected = noise_of(made(5))
    other = made(9)
    assert loader_seed(other) == 9
    assert not same(noise_of(other), expected)
    set_loader_seed(other, 5)
    assert loader_seed(other) == 5
    assert same(noise_of(other), expected)


def test_numpy_integer_indices_seed_like_python_ints() -> None:
    assert _index_key(np.int64(3)) == _index_key(3) == 3
    assert _index_key(torch.tensor(3)) == 3
    assert _index_key("key") == "'key'"


def test_persistent_workers_warns_that_resume_is_not_exact() -> None:
    with pytest.warns(ResumeWarning, match="persistent_workers=True"):
        make_dataloader(list(range(3)), num_workers=1, persistent_workers=True)


def test_workers_wrap_the_dataset_which_forwards_length_and_attributes() -> None:
    dataset = CountingDataset(5)
    unwrapped = make_dataloader(dataset, num_workers=0)
    assert unwrapped.dataset is dataset
    loader = make_dataloader(dataset, num_workers=2)
    assert loader.dataset is not dataset
    assert len(loader.dataset) == 5  # type: ignore[arg-type]  # map-style: it has __len__
    assert getattr(loader.dataset, "length", None) == 5
    assert not hasattr(loader.dataset, "__getitems__")
    assert getattr(loader.dataset, "__wrapped__", None) is dataset
    assert pickle.loads(pickle.dumps(loader.worker_init_fn)) is not None


class Curriculum(Dataset[int]):
    """Items depend on the dataset's own epoch; it also has a ``dataset`` attribute of its own."""

    def __init__(self) -> None:
        self.epoch = 0
        self.dataset = "its own"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return self.epoch * 100 + index


def test_the_worker_wrapper_hands_set_epoch_and_attribute_access_to_the_dataset() -> None:
    dataset = Curriculum()
    loader = make_dataloader(dataset, seed=0, batch_size=4, num_workers=2)
    assert loader.dataset is not dataset
    wrapper = cast(Curriculum, loader.dataset)  # it stands in for the dataset
    wrapper.set_epoch(3)
    assert dataset.epoch == 3
    assert wrapper.epoch == 3
    assert wrapper.dataset == "its own"  # not the wrapper's own
    wrapper.epoch = 5
    assert dataset.epoch == 5
    del wrapper.dataset
    assert not hasattr(dataset, "dataset")
    set_loader_epoch(loader, 7)  # the loader's epoch is the wrapper's business, not the dataset's
    assert dataset.epoch == 5


@pytest.mark.slow
def test_a_datasets_own_set_epoch_through_the_wrapper_reaches_the_workers() -> None:
    loader = make_dataloader(Curriculum(), seed=0, batch_size=4, num_workers=2)
    cast(Curriculum, loader.dataset).set_epoch(3)  # as with num_workers=0
    assert as_lists(list(loader)) == [[300, 301, 302, 303]]


def test_in_order_false_is_refused_because_a_resume_needs_a_fixed_order() -> None:
    with pytest.raises(ConfigurationError, match=r"in_order must be True, got False: .*resume"):
        make_dataloader(list(range(4)), seed=0, batch_size=2, num_workers=2, in_order=False)
    make_dataloader(list(range(4)), seed=0, batch_size=2, num_workers=2, in_order=True)


def user_worker_init(worker_id: int) -> None:
    """A user's worker_init_fn: leaves a mark that the dataset below returns."""
    globals()["WORKER_MARK"] = 1000 + worker_id


WORKER_MARK = 0


class MarkDataset(Dataset[int]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return WORKER_MARK


def test_user_worker_init_fn_is_chained_after_ours_and_pickles() -> None:
    loader = make_dataloader(MarkDataset(), num_workers=1, worker_init_fn=user_worker_init)
    assert loader.worker_init_fn is not user_worker_init
    copy = pickle.loads(pickle.dumps(loader.worker_init_fn))
    assert getattr(copy, "user_fn", None) is user_worker_init
    assert pickle.loads(pickle.dumps(seed_worker)) is seed_worker


@pytest.mark.slow
def test_user_worker_init_fn_runs_in_the_workers() -> None:
    loader = make_dataloader(MarkDataset(), num_workers=1, worker_init_fn=user_worker_init)
    assert as_lists(list(loader)) == [[1000]] * 4


# --- worker randomness -------------------------------------------------------------------


class NoisyDataset(Dataset[Tensor]):
    """Item ``i`` is ``(i, torch noise, NumPy noise, random noise)``: augmentation in miniature."""

    def __init__(self, length: int = 10) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        return torch.tensor(
            [float(index), torch.rand(()).item(), float(np.random.rand()), random.random()],
            dtype=torch.float64,
        )


class BatchedNoisyDataset(NoisyDataset):
    """The same, fetched a batch at a time through ``__getitems__``."""

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        return [self[index] for index in indices]


def noisy_batches(
    dataset: NoisyDataset, *, epoch: int, batches_done: int, seed: int = 3
) -> list[Tensor]:
    """The batches of a fresh loader (as a new process builds it) positioned at a batch."""
    loader = make_dataloader(dataset, seed=seed, batch_size=3, shuffle=True, num_workers=2)
    assert position_loader(loader, epoch=epoch, batches_done=batches_done)
    return [batch for batch in loader if isinstance(batch, Tensor)]


def same(first: Sequence[Tensor], second: Sequence[Tensor]) -> bool:
    return len(first) == len(second) and all(map(torch.equal, first, second))


@pytest.mark.slow
@pytest.mark.parametrize("dataset_type", [NoisyDataset, BatchedNoisyDataset])
def test_resumed_workers_reproduce_the_uninterrupted_noise_bit_for_bit(
    dataset_type: type[NoisyDataset],
) -> None:
    full = noisy_batches(dataset_type(), epoch=2, batches_done=0)
    assert len(full) == 4
    for done in (1, 3):
        assert same(noisy_batches(dataset_type(), epoch=2, batches_done=done), full[done:])


@pytest.mark.slow
def test_persistent_workers_draw_each_epochs_noise_as_fresh_workers_do() -> None:
    def epochs_noise(*, persistent: bool) -> list[Tensor]:
        loader = make_dataloader(
            NoisyDataset(6), seed=3, batch_size=3, num_workers=2, persistent_workers=persistent
        )
        noise = []
        for epoch in (1, 2, 3):
            set_loader_epoch(loader, epoch)
            noise.append(torch.cat([batch for batch in loader if isinstance(batch, Tensor)]))
        return noise

    with pytest.warns(ResumeWarning, match="persistent_workers=True"):
        persistent = epochs_noise(persistent=True)
    assert same(persistent, epochs_noise(persistent=False))
    assert not torch.equal(persistent[0][:, 1:], persistent[1][:, 1:])
    assert not torch.equal(persistent[1][:, 1:], persistent[2][:, 1:])


def test_an_items_seeds_are_a_function_of_seed_epoch_and_index_and_spare_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(seed: int) -> None:
        raise AssertionError("torch.manual_seed also seeds every CUDA device; workers must not")

    monkeypatch.setattr(torch, "manual_seed", refuse)

    def draws(seed: int, epoch: int, index: int) -> tuple[float, float, float]:
        seeds = _ItemSeeds(seed)
        seeds.set_epoch(epoch)
        seeds.reseed([index])
        return torch.rand(()).item(), float(np.random.rand()), random.random()

    first = draws(1, 2, 3)
    assert draws(1, 2, 3) == first
    others = {draws(1, 2, 4), draws(1, 3, 3), draws(2, 2, 3)}
    assert first not in others
    assert len(others) == 3
    assert len(set(first)) == 3  # the three libraries do not draw in step


@pytest.mark.slow
def test_two_iterations_of_one_epoch_give_the_same_noise() -> None:
    loader = make_dataloader(NoisyDataset(), seed=3, batch_size=3, shuffle=True, num_workers=2)
    position_loader(loader, epoch=1, batches_done=0)
    first = [batch for batch in loader if isinstance(batch, Tensor)]
    second = [batch for batch in loader if isinstance(batch, Tensor)]  # no reseed in between
    assert same(first, second)


@pytest.mark.slow
def test_noise_differs_between_epochs_and_between_libraries() -> None:
    def by_index(batches: list[Tensor]) -> Tensor:
        rows = torch.cat(batches)
        return rows[rows[:, 0].argsort()]

    epoch_one = by_index(noisy_batches(NoisyDataset(), epoch=1, batches_done=0))
    epoch_two = by_index(noisy_batches(NoisyDataset(), epoch=2, batches_done=0))
    assert torch.equal(epoch_one[:, 0], epoch_two[:, 0])
    assert not (epoch_one[:, 1:] == epoch_two[:, 1:]).any()
    noise = epoch_one[:, 1:]
    assert len(set(noise.flatten().tolist())) == noise.numel()  # no two sources in lockstep


@pytest.mark.slow
def test_without_per_item_reseeding_a_resume_gets_other_noise() -> None:
    # The control for the tests above: worker seeds alone do not survive a resume, because the
    # resumed run hands batch k to worker 0 instead of worker k % num_workers.
    def batches(batches_done: int) -> list[Tensor]:
        sampler = ResumableSampler(10, shuffle=True, seed=3)
        sampler.set_epoch(2)
        sampler.start_at(batches_done * 3)
        loader = DataLoader(
            NoisyDataset(),
            sampler=sampler,
            batch_size=3,
            num_workers=2,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(5),
        )
        return list(loader)

    full = batches(0)
    resumed = batches(1)
    assert [batch[:, 0].tolist() for batch in resumed] == [
        batch[:, 0].tolist() for batch in full[1:]
    ]
    assert not same(resumed, full[1:])


# --- the documentation ---------------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "data-order.md"


def test_the_data_order_page_examples_run() -> None:
    blocks = python_blocks("docs/data-order.md")
    assert len(blocks) == 2
    for number, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {number}", "exec"), {"__name__": "doc_example"})

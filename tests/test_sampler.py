"""ResumableSampler: order as a pure function of (seed, epoch, rank, world size), start_at."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from typedbrain._errors import ConfigurationError
from typedbrain._sampler import (
    Positionable,
    ResumableSampler,
    batches_from,
    mix_seed,
    position_loader,
)

sizes = st.integers(0, 60)
seeds = st.integers(-(2**70), 2**70)
epochs = st.integers(0, 1_000)


@given(size=sizes, seed=seeds, epoch=epochs, shuffle=st.booleans())
def test_two_fresh_samplers_with_same_seed_and_epoch_agree(
    size: int, seed: int, epoch: int, shuffle: bool
) -> None:
    first = ResumableSampler(size, shuffle=shuffle, seed=seed)
    second = ResumableSampler(list(range(size)), shuffle=shuffle, seed=seed)
    first.set_epoch(epoch)
    second.set_epoch(epoch)
    assert list(first) == list(second)
    assert sorted(first) == list(range(size))


def test_order_does_not_depend_on_the_epochs_visited_before() -> None:
    direct = ResumableSampler(50, shuffle=True, seed=1)
    direct.set_epoch(7)
    walked = ResumableSampler(50, shuffle=True, seed=1)
    for epoch in range(8):
        walked.set_epoch(epoch)
        list(walked)
    walked.set_epoch(7)
    assert list(walked) == list(direct)


def test_shuffled_orders_differ_between_epochs_and_seeds() -> None:
    sampler = ResumableSampler(100, shuffle=True, seed=5)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    other_seed = ResumableSampler(100, shuffle=True, seed=6)
    orders.append(list(other_seed))
    assert len({tuple(order) for order in orders}) == len(orders)


def test_iterating_twice_in_one_epoch_gives_the_same_order() -> None:
    sampler = ResumableSampler(30, shuffle=True, seed=2)
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler)


@given(size=sizes, seed=seeds, epoch=epochs)
def test_unshuffled_order_is_sequential(size: int, seed: int, epoch: int) -> None:
    sampler = ResumableSampler(size, shuffle=False, seed=seed)
    sampler.set_epoch(epoch)
    assert list(sampler) == list(range(size))


def test_iterating_leaves_the_global_torch_rng_untouched() -> None:
    sampler = ResumableSampler(40, shuffle=True, seed=0)
    before = torch.get_rng_state()
    list(sampler)
    sampler.set_epoch(1)
    sampler.start_at(3)
    list(sampler)
    assert torch.equal(torch.get_rng_state(), before)


def test_length_is_read_from_the_dataset_at_each_iteration() -> None:
    data = [0, 1, 2]
    sampler = ResumableSampler(data, shuffle=False, seed=0)
    data.append(3)
    assert len(sampler) == 4
    assert list(sampler) == [0, 1, 2, 3]


@given(
    size=sizes,
    seed=seeds,
    epoch=epochs,
    shuffle=st.booleans(),
    world_size=st.integers(1, 5),
    data=st.data(),
)
def test_start_at_skips_exactly_the_first_positions_once(
    size: int, seed: int, epoch: int, shuffle: bool, world_size: int, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, world_size - 1), label="rank")
    sampler = ResumableSampler(size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    sampler.set_epoch(epoch)
    full = list(sampler)
    position = data.draw(st.integers(0, len(sampler)), label="position")
    sampler.start_at(position)
    assert list(sampler) == full[position:]
    assert list(sampler) == full


def test_set_epoch_cancels_a_pending_start_at() -> None:
    sampler = ResumableSampler(10, shuffle=True, seed=0)
    sampler.start_at(4)
    sampler.set_epoch(1)
    assert len(list(sampler)) == 10


def test_start_at_is_consumed_when_iteration_starts() -> None:
    sampler = ResumableSampler(10, shuffle=False, seed=0)
    sampler.start_at(8)
    iterator = iter(sampler)
    # A second iteration begun before the first is read is not positioned.
    assert list(sampler) == list(range(10))
    assert list(iterator) == [8, 9]


def test_start_at_near_the_end_of_a_huge_epoch_yields_only_the_tail() -> None:
    size = 5_000_000
    sampler = ResumableSampler(size, shuffle=False, seed=0)
    sampler.start_at(size - 3)
    assert list(sampler) == [size - 3, size - 2, size - 1]


@given(
    size=st.integers(0, 40),
    seed=seeds,
    epoch=epochs,
    shuffle=st.booleans(),
    world_size=st.integers(1, 6),
)
def test_ranks_partition_the_padded_epoch_permutation(
    size: int, seed: int, epoch: int, shuffle: bool, world_size: int
) -> None:
    single = ResumableSampler(size, shuffle=shuffle, seed=seed)
    single.set_epoch(epoch)
    permutation = list(single)
    per_rank = []
    for rank in range(world_size):
        sampler = ResumableSampler(
            size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size
        )
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler) == -(-size // world_size)
    padded_length = len(per_rank[0]) * world_size
    padded = (permutation * world_size)[:padded_length]  # repeats from the start, as needed
    interleaved = [
        per_rank[position % world_size][position // world_size] for position in range(padded_length)
    ]
    assert interleaved == padded
    assert set().union(*per_rank) == set(range(size))


def test_each_rank_order_is_a_function_of_seed_epoch_rank_and_world_size() -> None:
    def order(seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
        sampler = ResumableSampler(23, shuffle=True, seed=seed, rank=rank, world_size=world_size)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 2, 1, 3) == order(1, 2, 1, 3)
    variants = {
        tuple(order(*args))
        for args in [(1, 2, 1, 3), (2, 2, 1, 3), (1, 3, 1, 3), (1, 2, 0, 3), (1, 2, 1, 4)]
    }
    assert len(variants) == 5


def test_state_dict_round_trip_restores_the_order() -> None:
    original = ResumableSampler(20, shuffle=True, seed=11)
    original.set_epoch(4)
    restored = ResumableSampler(20, shuffle=True, seed=0)
    restored.load_state_dict(original.state_dict())
    assert original.state_dict() == {"seed": 11, "epoch": 4}
    assert (restored.seed, restored.epoch) == (11, 4)
    assert list(restored) == list(original)


def test_load_state_dict_drops_a_pending_position() -> None:
    sampler = ResumableSampler(5, shuffle=False, seed=0)
    sampler.start_at(3)
    sampler.load_state_dict({"seed": 0, "epoch": 1})
    assert list(sampler) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("state", "fragment"),
    [({"seed": 1}, "'epoch'"), ({"epoch": 1}, "'seed'"), ({"seed": 1, "epoch": -1}, "epoch")],
)
def test_load_state_dict_rejects_incomplete_or_invalid_state(
    state: dict[str, int], fragment: str
) -> None:
    sampler = ResumableSampler(5, shuffle=False, seed=0)
    with pytest.raises(ConfigurationError, match=fragment):
        sampler.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"data_source": -1}, "data_source must be >= 0, got -1"),
        ({"data_source": 3.5}, "data_source must be a sized dataset or an int"),
        ({"seed": 1.5}, "seed must be an int, got 1.5"),
        ({"shuffle": 1}, "shuffle must be a bool, got 1"),
        ({"world_size": 0}, "world_size must be >= 1, got 0"),
        ({"rank": -1}, "rank must be >= 0, got -1"),
        ({"rank": 2, "world_size": 2}, "rank must be < world_size=2, got 2"),
    ],
)
def test_invalid_arguments_are_named_in_the_error(kwargs: dict[str, object], fragment: str) -> None:
    arguments: dict[str, object] = {"data_source": 4, "shuffle": True, "seed": 0, **kwargs}
    with pytest.raises(ConfigurationError, match=fragment):
        ResumableSampler(**arguments)  # type: ignore[arg-type]  # invalid on purpose


@pytest.mark.parametrize(
    ("position", "fragment"),
    [(-1, "position must be >= 0, got -1"), (6, "position must be <= 5"), (True, "an int")],
)
def test_start_at_rejects_positions_outside_the_epoch(position: int, fragment: str) -> None:
    sampler = ResumableSampler(5, shuffle=True, seed=0)
    with pytest.raises(ConfigurationError, match=fragment):
        sampler.start_at(position)


def test_set_epoch_rejects_a_negative_epoch() -> None:
    with pytest.raises(ConfigurationError, match="epoch must be >= 0, got -2"):
        ResumableSampler(5, shuffle=True, seed=0).set_epoch(-2)


def test_positionable_recognises_samplers_with_start_at_only() -> None:
    assert isinstance(ResumableSampler(3, shuffle=False, seed=0), Positionable)
    assert not isinstance(RandomSampler(range(3)), Positionable)
    assert not isinstance(BatchSampler(SequentialSampler(range(3)), 2, False), Positionable)


def test_mix_seed_is_stable_and_separates_its_inputs() -> None:
    seeds_seen = {
        mix_seed("a", 1, 2),
        mix_seed("a", 2, 1),
        mix_seed("b", 1, 2),
        mix_seed("a", 12),
        mix_seed("a", "1", 2),
        mix_seed("a", 1, 2, 0),
    }
    assert len(seeds_seen) == 6
    assert mix_seed("a", 1, 2) == mix_seed("a", 1, 2)
    assert all(0 <= seed < 2**63 for seed in seeds_seen)
    # A fixed value: the derivation must not change between releases, or resumes would break.
    assert mix_seed("typedbrain.sampler", 0, 0) == 3018279082612143911


@given(
    n=st.integers(0, 50),
    world_size=st.integers(1, 4),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
)
def test_unpadded_shards_partition_the_epoch_without_repeats(
    n: int, world_size: int, shuffle: bool, seed: int, epoch: int
) -> None:
    shards = []
    for rank in range(world_size):
        sampler = ResumableSampler(
            n, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, pad=False
        )
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    assert sorted(index for shard in shards for index in shard) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_batches_from_fast_forwards_a_loader_that_cannot_be_positioned() -> None:
    from torch.utils.data import DataLoader, Dataset

    from typedbrain._errors import CheckpointError, ResumeWarning
    from typedbrain._sampler import batches_from

    data = cast(Dataset[object], list(range(10)))  # a list serves as a map-style dataset
    loader = DataLoader(data, batch_size=2, sampler=SequentialSampler(range(10)))
    with pytest.warns(ResumeWarning):
        rest = batches_from(loader, epoch=1, batches_done=3)
    assert [cast(torch.Tensor, batch).tolist() for batch in rest] == [[6, 7], [8, 9]]
    with pytest.warns(ResumeWarning), pytest.raises(CheckpointError, match="only 5 batches"):
        batches_from(loader, epoch=1, batches_done=6)


def test_batches_from_a_positionable_loader_too_short_for_the_checkpoint_names_the_checkpoint() -> (
    None
):
    from typedbrain._data import make_dataloader
    from typedbrain._errors import CheckpointError
    from typedbrain._sampler import batches_from

    loader = make_dataloader(list(range(4)), batch_size=2, seed=0)  # 2 batches per epoch
    with pytest.raises(
        CheckpointError,
        match=r"the checkpoint was taken after batch 4 of epoch 1, but the training loader "
        r"cannot continue from there \(.*\): is the training set smaller than it was\?",
    ):
        batches_from(loader, epoch=1, batches_done=4)
    assert list(batches_from(loader, epoch=1, batches_done=2)) == []


def test_positioning_a_users_loader_with_workers_warns_that_their_randomness_starts_afresh() -> (
    None
):
    import warnings

    from torch.utils.data import DataLoader, Dataset

    from typedbrain._data import make_dataloader
    from typedbrain._errors import ResumeWarning
    from typedbrain._sampler import position_loader

    data = cast(Dataset[object], list(range(10)))

    def users(num_workers: int) -> DataLoader[object]:
        sampler = ResumableSampler(10, shuffle=True, seed=3)
        return DataLoader(data, batch_size=2, sampler=sampler, num_workers=num_workers)

    with pytest.warns(ResumeWarning, match="not built by make_dataloader"):
        assert position_loader(users(2), epoch=1, batches_done=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Nothing skipped, no workers, or workers reseeded per item: exact, so no warning.
        assert position_loader(users(2), epoch=1, batches_done=0)
        assert position_loader(users(0), epoch=1, batches_done=2)
        made = make_dataloader(data, seed=3, batch_size=2, shuffle=True, num_workers=2)
        assert position_loader(made, epoch=1, batches_done=2)


def test_loader_generators_are_those_not_reseeded_by_the_run_each_once() -> None:
    from torch.utils.data import DataLoader, Dataset, RandomSampler

    from typedbrain._data import make_dataloader
    from typedbrain._sampler import loader_generators

    data = cast(Dataset[object], list(range(8)))
    own, samplers = torch.Generator(), torch.Generator()
    assert loader_generators(DataLoader(data, shuffle=True, generator=own)) == [own]
    sampled = DataLoader(data, sampler=RandomSampler(range(8), generator=samplers), generator=own)
    assert loader_generators(sampled) == [own, samplers]
    assert loader_generators(DataLoader(data, batch_size=2)) == []  # draws from the globals
    # make_dataloader reseeds the generator it makes from (seed, epoch): not kept; the ones
    # it is given, the loader's or a sampler's, are.
    assert loader_generators(make_dataloader(list(range(8)), shuffle=True)) == []
    assert loader_generators(make_dataloader(list(range(8)), shuffle=True, generator=own)) == [own]
    given = RandomSampler(range(8), generator=samplers)
    assert loader_generators(make_dataloader(list(range(8)), sampler=given)) == [samplers]


def test_generator_states_restore_exactly_and_a_changed_count_warns_and_restores_none() -> None:
    from typedbrain._errors import ResumeWarning
    from typedbrain._rng import capture_generators, restore_generators

    first, second = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    states = capture_generators([first, second])
    expected = [torch.rand(3, generator=first), torch.rand(3, generator=second)]
    restore_generators([first, second], states, "the loader")
    assert torch.equal(torch.rand(3, generator=first), expected[0])
    assert torch.equal(torch.rand(3, generator=second), expected[1])
    before = first.get_state()
    with pytest.warns(ResumeWarning, match="holds the states of 2 random generators of the loader"):
        restore_generators([first], states, "the loader")
    assert torch.equal(first.get_state(), before)


class _PositionableBatches:
    """A batch sampler with ``start_at``: batches of two, in order, from a batch position."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0

    def start_at(self, position: int) -> None:
        self.position = position

    def __len__(self) -> int:
        return (self.size + 1) // 2

    def __iter__(self) -> Iterator[list[int]]:
        start, self.position = self.position, 0
        for batch in range(start, len(self)):
            yield list(range(2 * batch, min(2 * batch + 2, self.size)))


def test_a_fresh_sampler_is_at_epoch_0_and_yields_that_epochs_order() -> None:
    fresh = ResumableSampler(20, shuffle=True, seed=3)
    assert fresh.epoch == 0
    assert fresh.state_dict() == {"seed": 3, "epoch": 0}
    set_to_zero = ResumableSampler(20, shuffle=True, seed=3)
    set_to_zero.set_epoch(0)
    assert list(fresh) == list(set_to_zero)


def test_a_positionable_batch_sampler_is_positioned_in_batches() -> None:
    data = cast(Dataset[object], list(range(7)))
    loader = DataLoader(data, batch_sampler=_PositionableBatches(7))
    assert position_loader(loader, epoch=1, batches_done=2)
    assert [cast(torch.Tensor, batch).tolist() for batch in loader] == [[4, 5], [6]]


def test_a_loader_without_batching_over_a_positionable_sampler_skips_that_many_items() -> None:
    data = cast(Dataset[object], list(range(6)))
    loader = DataLoader(data, batch_size=None, sampler=ResumableSampler(6, shuffle=False, seed=0))
    assert position_loader(loader, epoch=1, batches_done=4)
    assert list(loader) == [4, 5]


def test_batches_from_sets_the_epoch_unless_told_it_is_set() -> None:
    data = cast(Dataset[object], list(range(8)))
    sampler = ResumableSampler(8, shuffle=True, seed=1)
    loader = DataLoader(data, batch_size=2, sampler=sampler)
    expected = ResumableSampler(8, shuffle=True, seed=1)
    expected.set_epoch(5)
    order = expected.epoch_order().tolist()
    rest = batches_from(loader, epoch=5, batches_done=1)
    assert sampler.epoch == 5
    assert [cast(torch.Tensor, batch).tolist() for batch in rest] == [
        order[2:4],
        order[4:6],
        order[6:8],
    ]
    sampler.set_epoch(2)
    batches_from(loader, epoch=5, batches_done=0, epoch_set=True)
    assert sampler.epoch == 2


def test_more_batches_done_than_a_positionable_batch_sampler_holds_is_refused() -> None:
    data = cast(Dataset[object], list(range(7)))
    loader = DataLoader(data, batch_sampler=_PositionableBatches(7))
    with pytest.raises(
        ConfigurationError, match=r"batches_done must be <= 4 \(the loader's batches per epoch\)"
    ):
        position_loader(loader, epoch=1, batches_done=5)


def test_more_items_done_than_an_unbatched_loader_holds_is_refused_in_its_terms() -> None:
    data = cast(Dataset[object], list(range(6)))
    loader = DataLoader(data, batch_size=None, sampler=ResumableSampler(6, shuffle=False, seed=0))
    with pytest.raises(
        ConfigurationError, match=r"batches_done must be <= 6 \(the loader's batches per epoch\)"
    ):
        position_loader(loader, epoch=1, batches_done=7)


def test_batches_from_a_fresh_epoch_passes_a_bad_argument_on_as_a_configuration_error() -> None:
    data = cast(Dataset[object], list(range(4)))
    loader = DataLoader(data, batch_size=2, sampler=ResumableSampler(4, shuffle=False, seed=0))
    with pytest.raises(ConfigurationError, match="epoch") as caught:
        batches_from(loader, epoch=-1, batches_done=0)
    assert "the checkpoint was taken" not in str(caught.value)

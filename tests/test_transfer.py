"""Batches reach the hooks on the brain's device: ``move_to_device`` and ``Brain.move_batch``.

CI has no GPU, so the moves here go to torch's ``meta`` device (tensors without data, on a
device other than the CPU) or are recorded by a batch class with its own ``to`` method.
tests/test_cuda.py runs the seed tutorial's samples on a GPU.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import attrs
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from tests.helpers import Batch, RegressionBrain, batches
from typedbrain import LoaderKwargs, Stage
from typedbrain._transfer import move_to_device

META = torch.device("meta")
CPU = torch.device("cpu")


class Pair(NamedTuple):
    inputs: Tensor
    targets: Tensor


@attrs.frozen
class AttrsBatch:
    inputs: Tensor
    _lengths: Tensor  # a private field: attrs' __init__ takes it as "lengths"
    names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DataclassBatch:
    inputs: Tensor
    label: str


class OwnMove:
    """A batch class with a ``to`` of its own, as a padded batch has; records the device."""

    def __init__(self) -> None:
        self.asked: list[torch.device] = []

    def to(self, device: torch.device) -> OwnMove:
        self.asked.append(device)
        return self


@attrs.frozen
class Everything:
    """A batch holding one of each kind of container ``move_to_device`` walks."""

    pair: Pair
    items: list[Tensor | str | int]
    maybe: tuple[Tensor, None]
    fields: AttrsBatch
    data: DataclassBatch


def everything() -> Everything:
    return Everything(
        pair=Pair(torch.ones(2), torch.zeros(2)),
        items=[torch.ones(1), "text", 3],
        maybe=(torch.ones(1), None),
        fields=AttrsBatch(torch.ones(2), torch.tensor([2]), ("a",)),
        data=DataclassBatch(torch.ones(2), "label"),
    )


def test_every_tensor_in_nested_containers_moves_and_the_rest_is_kept() -> None:
    batch = everything()
    moved = move_to_device(batch, META)
    assert isinstance(moved.pair, Pair)
    assert moved.pair.inputs.is_meta
    assert moved.pair.targets.is_meta
    assert isinstance(moved.items[0], Tensor)
    assert moved.items[0].is_meta
    assert moved.items[1:] == ["text", 3]
    assert moved.maybe[0].is_meta
    assert moved.maybe[1] is None
    assert moved.fields.inputs.is_meta
    assert moved.fields._lengths.is_meta
    assert moved.fields.names == ("a",)
    assert isinstance(moved.data, DataclassBatch)
    assert moved.data.inputs.is_meta
    assert moved.data.label == "label"
    # The batch given is not changed.
    assert not batch.pair.inputs.is_meta
    assert not batch.fields.inputs.is_meta


def test_dict_subclasses_keep_their_class_and_state() -> None:
    def zeros() -> Tensor:
        return torch.zeros(1)

    ordered = collections.OrderedDict([("b", torch.ones(1)), ("a", torch.ones(1))])
    factory = collections.defaultdict(zeros, {"x": torch.ones(1)})
    moved_ordered = move_to_device(ordered, META)
    moved_factory = move_to_device(factory, META)
    assert type(moved_ordered) is collections.OrderedDict
    assert list(moved_ordered) == ["b", "a"]
    assert type(moved_factory) is collections.defaultdict
    assert moved_factory.default_factory is zeros
    assert moved_factory["x"].is_meta


def test_a_batch_already_on_the_device_is_returned_as_the_same_objects() -> None:
    pair = Pair(torch.ones(2), torch.zeros(2))
    nested = {"pair": pair, "items": [torch.ones(1)], "attrs": AttrsBatch(torch.ones(1), pair[0])}
    moved = move_to_device(nested, CPU)
    assert moved is nested
    assert move_to_device(pair, CPU) is pair


def test_objects_with_their_own_to_are_handed_the_device() -> None:
    own = OwnMove()
    assert move_to_device([own], META)[0] is own
    assert own.asked == [META]


def test_a_packed_sequence_moves_with_its_own_to_and_keeps_its_batch_sizes_on_the_cpu() -> None:
    packed = pack_padded_sequence(torch.ones(3, 2, 4), torch.tensor([3, 2]))
    moved = move_to_device({"audio": packed}, META)["audio"]
    assert isinstance(moved, PackedSequence)
    assert moved.data.is_meta
    assert moved.batch_sizes.device == CPU  # torch refuses a PackedSequence with them elsewhere
    assert move_to_device(packed, CPU) is packed


def test_modules_and_unknown_objects_in_a_batch_are_left_alone() -> None:
    module = torch.nn.Linear(2, 2)
    opaque = object()
    batch = {"module": module, "opaque": opaque, "class": Tensor, "x": torch.ones(1)}
    moved = move_to_device(batch, META)
    assert moved["class"] is Tensor  # Tensor.to is not a method of this batch
    assert moved["module"] is module
    assert module.weight.device == CPU
    assert moved["opaque"] is opaque


class DeviceRecordingBatch:
    """A (inputs, targets) batch whose ``to`` records the devices the brain asks for."""

    def __init__(self, inputs: Tensor, targets: Tensor, log: list[torch.device]) -> None:
        self.inputs, self.targets, self.log = inputs, targets, log
        self.moved = False

    def to(self, device: torch.device) -> DeviceRecordingBatch:
        self.log.append(device)
        moved = DeviceRecordingBatch(self.inputs.to(device), self.targets.to(device), self.log)
        moved.moved = True
        return moved


class MovedOnlyBrain(RegressionBrain):
    """Fails unless every batch a hook sees has been through ``move_batch``."""

    seen: list[tuple[Stage, bool]]

    def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
        assert isinstance(batch, DeviceRecordingBatch)
        self.seen.append((stage, batch.moved))
        return super().compute_forward((batch.inputs, batch.targets), stage)

    def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
        assert isinstance(batch, DeviceRecordingBatch)
        return super().compute_objectives(predictions, (batch.inputs, batch.targets), stage)


def recording_batches(count: int, log: list[torch.device]) -> list[DeviceRecordingBatch]:
    return [DeviceRecordingBatch(x, y, log) for x, y in batches(count, 2)]


def identity(items: list[DeviceRecordingBatch]) -> DeviceRecordingBatch:
    """A collate function for loaders of ready-made batches (batch_size=1)."""
    (batch,) = items
    return batch


def test_fit_and_evaluate_hand_every_hook_the_batch_moved_to_the_brains_device() -> None:
    log: list[torch.device] = []
    brain = MovedOnlyBrain({"model": torch.nn.Linear(4, 2)}, opt_class=torch.optim.SGD)
    brain.seen = []
    kwargs: LoaderKwargs = {"batch_size": 1, "collate_fn": identity}
    brain.fit(
        range(1),
        recording_batches(3, log),
        recording_batches(2, log),
        train_loader_kwargs=kwargs,
        valid_loader_kwargs=kwargs,
        progressbar=False,
    )
    brain.evaluate(recording_batches(2, log), test_loader_kwargs=kwargs, progressbar=False)
    assert (
        brain.seen
        == [(Stage.TRAIN, True)] * 3 + [(Stage.VALID, True)] * 2 + [(Stage.TEST, True)] * 2
    )
    assert log == [CPU] * 7


def test_a_move_batch_that_returns_the_batch_keeps_it_as_the_loader_yields_it() -> None:
    class KeepWhereLoaded(MovedOnlyBrain):
        def move_batch(self, batch: Batch) -> Batch:
            return batch

    log: list[torch.device] = []
    brain = KeepWhereLoaded({"model": torch.nn.Linear(4, 2)}, opt_class=torch.optim.SGD)
    brain.seen = []
    brain.fit(
        range(1),
        recording_batches(2, log),
        train_loader_kwargs={"batch_size": 1, "collate_fn": identity},
        progressbar=False,
    )
    assert brain.seen == [(Stage.TRAIN, False)] * 2
    assert log == []


# Nested batches: tensors, strings and numbers in dicts, lists, tuples and named tuples.
LEAVES = st.one_of(
    st.integers(0, 3).map(torch.ones),
    st.text(max_size=3),
    st.integers(),
    st.none(),
)
NESTED = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=2), inner, max_size=3),
        st.tuples(inner, inner).map(lambda pair: Pair(*pair)),
    ),
    max_leaves=12,
)


def same_shape_on(moved: object, original: object, device: torch.device) -> bool:
    """Whether ``moved`` is ``original`` with its tensors (equal in size) on ``device``."""
    if isinstance(original, Tensor):
        return isinstance(moved, Tensor) and (moved.device, moved.shape) == (
            device,
            original.shape,
        )
    if isinstance(original, dict):
        return (
            isinstance(moved, dict)
            and list(moved) == list(original)
            and all(same_shape_on(moved[key], original[key], device) for key in original)
        )
    if isinstance(original, list | tuple):
        if type(moved) is not type(original):
            return False
        assert isinstance(moved, list | tuple)
        return len(moved) == len(original) and all(
            map(same_shape_on, moved, original, [device] * len(original))
        )
    return moved is original


@given(NESTED)
def test_any_nested_batch_keeps_its_shape_and_a_batch_on_the_device_is_kept_whole(
    batch: object,
) -> None:
    assert same_shape_on(move_to_device(batch, META), batch, META)
    assert move_to_device(batch, CPU) is batch


# Batches whose construction does work: moving them must copy, never construct again.


@dataclasses.dataclass
class ChannelledAudio:
    """A dataclass batch whose ``__post_init__`` adds a channel dimension."""

    wav: Tensor

    def __post_init__(self) -> None:
        self.wav = self.wav.unsqueeze(1)


def shifted(ids: Tensor) -> Tensor:
    """A converter that is wrong to run twice: it shifts the ids by one (0 is for padding)."""
    return ids + 1


@attrs.define
class ShiftedIds:
    """An attrs batch whose converter shifts the ids and whose post-init counts its runs."""

    ids: Tensor = attrs.field(converter=shifted)
    built: list[int] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.built.append(1)


def test_moving_a_dataclass_or_attrs_batch_runs_no_post_init_nor_converter_again() -> None:
    audio = move_to_device(ChannelledAudio(torch.zeros(4, 16000)), META)
    assert audio.wav.is_meta
    assert audio.wav.shape == (4, 1, 16000)
    built: list[int] = []
    ids = ShiftedIds(torch.zeros(3, dtype=torch.long), built)
    moved = move_to_device(ids, META)
    assert moved.ids.is_meta
    assert built == [1]  # the post-init ran when the batch was built, not when it moved
    assert torch.equal(ids.ids, torch.ones(3, dtype=torch.long))  # converted once, kept


@dataclasses.dataclass
class DataclassWithLengths:
    inputs: Tensor
    lengths: Tensor = dataclasses.field(init=False)
    unset: Tensor = dataclasses.field(init=False)


@attrs.define
class AttrsWithMask:
    inputs: Tensor
    mask: Tensor = attrs.field(init=False, factory=lambda: torch.zeros(1))


@attrs.frozen(slots=True)
class FrozenSlotted:
    inputs: Tensor
    lengths: Tensor = attrs.field(init=False)


@dataclasses.dataclass(frozen=True, slots=True)
class FrozenSlottedDataclass:
    inputs: Tensor
    lengths: Tensor = dataclasses.field(init=False)


def test_init_false_fields_are_moved_not_dropped_or_reset() -> None:
    data = DataclassWithLengths(torch.zeros(2, 3))
    data.lengths = torch.tensor([3, 1])
    moved_data = move_to_device(data, META)
    assert moved_data.inputs.is_meta
    assert moved_data.lengths.is_meta
    assert moved_data.lengths.shape == (2,)
    assert not hasattr(moved_data, "unset")  # never set: stays unset
    with_mask = AttrsWithMask(torch.zeros(2))
    with_mask.mask = torch.tensor([7.0, 7.0])
    moved_mask = move_to_device(with_mask, META)
    assert moved_mask.mask.is_meta
    assert moved_mask.mask.shape == (2,)  # not the factory's zeros(1)
    assert not data.lengths.is_meta  # the batch given is not changed


def test_frozen_and_slotted_batches_move_every_field() -> None:
    frozen = FrozenSlotted(torch.zeros(2))
    object.__setattr__(frozen, "lengths", torch.tensor([2]))
    moved = move_to_device(frozen, META)
    assert type(moved) is FrozenSlotted
    assert moved.inputs.is_meta
    assert moved.lengths.is_meta
    frozen_data = FrozenSlottedDataclass(torch.zeros(2))
    object.__setattr__(frozen_data, "lengths", torch.tensor([2]))
    moved_data = move_to_device(frozen_data, META)
    assert moved_data.inputs.is_meta
    assert moved_data.lengths.is_meta
    assert not frozen_data.inputs.is_meta


@dataclasses.dataclass
class DataclassWithDerivedMask:
    """A batch whose ``__post_init__`` derives an attribute that is not a field."""

    wavs: Tensor

    def __post_init__(self) -> None:
        self.mask = self.wavs != 0


def test_attributes_post_init_derived_move_with_the_fields() -> None:
    batch = DataclassWithDerivedMask(torch.tensor([[1.0, 0.0]]))
    moved = move_to_device(batch, META)
    assert moved.wavs.is_meta
    assert moved.mask.is_meta  # as the __post_init__ of the old way of moving made it
    assert not batch.mask.is_meta

"""A brain's run state as frozen attrs classes, and the cattrs converter that owns their format.

State objects are snapshots: the training loop keeps its hot counters as plain attributes (an
``attrs.evolve`` per batch would cost more than a small model's step) and builds a snapshot
when the state is saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Final, TypeVar, final

import attrs
import cattrs

from typedbrain._errors import ConfigurationError
from typedbrain._phases import Phase
from typedbrain._rng import RngState

__all__ = ["RunState", "SamplerState", "TrainingProgress", "converter", "structure_state"]

_StateT = TypeVar("_StateT")


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    del instance
    if value < 0:
        raise ValueError(f"{attribute.name} must be 0 or more, got {value}")


def _optional_at_least(
    minimum: int,
) -> Callable[[object, attrs.Attribute[int | None], int | None], None]:
    """An attrs validator: ``None``, or an int of ``minimum`` or more."""

    def validate(
        instance: object, attribute: attrs.Attribute[int | None], value: int | None
    ) -> None:
        del instance
        if value is not None and value < minimum:
            raise ValueError(f"{attribute.name} must be {minimum} or more, got {value}")

    return validate


_optional_positive = _optional_at_least(1)
_optional_non_negative = _optional_at_least(0)


def _phase_name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    del instance
    if value not in Phase.__members__:
        names = ", ".join(Phase.__members__)
        raise ValueError(f"{attribute.name} must be the name of a phase ({names}), got {value!r}")


def _finite(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    del instance
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be finite, got {value}")


@final
@attrs.frozen(kw_only=True)
class TrainingProgress:
    """Where training stands: the counters a resumed run continues from.

    Attributes:
        step: batches run in the current stage.
        optimizer_step: optimizer steps taken since the start of training.
        avg_train_loss: mean of the finite training losses of the current epoch so far.
        averaged: how many losses ``avg_train_loss`` is the mean of.
        nonfinite_count: non-finite training losses in the current epoch.
    """

    step: int = attrs.field(default=0, validator=_non_negative)
    optimizer_step: int = attrs.field(default=0, validator=_non_negative)
    avg_train_loss: float = attrs.field(default=0.0, validator=_finite)
    averaged: int = attrs.field(default=0, validator=_non_negative)
    nonfinite_count: int = attrs.field(default=0, validator=_non_negative)


@final
@attrs.frozen(kw_only=True)
class SamplerState:
    """Where a :class:`ResumableSampler`'s order comes from: its seed and the current epoch."""

    seed: int
    epoch: int = attrs.field(validator=_non_negative)


@final
@attrs.frozen(kw_only=True)
class RunState:
    """Everything a brain needs, beyond the recoverables' own state, to resume exactly.

    Attributes:
        phase: the name of the brain's phase when the state was taken.
        epoch: the epoch in progress (``None`` outside the epoch loop).
        mid_epoch: taken in ``epoch``'s training stage, between two training batches (or in
            ``on_stage_start``, before the first: ``progress.step`` 0): a resumed run re-enters
            ``epoch`` and continues after batch ``progress.step`` instead of starting the next
            epoch.
        valid_pending: taken after ``epoch``'s training stage ended and before its validation
            stage did (in ``on_stage_end(Stage.TRAIN)``, or during validation): a resumed run
            re-enters ``epoch`` and validates it again instead of starting the next epoch.
        progress: the training counters.
        skipped: non-finite losses left out of the running average in this stage.
        window: backward passes accumulated since the last optimizer step; their gradients are
            saved beside this state.
        rng: every global random generator's state when the state was taken.
        epoch_rng: the generators' state as the epoch began (before ``on_stage_start``), from
            which a re-entered epoch draws again; with ``valid_pending``, as validation began,
            if it had (``None`` otherwise).
        sampler: the training sampler's seed and epoch, when it is a resumable sampler.
        train_loader_seed: the seed ``make_dataloader`` gave the training loader (its
            generator and workers), when it built it.
        valid_loader_seed: the same for the validation loader.
        batch_size: the training loader's batch size, when it batches with torch's
            ``BatchSampler``.
        accumulation: the ``grad_accumulation_factor`` of the run that took it (``None`` in
            checkpoints of earlier development builds).
        counter: the name under which the running ``fit``'s epoch counter is registered with
            the checkpointer, if it is: ``epoch`` is that counter's epoch, and a ``fit`` over
            another counter (a recipe's other training stage) does not re-enter it.
        loader_rng: the states of the training loader's own random generators (a loader
            ``make_dataloader`` did not build: its ``generator`` and its samplers'), when the
            state was taken, as ``torch.Generator.get_state()`` bytes.
        epoch_loader_rng: the same as the epoch began, when ``mid_epoch``.
        valid_loader_rng: the validation loader's own generators when the state was taken
            (from which its next validation shuffles, say).
        num_workers: the training loader's ``num_workers``: with workers, randomness drawn
            while loading comes from per-item seeds, without them from the global generators.
        dataset_size: the length of the training loader's dataset, when it has one: an
            interrupted epoch is continued in an order made for that many items.
    """

    phase: str = attrs.field(validator=_phase_name)
    epoch: int | None = None
    mid_epoch: bool = False
    valid_pending: bool = False
    progress: TrainingProgress = TrainingProgress()
    skipped: int = attrs.field(default=0, validator=_non_negative)
    window: int = attrs.field(default=0, validator=_non_negative)
    rng: RngState
    epoch_rng: RngState | None = None
    sampler: SamplerState | None = None
    train_loader_seed: int | None = None
    valid_loader_seed: int | None = None
    batch_size: int | None = attrs.field(default=None, validator=_optional_positive)
    accumulation: int | None = attrs.field(default=None, validator=_optional_positive)
    counter: str | None = None
    loader_rng: tuple[tuple[int, ...], ...] = ()
    epoch_loader_rng: tuple[tuple[int, ...], ...] | None = None
    valid_loader_rng: tuple[tuple[int, ...], ...] = ()
    num_workers: int | None = attrs.field(default=None, validator=_optional_non_negative)
    dataset_size: int | None = attrs.field(default=None, validator=_optional_non_negative)


converter: Final = cattrs.Converter(forbid_extra_keys=True)
"""The converter that turns every state object into plain data (and back).

Plain data (dicts, lists, str, int, float, bool, None) is what ``torch.load(weights_only=True)``
and JSON accept, so a checkpoint never needs pickled classes.
"""


class _WrongTypeError(TypeError):
    """A saved value of another type than its field's (see :func:`_exact`)."""


def _exact(kind: type[object], *, also: tuple[type, ...] = ()) -> None:
    """Structure ``kind`` only from a value of that type (or of ``also``), never from a bool.

    cattrs would otherwise call ``kind(value)``: ``"7"`` would become the step 7 and
    ``"false"`` the flag ``True``. A saved state holds the exact types it was written with.
    """
    accepted = (kind, *also)

    def structure(value: object, _: type) -> object:
        if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
            return kind(value)  # type: ignore[call-arg]  # int, float, bool or str of a value of that kind
        raise _WrongTypeError(f"got {type(value).__name__} {value!r}")

    converter.register_structure_hook(kind, structure)


_exact(int)
_exact(float, also=(int,))
_exact(bool)
_exact(str)


def structure_state(data: object, cls: type[_StateT], *, source: str) -> _StateT:
    """Build a ``cls`` from plain data, with one clear error naming ``source`` if it is bad.

    Raises:
        ConfigurationError: ``data`` does not describe a valid ``cls``; the message lists every
            problem cattrs found.
    """
    if not isinstance(data, Mapping):  # cattrs would fail on a list or a str with its own error
        raise ConfigurationError(
            f"invalid {cls.__name__} in {source}: expected a mapping of its fields, got "
            f"{type(data).__name__}"
        )
    try:
        return converter.structure(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as error:
        if isinstance(error, cattrs.BaseValidationError):
            details = "; ".join(cattrs.transform_error(error, format_exception=_describe))
        else:
            details = str(error)
        raise ConfigurationError(f"invalid {cls.__name__} in {source}: {details}") from error


def _describe(exception: BaseException, expected: type | None) -> str:
    """Describe an error as cattrs does, with our validators' message where cattrs has none."""
    description = cattrs.v.format_exception(exception, expected)
    if isinstance(exception, _WrongTypeError):
        return f"{description} ({exception})"
    if description == "invalid value" and str(exception):
        return f"invalid value ({exception})"
    return description

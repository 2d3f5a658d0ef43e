"""The phases a brain goes through, the one table of allowed transitions, and the machine.

This module imports nothing from torch: the phase logic can be read, tested and diagrammed on
its own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Protocol, final

from typedbrain._errors import PhaseTransitionError

__all__ = [
    "RESTING_PHASES",
    "STAGE_PHASES",
    "TRANSITIONS",
    "Phase",
    "PhaseMachine",
    "PhaseObserver",
    "Stage",
    "mermaid_diagram",
]


@final
class Stage(enum.Enum):
    """The stage a hook is called for: what the batches are used for."""

    TRAIN = "train"
    VALID = "valid"
    TEST = "test"


@final
class Phase(enum.Enum):
    """What a brain is doing right now.

    ``INIT`` (constructed, nothing run yet), ``FIT_START`` (``fit`` is preparing: data loaders,
    ``on_fit_start``), ``TRAIN`` / ``VALID`` / ``TEST`` (running that stage), ``CHECKPOINT``
    (writing a checkpoint in the middle of a stage), ``IDLE`` (``fit`` or ``evaluate`` has
    returned) and ``FAILED`` (an exception left ``fit`` or ``evaluate``).
    """

    INIT = "init"
    FIT_START = "fit_start"
    TRAIN = "train"
    VALID = "valid"
    CHECKPOINT = "checkpoint"
    TEST = "test"
    IDLE = "idle"
    FAILED = "failed"


def _table(edges: Mapping[Phase, set[Phase]]) -> Mapping[Phase, frozenset[Phase]]:
    return MappingProxyType({source: frozenset(targets) for source, targets in edges.items()})


# The single source of truth for phase changes: the loop, the docs' diagram and the tests read it.
TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = _table(
    {
        Phase.INIT: {Phase.FIT_START, Phase.TEST},
        Phase.FIT_START: {Phase.TRAIN, Phase.IDLE, Phase.FAILED},
        # TRAIN -> TRAIN starts the next epoch when there is no validation set.
        Phase.TRAIN: {Phase.TRAIN, Phase.VALID, Phase.CHECKPOINT, Phase.IDLE, Phase.FAILED},
        Phase.VALID: {Phase.TRAIN, Phase.CHECKPOINT, Phase.IDLE, Phase.FAILED},
        # A checkpoint returns to the stage it interrupted.
        Phase.CHECKPOINT: {Phase.TRAIN, Phase.VALID, Phase.FAILED},
        Phase.TEST: {Phase.IDLE, Phase.FAILED},
        Phase.IDLE: {Phase.FIT_START, Phase.TEST},
        Phase.FAILED: {Phase.FIT_START, Phase.TEST},
    }
)

# Phases in which no entry point is running: ``fit`` and ``evaluate`` start from these only.
RESTING_PHASES: Final = frozenset({Phase.INIT, Phase.IDLE, Phase.FAILED})

# The phase in which each stage runs.
STAGE_PHASES: Final[Mapping[Stage, Phase]] = MappingProxyType(
    {Stage.TRAIN: Phase.TRAIN, Stage.VALID: Phase.VALID, Stage.TEST: Phase.TEST}
)


class PhaseObserver(Protocol):
    """Anything that wants to follow a brain's phase changes (loggers, progress displays).

    Register one with ``Brain.add_phase_observer``. It is called after each change, in the order
    observers were added; an exception it raises propagates to the caller of the change (and so
    fails ``fit`` or ``evaluate``), once every observer has been told of the change.
    """

    def on_phase_change(self, old: Phase, new: Phase) -> None:
        """Called after the machine moved from ``old`` to ``new``."""


@final
class PhaseMachine:
    """Holds the current phase and applies changes checked against a transition table.

    Args:
        table: the allowed transitions; defaults to :data:`TRANSITIONS`.
        initial: the phase to start in.
    """

    __slots__ = ("_notifying", "_observers", "_phase", "_table")

    def __init__(
        self,
        table: Mapping[Phase, frozenset[Phase]] = TRANSITIONS,
        initial: Phase = Phase.INIT,
    ) -> None:
        self._table = table
        self._phase = initial
        self._observers: list[PhaseObserver] = []
        self._notifying = False

    @property
    def notifying(self) -> bool:
        """Whether the observers are being told of a change (the brain refuses entry then)."""
        return self._notifying

    @property
    def phase(self) -> Phase:
        """The current phase."""
        return self._phase

    @property
    def allowed(self) -> frozenset[Phase]:
        """The phases the machine may move to from the current one."""
        return self._table.get(self._phase, frozenset())

    def can_move(self, target: Phase) -> bool:
        """Whether moving to ``target`` from the current phase is allowed."""
        return target in self.allowed

    def move(self, target: Phase) -> None:
        """Move to ``target`` and notify the observers, every one of them.

        Raises:
            PhaseTransitionError: the table does not allow the change; the phase is unchanged.
            BaseException: the first error an observer raised (``KeyboardInterrupt``
                included), once all were notified (an error of a later observer is added to it
                as a note).
        """
        old = self._phase
        if target not in self.allowed:
            raise PhaseTransitionError(old, target, self.allowed)
        self._phase = target
        first: BaseException | None = None
        self._notifying = True
        try:
            for observer in tuple(self._observers):
                try:
                    observer.on_phase_change(old, target)
                except BaseException as error:  # every observer hears of it; then it is raised
                    if first is None:
                        first = error
                    else:
                        first.add_note(
                            f"(the phase observer {observer!r} raised too: "
                            f"{type(error).__name__}: {error})"
                        )
        finally:
            self._notifying = False
        if first is not None:
            raise first

    def subscribe(self, observer: PhaseObserver) -> None:
        """Call ``observer.on_phase_change`` after every future change."""
        self._observers.append(observer)

    def unsubscribe(self, observer: PhaseObserver) -> None:
        """Stop notifying ``observer``.

        Raises:
            ValueError: ``observer`` was not subscribed.
        """
        try:
            self._observers.remove(observer)
        except ValueError:
            raise ValueError(
                f"the phase observer {observer!r} is not subscribed (never added, or already "
                "removed), so it cannot be removed"
            ) from None


def mermaid_diagram(table: Mapping[Phase, frozenset[Phase]] = TRANSITIONS) -> str:
    """The transition table as a Mermaid ``stateDiagram-v2``, one edge per line, sorted."""
    order = {phase: index for index, phase in enumerate(Phase)}
    lines = ["stateDiagram-v2", f"    [*] --> {Phase.INIT.name}"]
    for source in sorted(table, key=order.__getitem__):
        lines.extend(
            f"    {source.name} --> {target.name}"
            for target in sorted(table[source], key=order.__getitem__)
        )
    return "\n".join(lines) + "\n"

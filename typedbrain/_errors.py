"""The exceptions typedbrain raises on purpose, all under one base class."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from typedbrain._phases import Phase

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "ConfigurationError",
    "CorruptCheckpointError",
    "HookContractError",
    "NonFiniteLossError",
    "PhaseTransitionError",
    "ReentrantCallError",
    "ResumeWarning",
    "RunOptionsError",
    "TrainingInterruptedError",
    "TypedBrainError",
    "UnsafeCheckpointError",
]


class TypedBrainError(Exception):
    """Base class of every error typedbrain raises on purpose.

    Catch this to handle any failure the library detected itself; errors coming from torch or
    from user hooks propagate unchanged.
    """


class ConfigurationError(TypedBrainError, ValueError):
    """Something the user configured is invalid: the message names the key and the value."""


@final
class HookContractError(TypedBrainError, TypeError):
    """A hook breaks its contract.

    It returned something the loop cannot use (a loss that is not a scalar), or a checkpoint
    hook has the wrong signature.
    """


@final
class RunOptionsError(ConfigurationError):
    """A run option has an unknown name, a wrong type or a value out of range.

    Attributes:
        key: the name of the run option at fault.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"run option {key!r}: {message}")
        self.key = key


def _names(phases: Iterable[Phase]) -> str:
    names = sorted(phase.name for phase in phases)
    return ", ".join(names) if names else "none"


class PhaseTransitionError(TypedBrainError):
    """A phase change that the transition table does not allow.

    Attributes:
        current: the phase the machine was in.
        attempted: the phase it was asked to move to.
        allowed: the phases it may move to from ``current``.
    """

    def __init__(
        self,
        current: Phase,
        attempted: Phase,
        allowed: frozenset[Phase],
        *,
        detail: str = "",
    ) -> None:
        message = (
            f"cannot move from phase {current.name} to {attempted.name}; "
            f"allowed from {current.name}: {_names(allowed)}"
        )
        super().__init__(f"{message}. {detail}" if detail else message)
        self.current = current
        self.attempted = attempted
        self.allowed = allowed


@final
class ReentrantCallError(PhaseTransitionError):
    """``fit`` or ``evaluate`` was called while one of them is already running.

    This happens when a hook (``on_stage_end``, say) calls ``fit`` or ``evaluate`` on its own
    brain. Run the second call after the first one has returned instead.
    """

    def __init__(
        self, entry_point: str, current: Phase, attempted: Phase, allowed: frozenset[Phase]
    ) -> None:
        super().__init__(
            current,
            attempted,
            allowed,
            detail=(
                f"{entry_point}() was called while the brain is running (phase {current.name}); "
                "fit() and evaluate() cannot be called from inside a hook"
            ),
        )
        self.entry_point = entry_point


@final
class NonFiniteLossError(TypedBrainError, FloatingPointError):
    """Training produced more non-finite losses in one epoch than ``nonfinite_patience`` allows.

    None of those losses reached the weights: each one skipped its backward pass and its
    optimizer step. The run stops here so that the problem (a learning rate too high, a bad batch,
    fp16 overflow) is looked at.

    Attributes:
        epoch: the epoch in which the patience ran out (``None`` outside an epoch loop).
        step: the batch index within that epoch (1-based).
        count: how many non-finite losses the epoch has seen.
        patience: the ``nonfinite_patience`` run option in force.
    """

    def __init__(self, *, epoch: int | None, step: int, count: int, patience: int) -> None:
        where = f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"
        super().__init__(
            f"non-finite loss at {where}: {count} non-finite losses this epoch, more than "
            f"nonfinite_patience={patience} allows; no such loss was applied to the weights"
        )
        self.epoch = epoch
        self.step = step
        self.count = count
        self.patience = patience


class CheckpointError(TypedBrainError):
    """A checkpoint could not be written, found or loaded; the message names the folder or file."""


@final
class CorruptCheckpointError(CheckpointError):
    """A checkpoint folder failed verification and is not loaded.

    The manifest is missing or unreadable, a file is missing, its size or checksum is wrong, or
    it does not load.

    Attributes:
        path: the checkpoint folder (or file) at fault.
        reason: what is wrong with it, in words.
    """

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"checkpoint {path} is not usable: {reason}")
        self.path = path
        self.reason = reason


@final
class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file was refused because loading it would mean unpickling arbitrary objects.

    Nothing from the file ran: it was read with ``weights_only=True``, which rejects code and
    classes outside torch's allow-list.

    Attributes:
        path: the file that was refused.
    """

    def __init__(self, path: object, detail: str) -> None:
        super().__init__(
            f"refused to load {path}: it holds objects that loading with weights_only=True does "
            f"not allow, and typedbrain never unpickles arbitrary objects ({detail})"
        )
        self.path = path


class CheckpointWarning(UserWarning):
    """A checkpoint folder was skipped (uncommitted or corrupt) in favour of an older good one."""


class ResumeWarning(UserWarning):
    """A run resumes in a way that may be slow or inexact; the message says why.

    For instance a data loader whose sampler cannot be positioned is fast-forwarded by drawing
    (and loading) the batches already consumed.
    """


@final
class TrainingInterruptedError(TypedBrainError, SystemExit):
    """``fit`` stopped on SIGTERM or SIGINT after finishing its current batch.

    With a checkpointer, an intra-epoch checkpoint was saved first: running the same script
    again resumes where this run stopped. Left uncaught, it ends the process with exit status
    ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the status a shell reports for a process
    the signal killed, so job schedulers see a preempted run.

    Attributes:
        signal: the signal's number.
        code: the exit status (``SystemExit``'s attribute).
        checkpoint_saved: whether a checkpoint was saved before stopping.
    """

    def __init__(self, signal: int, *, checkpoint_saved: bool) -> None:
        saved = (
            "a checkpoint was saved: run again to resume"
            if checkpoint_saved
            else "no checkpoint was saved at this point: a run started again resumes from the "
            "last committed checkpoint, if there is one"
        )
        super().__init__(f"training stopped by signal {signal}; {saved}")
        self.signal = signal
        self.code = 128 + signal
        self.checkpoint_saved = checkpoint_saved

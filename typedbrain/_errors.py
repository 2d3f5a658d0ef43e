"""The exceptions typedbrain raises on purpose, all under one base class."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, final

import attrs

# The package, which is always being imported already when this module runs: this binds the
# name and runs nothing. The annotations name typedbrain._phases.Phase through it, so that
# typing.get_type_hints resolves them when called; importing Phase itself here would be an
# import cycle (_phases imports this module).
import typedbrain

if TYPE_CHECKING:
    import typedbrain._phases

__all__ = [
    "ArgumentsError",
    "CheckpointError",
    "CheckpointWarning",
    "ConfigurationError",
    "CorruptCheckpointError",
    "DistributedError",
    "HookContractError",
    "HparamsError",
    "HparamsProblem",
    "NonFiniteLossError",
    "OverrideError",
    "PhaseTransitionError",
    "PlaceholderError",
    "ReentrantCallError",
    "ResumeWarning",
    "RunOptionsError",
    "TrainLogError",
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


def with_article(noun: str) -> str:
    """``noun`` after "a", or "an" when it starts with a vowel: ``an EpochCounter``."""
    return f"{'an' if noun[:1].lower() in {'a', 'e', 'i', 'o', 'u'} else 'a'} {noun}"


def _names(phases: Iterable[typedbrain._phases.Phase]) -> str:
    names = sorted(phase.name for phase in phases)
    return ", ".join(names) if names else "none"


class PhaseTransitionError(TypedBrainError):
    """A phase change that is refused: not in the transition table, or asked for too early.

    The message names the phases and what the table allows from ``current``; a subclass that
    refuses for another reason (:class:`ReentrantCallError`) gives its own ``message``.

    Attributes:
        current: the phase the machine was in.
        attempted: the phase it was asked to move to.
        allowed: the phases it may move to from ``current``.
    """

    def __init__(
        self,
        current: typedbrain._phases.Phase,
        attempted: typedbrain._phases.Phase,
        allowed: frozenset[typedbrain._phases.Phase],
        *,
        message: str | None = None,
    ) -> None:
        if message is None:
            message = (
                f"cannot move from phase {current.name} to {attempted.name}; "
                f"allowed from {current.name}: {_names(allowed)}"
            )
        super().__init__(message)
        self.current = current
        self.attempted = attempted
        self.allowed = allowed


@final
class ReentrantCallError(PhaseTransitionError):
    """``fit`` or ``evaluate`` was called while one of them is already running.

    This happens when a hook (``on_stage_end``, say) or a phase observer calls ``fit`` or
    ``evaluate`` on its own brain. Run the second call after the first one has returned instead.
    """

    def __init__(
        self,
        entry_point: str,
        current: typedbrain._phases.Phase,
        attempted: typedbrain._phases.Phase,
        allowed: frozenset[typedbrain._phases.Phase],
    ) -> None:
        # Not the table's "allowed from ...": the move may be in the table (an observer of the
        # move to IDLE calling evaluate) and is refused because the running call is not over.
        super().__init__(
            current,
            attempted,
            allowed,
            message=(
                f"{entry_point}() was called while the brain is running (phase {current.name}); "
                "fit() and evaluate() cannot be called from inside a hook or a phase observer: "
                "make the second call once the first has returned"
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
    """A checkpoint folder was skipped (uncommitted or corrupt) in favour of an older good one.

    Also: a ``min_key`` / ``max_key`` asked to recover by was in no checkpoint's meta.
    """


class ResumeWarning(UserWarning):
    """A run resumes in a way that may be slow or inexact; the message says why.

    For instance a data loader whose sampler cannot be positioned is fast-forwarded by drawing
    (and loading) the batches already consumed.
    """


@final
class TrainingInterruptedError(SystemExit):
    """``fit`` stopped on SIGTERM or SIGINT after finishing its current batch.

    With a checkpointer, an intra-epoch checkpoint was saved first: running the same script
    again resumes where this run stopped. Left uncaught, it ends the process with exit status
    ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the status a shell reports for a process
    the signal killed, so job schedulers see a preempted run.

    It is a ``SystemExit`` only, not an ``Exception`` (so not a :class:`TypedBrainError`
    either), as ``KeyboardInterrupt`` is not: an ``except Exception:`` in a recipe (around
    ``fit``, to log and go on to ``evaluate``, say) must not swallow a stop a job scheduler
    asked for. Catch it by name.

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


@final
class TrainLogError(TypedBrainError, ValueError):
    """A training log file cannot be read back: it is not the format its logger writes.

    Attributes:
        path: the log file.
        line: the 1-based number of the line at fault (``None`` when the file as a whole is).
        reason: what is wrong, in words.
    """

    def __init__(self, path: object, line: int | None, reason: str) -> None:
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"training log {where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else source


@final
class OverrideError(ConfigurationError):
    """An override does not fit the hyperparameter file it is applied to.

    The key it sets does not exist there (a misspelling, or a nested key the file does not have),
    or it sets keys under a value that is not a mapping.

    Attributes:
        key: the dotted path of the override at fault (``model.hidden_size``).
        source: the hyperparameter file the override was checked against.
        line: the 1-based line of the nearest key of that path the file does have (``None`` for
            a top-level key).
    """

    def __init__(self, key: str, message: str, *, source: str, line: int | None) -> None:
        super().__init__(f"override {key!r} ({_where(source, line)}): {message}")
        self.key = key
        self.source = source
        self.line = line


@final
class PlaceholderError(ConfigurationError):
    """A ``!PLACEHOLDER`` value was left without an override to fill it.

    Attributes:
        key: the dotted path of the placeholder (``folders[0]`` for an item of a list).
        override: the dotted key an override can set to fill it: ``key`` itself, or for a
            placeholder inside a list the nearest mapping key above it (``folders``), whose
            whole value the override then gives.
        source: the hyperparameter file that holds it.
        line: its 1-based line in that file.
    """

    def __init__(
        self, key: str, *, source: str, line: int | None, override: str | None = None
    ) -> None:
        target = key if override is None else override
        if target == key:
            how = (
                f"override it (--{key} VALUE on the command line, or the key in load_hparams' "
                "overrides)"
            )
        else:
            how = (
                f"an override cannot set an item of a list, so override {target!r}, which "
                f"holds it, with its whole new value (--{target} VALUE on the command line, or "
                "the key in load_hparams' overrides)"
            )
        super().__init__(
            f"{key!r} ({_where(source, line)}) is a !PLACEHOLDER and was not given a value: {how}"
        )
        self.key = key
        self.override = target
        self.source = source
        self.line = line


@final
@attrs.frozen
class HparamsProblem:
    """One reason why hyperparameters do not fit a class.

    Attributes:
        key: the dotted path of the value at fault (``model.hidden_size``, ``layers[2]``); empty
            for the whole document.
        message: what is wrong, in words.
        source: the file the key comes from, when known.
        line: the key's 1-based line in ``source``, when known.
    """

    key: str
    message: str
    source: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        key = self.key or "(top level)"
        if self.source is None:
            return f"{key}: {self.message}"
        return f"{key} ({_where(self.source, self.line)}): {self.message}"


@final
class HparamsError(ConfigurationError):
    """Hyperparameters do not fit the class they were structured into.

    One error reports every problem found: missing keys, unexpected keys and values of the wrong
    type, each with its key path and, where known, its file and line.

    Attributes:
        problems: every problem, in the order found.
        target: the name of the class the hyperparameters were structured into.
    """

    def __init__(self, target: str, source: str, problems: Iterable[HparamsProblem]) -> None:
        self.problems = tuple(problems)
        self.target = target
        count = len(self.problems)
        listing = "".join(f"\n  - {problem}" for problem in self.problems)
        super().__init__(
            f"hyperparameters from {source} do not fit {target} "
            f"({count} problem{'s' if count != 1 else ''}):{listing}"
        )


@final
class ArgumentsError(ConfigurationError):
    """The command line cannot be parsed: a missing hparams file, a missing or bad value.

    Attributes:
        argument: the option at fault as written (``--debug_batches``), or ``None`` when the
            problem is not about one option (no hparams file given, say).
    """

    def __init__(self, argument: str | None, message: str) -> None:
        super().__init__(f"argument {argument}: {message}" if argument else message)
        self.argument = argument


class DistributedError(TypedBrainError, RuntimeError):
    """Another process of a distributed run failed, died or did not answer in time.

    Raised on the ranks that are still alive, so that they stop with this message instead of
    waiting forever for a peer: a collective operation failed (the peer's connection closed, or
    the process group's timeout ran out), or a peer reported that its own part of the work
    raised. The rank whose own code raised re-raises its own error instead. It is a
    ``RuntimeError``, as the errors torch raises for failed collectives are, so code that caught
    those still catches it.

    After this error the process group may be unusable: shut it down and let the process exit;
    the launcher (``torchrun``) then stops the remaining processes.

    Attributes:
        rank: the global rank of the process that raised it.
        operation: what it was doing when it failed (``barrier``, ``run_on_main(prepare)``).
    """

    def __init__(self, message: str, *, rank: int, operation: str) -> None:
        super().__init__(f"rank {rank}, {operation}: {message}")
        self.rank = rank
        self.operation = operation

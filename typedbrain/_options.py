"""Run options: how a brain runs (device, precision, debug, clipping...), not what it learns.

``RunOptions`` holds SpeechBrain's run option names and defaults (the few differences are listed
in docs/run-options.md). ``RunOptions.from_sources``
builds one with the precedence defaults < keys of the same name in the hyperparameters < options
given explicitly, and names the key and the source of any bad value.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import (
    Any,
    Final,
    Generic,
    Literal,
    Protocol,
    Self,
    TypedDict,
    TypeVar,
    cast,
    final,
    get_args,
    get_origin,
    overload,
)

import attrs
import torch

from typedbrain._devices import missing_device
from typedbrain._errors import ConfigurationError, RunOptionsError
from typedbrain._warn import warn

__all__ = [
    "CompileMode",
    "DistributedBackend",
    "Precision",
    "RunOptionAttributes",
    "RunOptions",
    "RunOptionsDict",
    "available_device",
]

Precision = Literal["fp32", "fp16", "bf16"]
DistributedBackend = Literal["nccl", "gloo", "mpi"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def _describe(tp: object) -> str:
    """A short, readable name for a run option's declared type."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not get_args(tp):
        return {"float": "a number", "int": "an integer", "bool": "true or false"}.get(
            tp.__name__, f"a {tp.__name__}"
        )
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(tp))
    if origin is tuple:
        return "a list of strings"
    return str(tp)


def _matches(value: object, tp: object) -> bool:
    """Whether ``value`` has the declared type ``tp`` (strictly: ``True`` is not an integer)."""
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = get_origin(tp)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in get_args(tp))
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(item, str) for item in value)
    raise TypeError(f"unsupported run option type {tp!r}")  # pragma: no cover - a library bug


# Checks beyond the type, by option name: (predicate, what a valid value is).
_RANGES: Final[Mapping[str, tuple[Callable[[object], bool], str]]] = {
    "debug_batches": (lambda v: cast(int, v) >= 1, "at least 1"),
    "debug_epochs": (lambda v: cast(int, v) >= 1, "at least 1"),
    "nonfinite_patience": (lambda v: cast(int, v) >= 0, "at least 0"),
    "grad_accumulation_factor": (lambda v: cast(int, v) >= 1, "at least 1"),
    "optimizer_step_limit": (lambda v: v is None or cast(int, v) >= 1, "None or at least 1"),
    "max_grad_norm": (
        lambda v: not math.isnan(cast(float, v)),
        "a number (0 or less disables clipping), not NaN",
    ),
    "ckpt_interval_minutes": (
        lambda v: math.isfinite(cast(float, v)) and cast(float, v) >= 0,
        "a finite number of minutes, 0 or more",
    ),
    "ckpt_interval_steps": (lambda v: cast(int, v) >= 0, "at least 0"),
    "profile_warmup": (lambda v: cast(int, v) >= 0, "at least 0"),
    "profile_steps": (lambda v: cast(int, v) >= 1, "at least 1"),
    "device": (lambda v: v is None or _is_device(cast(str, v)), "a torch device such as 'cpu'"),
}


def _is_device(text: str) -> bool:
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        return False
    return True


def available_device(name: str) -> torch.device:
    """The device run option ``device`` names, checked to exist on this machine.

    Raises:
        RunOptionsError: this machine has no such device (``"cuda"`` without CUDA,
            ``"cuda:3"`` with one GPU); the message has the value and the reason.
    """
    missing = missing_device(name)
    if missing is not None:
        raise RunOptionsError(
            "device",
            f"{name!r} is not available: {missing}; leave device unset to use this process's "
            "GPU when there is one and the CPU otherwise",
        )
    return torch.device(name)


_V = TypeVar("_V")


def _check(name: str, tp: object, value: object) -> None:
    if not _matches(value, tp):
        raise RunOptionsError(
            name, f"expected {_describe(tp)}, got {type(value).__name__} {value!r}"
        )
    if name in _RANGES:
        predicate, expected = _RANGES[name]
        if not predicate(value):
            raise RunOptionsError(name, f"expected {expected}, got {value!r}")


def _validate(instance: object, attribute: attrs.Attribute[_V], value: _V) -> None:
    del instance
    _check(attribute.name, attribute.type, value)


def _module_keys(value: tuple[str, ...] | list[str] | None) -> tuple[str, ...] | None:
    """A ``*_module_keys`` list of strings, as a tuple (other values go to the check as given)."""
    if not isinstance(value, list):
        return value
    if all(isinstance(key, str) for key in value):
        return tuple(value)
    return cast(tuple[str, ...], value)  # not all strings: the check reports the list as given


@final
@attrs.frozen(kw_only=True)
class RunOptions:
    """How a brain runs: SpeechBrain's run options, names and defaults (but two defaults).

    ``device`` and ``compile_mode`` have other defaults than SpeechBrain's (see
    docs/run-options.md).

    Build one with :meth:`from_sources` to get SpeechBrain's precedence; constructing it directly
    validates every value too. Bad values raise :class:`~typedbrain.RunOptionsError` naming the
    option.

    Attributes:
        test_only: ``fit`` returns at once (evaluate an existing model).
        debug: stop each stage after ``debug_batches`` batches and the run after
            ``debug_epochs`` epochs.
        debug_batches: batches per stage in debug mode.
        debug_epochs: epochs per ``fit`` in debug mode.
        debug_persistently: keep debug-mode checkpoints in the real checkpoint folder.
        device: where the modules live; ``None`` means ``cuda:<LOCAL_RANK>`` when CUDA is
            available, else ``cpu``.
        data_parallel_backend: wrap modules in ``torch.nn.DataParallel``.
        distributed_backend: the ``torch.distributed`` backend.
        distributed_launch: the process was started by a distributed launcher.
        find_unused_parameters: passed to ``DistributedDataParallel``.
        jit: ``torch.jit.script`` the modules named by ``jit_module_keys`` (all when ``None``).
        jit_module_keys: module names to script.
        compile: ``torch.compile`` the modules named by ``compile_module_keys`` (all when
            ``None``).
        compile_module_keys: module names to compile.
        compile_mode: ``torch.compile``'s ``mode``.
        compile_using_fullgraph: ``torch.compile``'s ``fullgraph``.
        compile_using_dynamic_shape_tracing: ``torch.compile``'s ``dynamic``.
        precision: autocast precision for training: ``fp32`` (no autocast), ``fp16``, ``bf16``.
        eval_precision: autocast precision for validation and test.
        max_grad_norm: clip the gradient norm over every optimized parameter to this value;
            0 or less disables clipping.
        skip_nonfinite_grads: skip an optimizer step whose gradients are not finite.
        nonfinite_patience: non-finite losses tolerated per epoch before
            :class:`~typedbrain.NonFiniteLossError`.
        noprogressbar: no progress bars.
        ckpt_interval_minutes: save an intra-epoch checkpoint this often (0: never).
        ckpt_interval_steps: save an intra-epoch checkpoint after every this-many-th training
            batch of an epoch (the count starts again each epoch; 0: never).
        grad_accumulation_factor: batches whose gradients add up to one optimizer step.
        optimizer_step_limit: stop training after this many optimizer steps.
        tqdm_colored_bar: colour the progress bars.
        remove_vector_weight_decay: put 1-D parameters (biases, norms) in their own parameter
            group with ``weight_decay=0``.
        profile_training: profile training with ``torch.profiler``.
        profile_warmup: profiler warm-up steps.
        profile_steps: profiled steps.
        fsdp: under a process group, shard the modules with trainable parameters with FSDP2
            (``torch.distributed.fsdp.fully_shard``) instead of wrapping them in DDP. On the
            CPU it needs torch 2.9 or newer (a ``ConfigurationError`` before).
        sync_batchnorm: under a process group, turn every batch norm layer of the wrapped
            modules into ``torch.nn.SyncBatchNorm`` (statistics over every rank's batch).
        stop_on_signals: on SIGTERM or SIGINT during ``fit``, finish the current batch, save an
            intra-epoch checkpoint (with a checkpointer) and raise
            :class:`~typedbrain.TrainingInterruptedError` (exit status 128 + the signal number).
    """

    test_only: bool = attrs.field(default=False, validator=_validate)
    debug: bool = attrs.field(default=False, validator=_validate)
    debug_batches: int = attrs.field(default=2, validator=_validate)
    debug_epochs: int = attrs.field(default=2, validator=_validate)
    debug_persistently: bool = attrs.field(default=False, validator=_validate)
    device: str | None = attrs.field(default=None, validator=_validate)
    data_parallel_backend: bool = attrs.field(default=False, validator=_validate)
    distributed_backend: DistributedBackend = attrs.field(default="nccl", validator=_validate)
    distributed_launch: bool = attrs.field(default=False, validator=_validate)
    find_unused_parameters: bool = attrs.field(default=False, validator=_validate)
    jit: bool = attrs.field(default=False, validator=_validate)
    jit_module_keys: tuple[str, ...] | None = attrs.field(
        default=None, converter=_module_keys, validator=_validate
    )
    compile: bool = attrs.field(default=False, validator=_validate)
    compile_module_keys: tuple[str, ...] | None = attrs.field(
        default=None, converter=_module_keys, validator=_validate
    )
    compile_mode: CompileMode = attrs.field(default="default", validator=_validate)
    compile_using_fullgraph: bool = attrs.field(default=False, validator=_validate)
    compile_using_dynamic_shape_tracing: bool = attrs.field(default=False, validator=_validate)
    precision: Precision = attrs.field(default="fp32", validator=_validate)
    eval_precision: Precision = attrs.field(default="fp32", validator=_validate)
    max_grad_norm: float = attrs.field(default=5.0, validator=_validate)
    skip_nonfinite_grads: bool = attrs.field(default=False, validator=_validate)
    nonfinite_patience: int = attrs.field(default=3, validator=_validate)
    noprogressbar: bool = attrs.field(default=False, validator=_validate)
    ckpt_interval_minutes: float = attrs.field(default=0.0, validator=_validate)
    ckpt_interval_steps: int = attrs.field(default=0, validator=_validate)
    grad_accumulation_factor: int = attrs.field(default=1, validator=_validate)
    optimizer_step_limit: int | None = attrs.field(default=None, validator=_validate)
    tqdm_colored_bar: bool = attrs.field(default=False, validator=_validate)
    remove_vector_weight_decay: bool = attrs.field(default=False, validator=_validate)
    profile_training: bool = attrs.field(default=False, validator=_validate)
    profile_warmup: int = attrs.field(default=5, validator=_validate)
    profile_steps: int = attrs.field(default=5, validator=_validate)
    fsdp: bool = attrs.field(default=False, validator=_validate)
    sync_batchnorm: bool = attrs.field(default=False, validator=_validate)
    stop_on_signals: bool = attrs.field(default=True, validator=_validate)

    def __attrs_post_init__(self) -> None:
        # The one check across options; from_sources names their sources (see _EXCLUSIVE).
        if self.ckpt_interval_minutes > 0 and self.ckpt_interval_steps > 0:
            raise RunOptionsError(
                "ckpt_interval_steps",
                f"cannot be set together with ckpt_interval_minutes (got "
                f"ckpt_interval_steps={self.ckpt_interval_steps} and "
                f"ckpt_interval_minutes={self.ckpt_interval_minutes}); choose one",
            )

    @classmethod
    def names(cls) -> frozenset[str]:
        """The names of all run options."""
        return frozenset(field.name for field in attrs.fields(cls))

    @classmethod
    def from_sources(
        cls,
        hparams: Mapping[str, object] | None = None,
        run_opts: Mapping[str, object] | RunOptions | None = None,
    ) -> RunOptions:
        """Build run options with SpeechBrain's precedence.

        Defaults < hyperparameters whose key is a run option's name < ``run_opts``. The two
        checkpoint intervals are one choice: an interval in ``run_opts`` replaces the other one
        in the hyperparameters (both in one source is an error). Keys of
        ``hparams`` that are not run options are ignored (they are hyperparameters; one that looks
        like a misspelt run option, ``precison``, gives a ``UserWarning``); a key of
        ``run_opts`` that is not a run option is an error. Lists are accepted for the
        ``*_module_keys`` options and integers for numeric options. ``run_opts`` may also be a
        whole ``RunOptions``: every option is then taken from it.

        Raises:
            RunOptionsError: an unknown key in ``run_opts``, a wrong type or a value out of
                range; the message names the key and where the value came from.
            ConfigurationError: ``run_opts`` is neither a mapping nor a ``RunOptions``, or
                has a key that is not a string.
        """
        if isinstance(run_opts, RunOptions):  # every option given, as that one holds it
            run_opts = attrs.asdict(run_opts, recurse=False)
        elif run_opts is not None and not isinstance(run_opts, Mapping):
            raise ConfigurationError(
                "run_opts must be a mapping of run option names to values or a RunOptions, got "
                f"{type(run_opts).__qualname__} {run_opts!r}"
            )
        fields = {field.name: field for field in attrs.fields(cls)}
        chosen: dict[str, object] = {}
        origin: dict[str, str] = {}
        for source, values, strict in (("hparams", hparams, False), ("run_opts", run_opts, True)):
            for key, value in (values or {}).items():
                if strict and not isinstance(key, str):
                    raise ConfigurationError(
                        "run_opts must map run option names (strings) to values, got the key "
                        f"{type(key).__qualname__} {key!r}"
                    )
                if key not in fields:
                    if strict:
                        raise RunOptionsError(key, _unknown_key_message(key, fields))
                    _warn_if_misspelt(key, fields)
                    continue
                normalized = _normalize(value, fields[key].type)
                try:
                    _check(key, fields[key].type, normalized)
                except RunOptionsError as error:
                    raise RunOptionsError(key, f"{_strip_key(error)} (from {source})") from None
                chosen[key] = normalized
                origin[key] = source
        given = [key for key in _EXCLUSIVE if chosen.get(key)]
        if len(given) == 2 and origin[given[0]] != origin[given[1]]:
            # One choice of how to save, made in two sources: the later source's stands.
            dropped = next(key for key in given if origin[key] == "hparams")
            del chosen[dropped], origin[dropped]
        try:
            return cls(**chosen)  # type: ignore[arg-type]  # keys and types were checked above
        except RunOptionsError as error:
            # The one check across options: say where each of the two values came from.
            sources = ", ".join(f"{key} from {origin[key]}" for key in _EXCLUSIVE if key in origin)
            raise RunOptionsError(error.key, f"{_strip_key(error)} ({sources})") from None


_EXCLUSIVE: Final = ("ckpt_interval_steps", "ckpt_interval_minutes")
"""Options that cannot both be set; the only check that ``__attrs_post_init__`` makes."""


def _strip_key(error: RunOptionsError) -> str:
    prefix = f"run option {error.key!r}: "
    text = str(error)
    return text.removeprefix(prefix)


def _unknown_key_message(key: str, fields: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see RunOptions for the list"
    return f"no such run option{hint}"


_MISSPELT_CUTOFF: Final = 0.9
"""How alike (``difflib``'s ratio) a hyperparameter's key and a run option's name must be for
the key to be taken for a misspelling: ``precison``, ``max_grad_nrom``, ``debug_batchs`` are;
``devise`` (0.83), ``max_norm`` and ``accumulation_factor`` are not."""


def _warn_if_misspelt(key: object, fields: Mapping[str, object]) -> None:
    """Warn when a hyperparameter's key looks like a misspelt run option's name.

    Hyperparameters whose key is a run option's name set that option; a misspelt one would
    silently be a hyperparameter like any other, and the run would go on with the default.
    """
    if not isinstance(key, str):
        return
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=_MISSPELT_CUTOFF)
    if close:
        warn(
            f"hyperparameter {key!r} is not a run option, so it sets none; did you mean the "
            f"run option {close[0]!r}? (if {key!r} is a hyperparameter of your own, ignore "
            "this warning)",
            UserWarning,
        )


def _normalize(value: object, tp: object) -> object:
    """Accept the spellings a mapping naturally has: lists for tuples, ints for floats."""
    if isinstance(value, list) and _accepts_tuple(tp):
        return tuple(value)
    arms = _arms(tp)
    if isinstance(value, int) and not isinstance(value, bool) and float in arms and int not in arms:
        return float(value)
    return value


def _arms(tp: object) -> tuple[object, ...]:
    """The alternatives of a union type, or the type itself."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        return get_args(tp)
    return (tp,)


def _accepts_tuple(tp: object) -> bool:
    return any(get_origin(arm) is tuple for arm in _arms(tp))


attrs.resolve_types(RunOptions)


class RunOptionsDict(TypedDict, total=False):
    """Run options as a typed mapping: what ``Brain(run_opts=...)`` accepts.

    mypy checks the keys and value types of a literal passed as ``run_opts``; at run time the
    same checks are made again, for callers that are not type-checked.
    """

    test_only: bool
    debug: bool
    debug_batches: int
    debug_epochs: int
    debug_persistently: bool
    device: str | None
    data_parallel_backend: bool
    distributed_backend: DistributedBackend
    distributed_launch: bool
    find_unused_parameters: bool
    jit: bool
    jit_module_keys: tuple[str, ...] | list[str] | None
    compile: bool
    compile_module_keys: tuple[str, ...] | list[str] | None
    compile_mode: CompileMode
    compile_using_fullgraph: bool
    compile_using_dynamic_shape_tracing: bool
    precision: Precision
    eval_precision: Precision
    max_grad_norm: float
    skip_nonfinite_grads: bool
    nonfinite_patience: int
    noprogressbar: bool
    ckpt_interval_minutes: float
    ckpt_interval_steps: int
    grad_accumulation_factor: int
    optimizer_step_limit: int | None
    tqdm_colored_bar: bool
    remove_vector_weight_decay: bool
    profile_training: bool
    profile_warmup: int
    profile_steps: int
    fsdp: bool
    sync_batchnorm: bool
    stop_on_signals: bool


_T = TypeVar("_T")


class _HasRunOptions(Protocol):
    # A property, not an attribute: pyright holds a protocol's plain attribute invariant and
    # would refuse Brain, whose ``run_opts`` is a property with a setter (mypy takes either).
    @property
    def run_opts(self) -> RunOptions: ...
    @run_opts.setter
    def run_opts(self, options: RunOptions) -> None: ...


@final
class _RunOption(Generic[_T]):
    """A read-write attribute that shows one field of ``instance.run_opts``.

    Setting it replaces ``run_opts`` with a validated copy, so the option and the attribute
    never disagree.
    """

    __slots__ = ("_name",)

    def __init__(self) -> None:
        self._name = ""

    def __set_name__(self, owner: type[object], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type[object]) -> Self: ...
    @overload
    def __get__(self, instance: _HasRunOptions, owner: type[object]) -> _T: ...
    def __get__(self, instance: _HasRunOptions | None, owner: type[object]) -> Self | _T:
        if instance is None:
            return self
        return cast(_T, getattr(instance.run_opts, self._name))

    def __set__(self, instance: _HasRunOptions, value: _T) -> None:
        # Any: evolve's keyword types are per field; the value's type is this field's.
        change: dict[str, Any] = {self._name: value}
        instance.run_opts = attrs.evolve(instance.run_opts, **change)


class RunOptionAttributes:
    """Exposes every run option (but ``device``) as an attribute, as SpeechBrain's Brain does.

    ``brain.max_grad_norm`` reads ``brain.run_opts.max_grad_norm``; assigning it validates the
    value and replaces ``brain.run_opts``.
    """

    run_opts: RunOptions

    test_only = _RunOption[bool]()
    debug = _RunOption[bool]()
    debug_batches = _RunOption[int]()
    debug_epochs = _RunOption[int]()
    debug_persistently = _RunOption[bool]()
    data_parallel_backend = _RunOption[bool]()
    distributed_backend = _RunOption[DistributedBackend]()
    distributed_launch = _RunOption[bool]()
    find_unused_parameters = _RunOption[bool]()
    jit = _RunOption[bool]()
    jit_module_keys = _RunOption[tuple[str, ...] | None]()
    compile = _RunOption[bool]()
    compile_module_keys = _RunOption[tuple[str, ...] | None]()
    compile_mode = _RunOption[CompileMode]()
    compile_using_fullgraph = _RunOption[bool]()
    compile_using_dynamic_shape_tracing = _RunOption[bool]()
    precision = _RunOption[Precision]()
    eval_precision = _RunOption[Precision]()
    max_grad_norm = _RunOption[float]()
    skip_nonfinite_grads = _RunOption[bool]()
    nonfinite_patience = _RunOption[int]()
    noprogressbar = _RunOption[bool]()
    ckpt_interval_minutes = _RunOption[float]()
    ckpt_interval_steps = _RunOption[int]()
    grad_accumulation_factor = _RunOption[int]()
    optimizer_step_limit = _RunOption[int | None]()
    tqdm_colored_bar = _RunOption[bool]()
    remove_vector_weight_decay = _RunOption[bool]()
    profile_training = _RunOption[bool]()
    profile_warmup = _RunOption[int]()
    profile_steps = _RunOption[int]()
    fsdp = _RunOption[bool]()
    sync_batchnorm = _RunOption[bool]()
    stop_on_signals = _RunOption[bool]()

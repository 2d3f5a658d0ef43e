"""``Brain``: the training loop, driven by ``compute_forward`` and ``compute_objectives``.

The loop itself is kept thin: numerics live in ``_numerics``, data loaders in ``_data``, the
phase logic in ``_phases``, options in ``_options``, the run state's checkpoint entry in
``_run_record``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sized
from contextlib import AbstractContextManager, ExitStack
from typing import Final, Generic, NoReturn, Protocol, cast, get_args, get_origin, overload
from typing import TypeVar as TypeVarType

import attrs
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader
from typing_extensions import TypeVar, Unpack

from typedbrain._checkpoint import Checkpointer, added_after_load, finish_background_commit
from typedbrain._data import (
    DataSource,
    LoaderKwargs,
    Shard,
    check_data_source,
    loader_length,
    make_dataloader,
)
from typedbrain._debug_folder import redirect_for_debug
from typedbrain._distributed import (
    all_gather_object,
    all_reduce_sum,
    get_rank,
    get_world_size,
    if_main_process,
    is_distributed,
    seed_from_main,
)
from typedbrain._epochs import EpochCounter
from typedbrain._errors import (
    CheckpointError,
    ConfigurationError,
    DistributedError,
    HookContractError,
    NonFiniteLossError,
    ReentrantCallError,
    ResumeWarning,
    TrainingInterruptedError,
)
from typedbrain._hparams import Hparams, hparams_items, resolve_hparams
from typedbrain._launch import detect_launch, device_for, init_distributed
from typedbrain._loader_workers import release_loader_frames
from typedbrain._manifest import INTRA_EPOCH_CKPT_FLAG
from typedbrain._modules import collective_free_forwards, compile_modules, wrap_modules
from typedbrain._numerics import (
    autocast,
    grad_scaler_for,
    gradient_norm,
    running_mean,
    scale_gradients,
    vector_weight_decay_groups,
    window_size,
)
from typedbrain._options import (
    RunOptionAttributes,
    RunOptions,
    RunOptionsDict,
    available_device,
)
from typedbrain._phases import Phase, PhaseMachine, PhaseObserver, Stage
from typedbrain._plan import StepPlan, unique_parameters
from typedbrain._progress import StageProgress
from typedbrain._protocols import CheckpointerLike, CheckpointInfo, OptimizerFactory, Stateful
from typedbrain._rng import (
    RngState,
    capture_generators,
    capture_rng,
    restore_generators,
    restore_rng,
)
from typedbrain._run_record import RunRecord, RunStateRecoverable
from typedbrain._sampler import (
    batches_from,
    find_resumable_sampler,
    loader_batch_size,
    loader_generators,
    loader_seed,
    set_loader_epoch,
    set_loader_seed,
)
from typedbrain._signals import StopRequest
from typedbrain._state import (
    RunState,
    SamplerState,
    TrainingProgress,
)
from typedbrain._stop_agreement import StopAgreement, control_group
from typedbrain._transfer import move_to_device
from typedbrain._warn import warn

__all__ = ["BatchT", "Brain", "HparamsT", "PredT"]

logger = logging.getLogger(__name__)

BatchT = TypeVar("BatchT")
"""The type of one batch, as the data loader yields it."""
PredT = TypeVar("PredT")
"""The type ``compute_forward`` returns and ``compute_objectives`` receives."""
HparamsT = TypeVar("HparamsT", default=Hparams)
"""The type of ``brain.hparams``: an attrs class of yours, or :class:`Hparams` for a mapping."""
_NotNoneT = TypeVar("_NotNoneT")
"""The hparams type of a brain whose hparams are optional (``Brain[..., Hyper | None]``)."""

_NO_CONTEXT: Final = contextlib.nullcontext()

# The hooks a training batch calls; when none is overridden, a plain step runs them inline.
_PER_BATCH_HOOKS: Final = (
    "fit_batch",
    "on_fit_batch_start",
    "on_fit_batch_end",
    "check_loss_isfinite",
    "optimizers_step",
    "freeze_optimizers",
    "check_gradients",
    "update_average",
)


class Brain(RunOptionAttributes, Generic[BatchT, PredT, HparamsT]):
    """A training loop you specialise by overriding hooks, as with SpeechBrain's ``Brain``.

    Override :meth:`compute_forward` and :meth:`compute_objectives`; call :meth:`fit` to train
    and :meth:`evaluate` to test. The type parameters make the hooks typed: ``BatchT`` is what
    the data loader yields, ``PredT`` what ``compute_forward`` returns, ``HparamsT`` the type of
    ``self.hparams`` (an attrs class of yours, or :class:`Hparams` when you pass a mapping)::

        class Regressor(Brain[Batch, Tensor, MyHparams]):
            def compute_forward(self, batch: Batch, stage: Stage) -> Tensor:
                predictions: Tensor = self.modules["model"](batch.inputs)
                return predictions

            def compute_objectives(self, predictions: Tensor, batch: Batch, stage: Stage) -> Tensor:
                return F.mse_loss(predictions, batch.targets)

    Args:
        modules: the trainable modules by name; they become ``self.modules``, a
            ``torch.nn.ModuleDict`` moved to ``self.device``. A name ``ModuleDict`` cannot hold
            (empty, with a ``.``, or one of its own attributes such as ``keys``) is refused.
        opt_class: builds the optimizer from the modules' parameters in :meth:`init_optimizers`.
        hparams: hyperparameters, as ``self.hparams``. A mapping is wrapped in
            :class:`Hparams` (``hp.lr`` and ``hp["lr"]`` both work); any other object (an attrs
            instance, typically) is kept as it is, but a plain value (a file name, a list, a
            number) is refused, and so is an object that is not of the hparams class the brain
            declares. Keys named like a run option set it.
        run_opts: run options, as a mapping of option names to values (see
            :class:`RunOptions`) or a whole ``RunOptions`` (another brain's ``run_opts``, say);
            they override the ones in ``hparams``.
        checkpointer: where to register recoverables and recover from in ``on_fit_start`` and
            ``on_evaluate_start``. In debug mode without ``debug_persistently``, the brain
            points it at a temporary folder for its lifetime (see the ``debug_persistently``
            run option).

    Every argument is checked before the modules are moved to the device and before the
    process group is joined: a refused brain leaves them as they were.

    Raises:
        ConfigurationError: an argument of the wrong kind, named in the message (the
            :class:`RunOptionsError` subclass for a run option).

    Attributes:
        modules: the modules, as a ``ModuleDict``.
        hparams: the hyperparameters.
        run_opts: the run options in force; each is also an attribute (``self.debug``...).
        optimizers_dict: every optimizer by name; ``optimizers_step`` steps them.
        scaler: the grad scaler: enabled for fp16, a pass-through otherwise.
        step: batches run so far in the current stage.
        optimizer_step: optimizer steps taken so far.
        avg_train_loss: mean of this epoch's finite training losses so far.
        nonfinite_count: non-finite training losses in this epoch.
        train_sampler: the sampler that orders the training loader (a batch sampler you gave it,
            else its sampler), once ``fit`` has made it.
        profiler: the ``torch.profiler`` profile of the last training stage, when
            ``profile_training`` is set.
    """

    @overload
    def __init__(
        self: Brain[BatchT, PredT, Hparams],
        modules: Mapping[str, torch.nn.Module] | torch.nn.ModuleDict | None = None,
        opt_class: OptimizerFactory | None = None,
        hparams: Mapping[str, object] | None = None,
        run_opts: RunOptionsDict | RunOptions | None = None,
        checkpointer: CheckpointerLike | None = None,
    ) -> None: ...
    # A brain declaring optional hparams (Brain[..., Hyper | None]) built without them: mypy
    # takes the call without this overload (python/mypy#17916), pyright holds each self-type.
    @overload
    def __init__(
        self: Brain[BatchT, PredT, _NotNoneT | None],
        modules: Mapping[str, torch.nn.Module] | torch.nn.ModuleDict | None = None,
        opt_class: OptimizerFactory | None = None,
        hparams: None = None,
        run_opts: RunOptionsDict | RunOptions | None = None,
        checkpointer: CheckpointerLike | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module] | torch.nn.ModuleDict | None = None,
        opt_class: OptimizerFactory | None = None,
        *,
        hparams: HparamsT,
        run_opts: RunOptionsDict | RunOptions | None = None,
        checkpointer: CheckpointerLike | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module] | torch.nn.ModuleDict | None,
        opt_class: OptimizerFactory | None,
        hparams: HparamsT,
        run_opts: RunOptionsDict | RunOptions | None = None,
        checkpointer: CheckpointerLike | None = None,
    ) -> None: ...
    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module] | torch.nn.ModuleDict | None = None,
        opt_class: OptimizerFactory | None = None,
        hparams: HparamsT | Mapping[str, object] | None = None,
        run_opts: RunOptionsDict | RunOptions | None = None,
        checkpointer: CheckpointerLike | None = None,
    ) -> None:
        _check_hooks_take_their_keywords(type(self))
        name, declared = type(self).__name__, _declared_hparams(type(self))
        if isinstance(declared, TypeVarType):
            # Left open in its hparams type: mypy infers that type from what a constructor of
            # the brain's own is given, which is kept as it is; Brain's own constructor makes a
            # mapping an Hparams (its overloads say so).
            kept = _keeps_given_hparams(type(self))
            resolved = hparams if kept else resolve_hparams(hparams, None, name)
        else:
            resolved = resolve_hparams(hparams, declared, name)
        options = RunOptions.from_sources(
            hparams_items(hparams),
            run_opts if isinstance(run_opts, RunOptions) else cast(Mapping[str, object], run_opts),
        )
        # Every argument is checked before anything happens to the modules or the process: a
        # refused brain leaves the user's modules where they were (on "meta", moving them
        # loses their weights) and joins no process group.
        named = _named_modules(modules)
        _check_opt_class(opt_class)
        _check_checkpointer(checkpointer)
        launch = detect_launch()
        if options.device is None:
            options = attrs.evolve(options, device=device_for(launch))
        device = available_device(cast(str, options.device))
        if launch is not None:  # started by torchrun: join (or reuse) the group
            init_distributed(backend=options.distributed_backend, device=options.device)
        self.hparams = cast(HparamsT, resolved)
        self._plan: StepPlan | None = None
        self._run_opts = options
        self._device = device
        # torch's ModuleDict keeps a None module as it is; its annotations say Module only.
        self.modules = torch.nn.ModuleDict(cast(dict[str, torch.nn.Module], named)).to(device)
        self.opt_class = opt_class
        self.checkpointer = checkpointer
        self.optimizers_dict = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self.scaler = grad_scaler_for(self._device, options.precision)
        self.step = 0
        self.optimizer_step = 0
        self.avg_train_loss = 0.0
        self.nonfinite_count = 0
        self.train_sampler: Iterable[object] | None = None
        self.profiler: torch.profiler.profile | None = None
        self._machine = PhaseMachine()
        self._epoch: int | None = None
        self._averaged = 0  # losses in the current stage's running average
        self._skipped = 0  # non-finite losses left out of it
        self._loop_count: int | None = None  # while the loop calls update_average: _averaged
        self._window = 0  # finite backward passes since the last optimizer step
        self._old_window: tuple[int, int] | None = None  # restored (factor, passes) to step
        self._stepping_parameters: tuple[Tensor, ...] | None = None  # the chosen optimizers'
        self._stage_batches: int | None = None  # batches the current stage will run, if known
        self._read_tensor: Tensor | None = None  # the last loss read from its device ...
        self._read_value = 0.0  # ... and its value
        self._compiled: set[str] = set()
        self._ddp_modules: list[torch.nn.parallel.DistributedDataParallel] = []
        self._wrapped = False
        self._restored: RunRecord | None = None  # run state recovered, not yet applied
        self._epoch_rng: RngState | None = None  # the generators as this epoch began
        # The training loader's own generators as this epoch began (see loader_generators).
        self._epoch_loader_rng: tuple[tuple[int, ...], ...] | None = None
        # In an epoch's training stage, from on_stage_start to the end of its loop: a state
        # saved then re-enters the epoch.
        self._in_train_stage = False
        # Between the end of an epoch's training and the end of its validation; with the
        # generators as validation began, once it has.
        self._valid_pending = False
        self._valid_rng: RngState | None = None
        self._loss_not_averaged: Tensor | None = None  # in on_fit_batch_end: its batch's loss
        self._train_loader: DataLoader[object] | None = None
        self._valid_loader: DataLoader[object] | None = None
        self._epoch_counter: Iterable[int] | None = None  # the running fit's
        self._stop = StopRequest(enabled=False)
        # Under torch.distributed, with stop_on_signals: how the processes agree to stop.
        self._agreement: StopAgreement | None = None
        self._control_group: dist.ProcessGroup | None = None  # made by the first such fit
        self._last_checkpoint_time = 0.0
        self._use_current_weights = False
        if checkpointer is not None:
            if _debug_folder(options):
                redirect_for_debug(checkpointer)
            # Both optional: a checkpoint saved without them (by a plain Checkpointer, or in
            # another precision) still loads, and the run starts them afresh.
            _add_optional(
                checkpointer, "brain", RunStateRecoverable(self._record_run, self._recovered)
            )
            if self.scaler.is_enabled():
                _add_optional(checkpointer, "scaler", self.scaler)
            watch_phase = getattr(checkpointer, "watch_phase", None)
            if callable(watch_phase):
                watch_phase(lambda: self.phase.name)

    # ----------------------------------------------------------------------------------------
    # Observable state

    @property
    def device(self) -> str:
        """The device the modules live on, e.g. ``"cpu"`` or ``"cuda:0"``."""
        return self.run_opts.device or str(self._device)

    @property
    def run_opts(self) -> RunOptions:
        """The run options in force; each one is also an attribute of the brain."""
        return self._run_opts

    @run_opts.setter
    def run_opts(self, options: RunOptions) -> None:
        if not isinstance(options, RunOptions):
            raise ConfigurationError(
                f"run_opts must be assigned a RunOptions, not {type(options).__name__}: "
                "change options with attrs.evolve(brain.run_opts, name=value)"
            )
        if options.device is None:  # the default device: the one this brain resolved it to
            options = attrs.evolve(options, device=self._run_opts.device)
        if options.device != self._run_opts.device:
            raise ConfigurationError(
                f"device cannot change from {self._run_opts.device!r} to {options.device!r} "
                "once the brain is built: its modules, grad scaler and process group were set "
                "up for it then; pass the device in run_opts"
            )
        fp16 = self._run_opts.precision == "fp16"
        if (options.precision == "fp16") != fp16:
            raise ConfigurationError(
                f"precision cannot change from {self._run_opts.precision!r} to "
                f"{options.precision!r} once the brain is built: fp16 training needs the grad "
                "scaler the brain makes (and checkpoints) when it is built; pass the precision "
                "in run_opts"
            )
        if self.checkpointer is not None and _debug_folder(options) != _debug_folder(
            self._run_opts
        ):
            raise ConfigurationError(
                f"debug={options.debug!r} with debug_persistently="
                f"{options.debug_persistently!r} cannot be set once the brain is built with a "
                "checkpointer: which folder its checkpoints go to (a temporary one for a debug "
                "run, the checkpointer's own otherwise) is decided then; pass debug in run_opts"
            )
        self._run_opts = options
        self._plan = None

    @property
    def optimizers_dict(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer by name, for :meth:`optimizers_step` to step."""
        return self._optimizers

    @optimizers_dict.setter
    def optimizers_dict(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers
        self._plan = None

    @property
    def phase(self) -> Phase:
        """What the brain is doing now; see :class:`Phase` and ``TRANSITIONS``."""
        return self._machine.phase

    def add_phase_observer(self, observer: PhaseObserver) -> None:
        """Have ``observer.on_phase_change(old, new)`` called after every phase change."""
        self._machine.subscribe(observer)

    def remove_phase_observer(self, observer: PhaseObserver) -> None:
        """Stop notifying ``observer``; raises ``ValueError`` if it was not added."""
        self._machine.unsubscribe(observer)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer built from ``opt_class`` by :meth:`init_optimizers`.

        Raises:
            ConfigurationError: there is none yet (no ``opt_class``, or ``fit`` has not
                started); an override of ``init_optimizers`` may assign one.
        """
        if self._optimizer is None:
            raise ConfigurationError(
                "this brain has no optimizer: pass opt_class to Brain() (it is built when fit() "
                "starts), or assign self.optimizer in an init_optimizers() override"
            )
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        previous, self._optimizer = self._optimizer, optimizer
        # An init_optimizers override that assigns self.optimizer alone (as older recipes do)
        # gets it stepped: it replaces the default entry, never optimizers the recipe listed.
        optimizers = self.optimizers_dict
        if not optimizers or (
            len(optimizers) == 1 and optimizers.get("opt_class") is previous is not None
        ):
            self.optimizers_dict = {"opt_class": optimizer}

    # ----------------------------------------------------------------------------------------
    # Hooks to override

    def compute_forward(self, batch: BatchT, stage: Stage) -> PredT:
        """Compute the predictions for one batch. Override this.

        Runs under autocast when ``precision`` (training) or ``eval_precision`` (validation,
        test) asks for it, and under ``torch.no_grad`` outside training.
        """
        raise NotImplementedError(f"{type(self).__name__} must override compute_forward()")

    def compute_objectives(self, predictions: PredT, batch: BatchT, stage: Stage) -> Tensor:
        """Compute the loss (a scalar tensor) from the predictions. Override this."""
        raise NotImplementedError(f"{type(self).__name__} must override compute_objectives()")

    def on_stage_start(self, stage: Stage, epoch: int | None = None) -> None:
        """Called when a stage starts; ``epoch`` is ``None`` for the test stage."""

    def on_stage_end(self, stage: Stage, stage_loss: float, epoch: int | None = None) -> None:
        """Called when a stage ends with its mean loss: log, schedule, checkpoint here."""

    def on_fit_start(self) -> None:
        """Prepare for training: compile, wrap for distribution, build optimizers, recover.

        Override to add set-up, calling ``super().on_fit_start()`` first.
        """
        self._compile_jit()
        self._wrap_distributed()
        self.init_optimizers()
        if self.checkpointer is not None:
            recovered = self.checkpointer.recover_if_possible(device=self._device)
            if recovered is not None and self._restored is None:
                where = getattr(recovered, "path", recovered)
                warn(
                    f"checkpoint {where} holds no run state of a brain (no 'brain' entry): the "
                    "recovered objects are used, but the counters, random generators and data "
                    "order start afresh, so the run does not continue an interrupted one",
                    ResumeWarning,
                )

    def init_optimizers(self) -> None:
        """Build ``self.optimizer`` from ``opt_class`` and register it with the checkpointer.

        Override to build several optimizers: put each in ``self.optimizers_dict`` (and
        register them with the checkpointer) so ``optimizers_step`` steps them all.

        Raises:
            ConfigurationError: ``opt_class`` refused the modules' parameters because there
                are none (torch's "empty parameter list"), or returned something that is not
                an optimizer (no ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``).
        """
        if self.opt_class is None:
            return
        parameters = (
            vector_weight_decay_groups(self.modules)
            if self.remove_vector_weight_decay
            else self.modules.parameters()
        )
        try:
            built: object = self.opt_class(parameters)
        except ValueError as error:
            if next(self.modules.parameters(), None) is not None:
                raise
            modules = (
                f"its modules ({', '.join(self.modules)}) have none"
                if self.modules
                else "it has no modules"
            )
            raise ConfigurationError(
                f"opt_class refused the brain's parameters: {modules} ({error}); pass the "
                "trainable modules to Brain(), or leave opt_class out"
            ) from error
        if not all(
            callable(getattr(built, name, None))
            for name in ("step", "zero_grad", "state_dict", "load_state_dict")
        ):
            raise ConfigurationError(
                "opt_class must return an optimizer (a torch.optim.Optimizer, built over the "
                f"parameters it is given), but it returned {type(built).__name__} {built!r:.80}"
            )
        self.optimizer = cast(torch.optim.Optimizer, built)  # (a duck-typed one is taken too)
        self.optimizers_dict = {"opt_class": self.optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)

    def on_evaluate_start(self, max_key: str | None = None, min_key: str | None = None) -> None:
        """Before testing: recover the best checkpoint by ``max_key`` / ``min_key`` if any.

        Nothing is recovered when ``evaluate`` was called with ``use_current_weights=True``.
        The loop passes the keys by name: an override keeps these names (mypy does not check
        the names of overriding parameters; the brain does, when it is built).
        """
        if self.checkpointer is not None and not self._use_current_weights:
            self.checkpointer.recover_if_possible(
                max_key=max_key, min_key=min_key, device=self._device
            )

    def _reads_sources_itself(self) -> bool:
        """Whether this brain's loaders come from :meth:`make_dataloader` as typedbrain wrote it.

        Then ``fit`` and ``evaluate`` check their data sets before anything runs. A
        ``make_dataloader`` override may read sources of its own (a CSV file's path, say):
        what it is given is left to it.
        """
        return type(self).make_dataloader is Brain.make_dataloader

    def make_dataloader(
        self,
        dataset: DataSource,
        stage: Stage,
        ckpt_prefix: str | None = "dataloader-",
        **loader_kwargs: Unpack[LoaderKwargs],
    ) -> DataLoader[object]:
        """Turn a dataset into the data loader a stage iterates over.

        The loader's order is a function of a seed and the epoch, so a resumed run skips the
        batches already consumed without loading them (see ``typedbrain._data``). Under a
        ``torch.distributed`` process group each process loads its own shard: training shards
        are padded to the same length on every rank (DDP keeps the ranks in step), validation
        and test shards are not (no example is counted twice), and the seed is the main
        process's.

        Args:
            dataset: a torch ``Dataset`` or any sequence of examples; a ``DataLoader`` is
                returned as it is. Anything a ``DataLoader`` cannot read (``None``, a str, a
                mapping not keyed 0, 1, 2..., a generator, a number) is refused with a
                ``ConfigurationError``.
            stage: the stage the loader is for.
            ckpt_prefix: kept for SpeechBrain compatibility; the brain saves the training
                sampler's state in its own run state.
            loader_kwargs: ``DataLoader`` options (``batch_size``, ``shuffle``...).
        """
        del ckpt_prefix
        if isinstance(dataset, DataLoader):
            loader = dataset
        elif is_distributed():
            shard = Shard(
                rank=dist.get_rank(), world_size=dist.get_world_size(), pad=stage is Stage.TRAIN
            )
            given = cast(dict[str, object], loader_kwargs).pop("seed", None)  # untyped, but taken
            seed = seed_from_main() if given is None else given
            loader = make_dataloader(
                dataset,
                seed=cast(int, seed),  # make_dataloader checks it
                shard=shard,
                **loader_kwargs,
            )
        else:
            loader = make_dataloader(dataset, **loader_kwargs)
        if stage is Stage.TRAIN:
            self.train_sampler = _sampler_of(loader)
        return loader

    def on_fit_batch_start(self, batch: BatchT, should_step: bool) -> None:
        """Called before each training batch; ``should_step`` says whether it ends a step."""

    def on_fit_batch_end(
        self, batch: BatchT, outputs: PredT, loss: Tensor, should_step: bool
    ) -> None:
        """Called after each training batch with its predictions and loss."""

    def move_batch(self, batch: BatchT) -> BatchT:
        """The batch with its tensors on :attr:`device`; runs before each batch's hooks.

        ``fit`` and ``evaluate`` pass each batch the loader yields through this before
        ``fit_batch`` or ``evaluate_batch`` sees it, so ``compute_forward`` needs no
        ``.to(self.device)``. The default walks dicts, lists, tuples (named ones too), attrs and
        dataclass instances, and calls ``to(device)`` instead on an object that has that method
        (torch's ``PackedSequence`` keeps its batch sizes on the CPU that way); a batch already
        on the device is returned as it is. Override it to move only part of a batch (say,
        audio that ``compute_forward`` turns into features on the CPU), or to return the batch
        unchanged and move what you need yourself.
        """
        return move_to_device(batch, self._device)

    def fit_batch(self, batch: BatchT) -> Tensor:
        """Train on one batch; returns its loss, detached, on the CPU.

        Accumulates gradients over ``grad_accumulation_factor`` batches (each loss divided by
        its window's size: the factor, or the batches left for an epoch's last window; DDP
        gradient sync skipped until the window's last batch) and steps the optimizers on the
        last one, or on the last batch of the epoch. A non-finite loss skips its backward
        pass. A step applies the mean gradient of the finite batches it covers.
        """
        plan = self._plan or self._current_plan()
        step = self.step
        should_step = step % plan.accumulation == 0 or step == self._stage_batches
        if plan.call_batch_start:
            self.on_fit_batch_start(batch, should_step)
        with _NO_CONTEXT if should_step or not self._ddp_modules else self.no_sync():
            with plan.train_context:
                outputs = self.compute_forward(batch, Stage.TRAIN)
                loss = self.compute_objectives(outputs, batch, Stage.TRAIN)
            finite = self.check_loss_isfinite(loss)
            if finite:
                size = window_size(step, plan.accumulation, self._stage_batches)
                scaled = loss / size if size > 1 else loss
                if self.scaler.is_enabled():
                    scaled = self.scaler.scale(scaled)
                torch.autograd.backward(scaled)
                self._window += 1
        if should_step and self._window:  # a window without finite losses has nothing to step
            if not finite and self._ddp_modules:
                # DDP syncs a window's gradients in its last backward pass, which this
                # non-finite loss skipped (on every process: check_loss_isfinite agrees).
                self._sync_gradients()
            self._close_window(plan)
        if plan.call_batch_end:
            # A checkpoint saved by the hook counts this batch's loss as the loop will next.
            self._loss_not_averaged = loss
            try:
                self.on_fit_batch_end(batch, outputs, loss, should_step)
            finally:
                self._loss_not_averaged = None
        result = loss.detach()
        if not result.is_cpu:
            result = result.cpu()
        if loss is self._read_tensor:  # update_average will want the value read for loss
            self._read_tensor = result
        return result

    def check_loss_isfinite(self, loss: Tensor) -> bool:
        """Whether ``loss`` is finite; counts a non-finite one against ``nonfinite_patience``.

        Under ``torch.distributed`` the processes agree (an all-reduce of one number): a loss
        that is not finite on any process counts as not finite on all of them, so that every
        process skips the same backward passes (DDP's gradient sync needs them all), counts the
        same and raises together.

        Raises:
            NonFiniteLossError: this epoch has now seen more than ``nonfinite_patience``
                non-finite losses.
            HookContractError: ``loss`` is not a one-element tensor.
        """
        value = _loss_value(loss)
        # Kept for update_average, so that the loss is read from its device once per batch.
        self._read_tensor, self._read_value = loss, value
        finite = math.isfinite(value)
        if is_distributed():
            flag = torch.tensor([0.0 if finite else 1.0], device=loss.device)
            elsewhere = bool(all_reduce_sum(flag).item()) and finite
            finite = finite and not elsewhere
            if elsewhere:
                logger.warning(
                    "non-finite loss on another process at epoch %s, step %d: this process "
                    "skips the batch's backward pass too",
                    self._epoch,
                    self.step,
                )
        if finite:
            return True
        self.nonfinite_count += 1
        if self.nonfinite_count > self.nonfinite_patience:
            raise NonFiniteLossError(
                epoch=self._epoch,
                step=self.step,
                count=self.nonfinite_count,
                patience=self.nonfinite_patience,
            )
        logger.warning(
            "non-finite loss at epoch %s, step %d: its backward pass and optimizer step are "
            "skipped (%d of %d tolerated this epoch)",
            self._epoch,
            self.step,
            self.nonfinite_count,
            self.nonfinite_patience,
        )
        return False

    def check_gradients(self, loss: Tensor | None = None) -> bool:
        """Check and clip the gradients before a step; ``False`` means: do not step.

        Clips the total gradient norm over every parameter of the optimizers about to step
        (every optimizer's, unless :meth:`freeze_optimizers` leaves some out) to
        ``max_grad_norm`` (unless it is 0 or less). With ``skip_nonfinite_grads``, non-finite
        gradients are dropped and ``False`` returned. The parameters are collected when a stage
        starts and whenever ``run_opts`` or ``optimizers_dict`` is assigned.

        Args:
            loss: when given (the style of older recipes), it is checked first with
                :meth:`check_loss_isfinite`.
        """
        if loss is not None and not self.check_loss_isfinite(loss):
            return False
        plan = self._plan or self._current_plan()
        max_norm, skip_nonfinite = plan.clip_norm, plan.skip_nonfinite_grads
        if max_norm <= 0 and not skip_nonfinite:
            return True
        stepping = self._stepping_parameters
        parameters = plan.parameters if stepping is None else stepping
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        else:
            norm = gradient_norm(parameters)
        if skip_nonfinite and not math.isfinite(norm.item()):
            for parameter in parameters:
                parameter.grad = None
            logger.warning(
                "non-finite gradients at epoch %s, step %d: optimizer step skipped",
                self._epoch,
                self.step,
            )
            return False
        return True

    def freeze_optimizers(
        self, optimizers: Mapping[str, torch.optim.Optimizer]
    ) -> Mapping[str, torch.optim.Optimizer]:
        """Choose the optimizers to step now (all of them by default).

        Override to alternate optimizers (a GAN's generator and discriminator, say).
        """
        return optimizers

    def optimizers_step(self) -> None:
        """Step the optimizers chosen by :meth:`freeze_optimizers` and clear their gradients.

        Unscales fp16 gradients, calls :meth:`check_gradients` (which covers the chosen
        optimizers' parameters), steps (through the grad scaler for fp16) and counts the step
        in ``optimizer_step`` if it was taken. The gradients of optimizers left out are kept,
        untouched (for fp16, they follow the grad scaler's scale when it changes).
        """
        plan = self._plan or self._current_plan()
        held: tuple[Tensor, ...] = ()
        if plan.call_freeze:
            optimizers = tuple(self.freeze_optimizers(self.optimizers_dict).values())
            stepping = unique_parameters(optimizers)
            if len(stepping) < len(plan.parameters):
                chosen = {id(parameter) for parameter in stepping}
                held = tuple(p for p in plan.parameters if id(p) not in chosen)
                self._stepping_parameters = stepping
        else:
            optimizers = plan.optimizers
        try:
            stepped = self._step(optimizers, held)
        finally:
            self._stepping_parameters = None
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if stepped and optimizers:  # a step without an optimizer changed nothing
            self.optimizer_step += 1

    def _step(
        self, optimizers: tuple[torch.optim.Optimizer, ...], held: tuple[Tensor, ...]
    ) -> bool:
        scaler = self.scaler
        if not scaler.is_enabled():
            stepped = self.check_gradients()
            if stepped:
                for optimizer in optimizers:
                    optimizer.step()
            return stepped
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        stepped = self.check_gradients()
        if stepped:
            for optimizer in optimizers:
                scaler.step(optimizer)
        if optimizers:
            scale = scaler.get_scale()  # scaler.step has synchronised already
            scaler.update()
            # The scaler skips a step whose gradients overflowed, and lowers its scale.
            new_scale = scaler.get_scale()
            stepped = stepped and new_scale >= scale
            if held and new_scale != scale:
                # Held gradients are in the old scale's units; later passes add the new one's.
                scale_gradients(held, new_scale / scale)
        return stepped

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Clear the gradients of the optimizers chosen by :meth:`freeze_optimizers`.

        The loop passes ``set_to_none`` by name (see :meth:`on_evaluate_start`).
        """
        for optimizer in self.freeze_optimizers(self.optimizers_dict).values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def evaluate_batch(self, batch: BatchT, stage: Stage) -> Tensor:
        """Compute one validation or test batch's loss (under ``torch.no_grad``), on the CPU."""
        with (self._plan or self._current_plan()).eval_context:
            outputs = self.compute_forward(batch, stage)
            loss = self.compute_objectives(outputs, batch, stage)
        if not isinstance(loss, Tensor):
            raise _not_a_loss(loss)
        result = loss.detach()
        return result if result.is_cpu else result.cpu()

    def update_average(self, loss: Tensor | float, avg_loss: float) -> float:
        """Fold ``loss`` into the running mean ``avg_loss``; returns the new mean.

        Non-finite losses are left out (``avg_loss`` comes back unchanged). For the stage's own
        mean the loop counts the losses itself and the default divides by the number of finite
        ones so far (validation and test warn about the others at the end of the stage).
        Called by you, for a mean of your own (a metric in ``compute_objectives`` or
        ``on_fit_batch_end``), it divides by ``self.step``, the batches of the stage so far, as
        SpeechBrain's does: one call per batch gives the mean of your values, and your calls
        never change the stage's loss.

        Raises:
            HookContractError: called by you while ``self.step`` is 0 (no batch counted yet).
        """
        value = self._value_of(loss)
        if not math.isfinite(value):
            return avg_loss
        count = self._loop_count if self._loop_count is not None else self.step
        if count < 1:
            raise HookContractError(
                "update_average() divides by self.step, the batches of the stage so far, when "
                "called outside the loop's own call; self.step is 0: count your batches in "
                "self.step (the loop does so before each batch)"
            )
        return running_mean(avg_loss, value, count)

    def _value_of(self, loss: Tensor | float) -> float:
        """The loss as a float, without reading a tensor the loop has read already."""
        if loss is self._read_tensor:
            return self._read_value
        return _loss_value(loss) if isinstance(loss, Tensor) else float(loss)

    def _fold_into_mean(self, loss: Tensor | float, avg_loss: float) -> float:
        """The loop's call of ``update_average`` for the stage's mean, counting the loss."""
        value = self._value_of(loss)
        if isinstance(loss, Tensor):  # read once: the default update_average reuses it
            self._read_tensor, self._read_value = loss, value
        if math.isfinite(value):
            self._averaged += 1
        else:
            self._skipped += 1
        self._loop_count = self._averaged
        try:
            return self.update_average(loss, avg_loss)
        finally:
            self._loop_count = None

    def no_sync(self, use: bool = True) -> AbstractContextManager[object]:
        """A context in which DDP does not synchronise gradients (when ``use`` is true).

        Without distributed modules (or with ``use`` false) this is a no-op context.
        """
        if not use or not self._ddp_modules:
            return _NO_CONTEXT
        stack = ExitStack()
        for module in self._ddp_modules:
            stack.enter_context(module.no_sync())
        return stack

    # ----------------------------------------------------------------------------------------
    # Entry points

    def fit(
        self,
        epoch_counter: Iterable[int],
        train_set: DataSource,
        valid_set: DataSource | None = None,
        progressbar: bool | None = None,
        train_loader_kwargs: LoaderKwargs | None = None,
        valid_loader_kwargs: LoaderKwargs | None = None,
    ) -> None:
        """Train for the epochs ``epoch_counter`` yields, validating after each one.

        The hooks run in this order (phases in brackets)::

            if test_only: return
            [FIT_START]
            train_loader = make_dataloader(train_set, Stage.TRAIN, **train_loader_kwargs)
            valid_loader = make_dataloader(valid_set, Stage.VALID, **valid_loader_kwargs)
            on_fit_start()          # _compile_jit, _wrap_distributed, init_optimizers, recover
            for epoch in epoch_counter:
                [TRAIN]
                on_stage_start(Stage.TRAIN, epoch)
                zero_grad()
                for batch in train_loader:             # until optimizer_step_limit
                    batch = move_batch(batch)          # its tensors onto self.device
                    fit_batch(batch):
                        on_fit_batch_start(batch, should_step)
                        outputs = compute_forward(batch, Stage.TRAIN)
                        loss = compute_objectives(outputs, batch, Stage.TRAIN)
                        check_loss_isfinite(loss)     # then backward, unless non-finite
                        if should_step:
                            optimizers_step():
                                freeze_optimizers(optimizers_dict)
                                check_gradients()      # clip; then step each optimizer
                        on_fit_batch_end(batch, outputs, loss, should_step)
                    avg_train_loss = update_average(loss, avg_train_loss)
                zero_grad(set_to_none=True)
                on_stage_end(Stage.TRAIN, avg_train_loss, epoch)
                if valid_set is not None:
                    [VALID]
                    on_stage_start(Stage.VALID, epoch)
                    for batch in valid_loader:         # under torch.no_grad()
                        batch = move_batch(batch)
                        loss = evaluate_batch(batch, Stage.VALID)
                        avg_valid_loss = update_average(loss, avg_valid_loss)
                    on_stage_end(Stage.VALID, avg_valid_loss, epoch)
            checkpointer.wait()     # a Checkpointer's commit in the background, if any
            [IDLE]                                     # [FAILED] if anything raised

        With a checkpointer, ``on_fit_start`` recovers the newest checkpoint; when it was taken
        in an epoch's training stage (an intra-epoch checkpoint, see ``ckpt_interval_steps``,
        or one your ``on_stage_start`` saved), the interrupted epoch is re-entered and continues
        after the last batch it saved, with the random generators, sampler position and
        gradients of that moment; when it was taken after the epoch's training and before the
        end of its validation, the epoch's validation runs again (without training). Either
        way the run ends exactly as an uninterrupted one. SIGTERM and SIGINT stop the run after the
        current batch (see the ``stop_on_signals`` run option).

        Under ``torchrun`` every process runs this same loop on its own shard of the data (see
        :meth:`make_dataloader`); the stage losses given to ``on_stage_end`` are means over
        every process, and checkpoints are saved once, by the main process.

        ``should_step`` is true every ``grad_accumulation_factor`` batches and on the last
        batch of the epoch; when the loader's length is unknown, gradients left over at the end
        of an epoch are stepped after the loop, so none is dropped. In debug mode each stage
        stops after ``debug_batches`` batches and ``fit`` after ``debug_epochs`` epochs.

        Args:
            epoch_counter: yields the epoch numbers, e.g. ``range(1, 11)`` or an
                :class:`EpochCounter` (which a checkpointer can resume).
            train_set: the training data: a ``DataLoader``, or a dataset for
                :meth:`make_dataloader`.
            valid_set: the validation data, or ``None`` to skip validation.
            progressbar: show progress bars; ``None`` follows the ``noprogressbar`` option.
            train_loader_kwargs: ``DataLoader`` options for ``train_set``.
            valid_loader_kwargs: ``DataLoader`` options for ``valid_set``.

        Raises:
            ReentrantCallError: called while ``fit`` or ``evaluate`` is running.
            ConfigurationError: before anything runs, ``epoch_counter`` is not an iterable of
                epoch numbers (a str, say), or ``train_set`` or ``valid_set`` is not a data set
                (``None`` for ``train_set``, a str, another mapping, a generator, a number; not
                checked when ``make_dataloader`` is overridden); when ``init_optimizers`` runs,
                ``opt_class`` refuses the modules' parameters (there are none) or returns no
                optimizer.
            NonFiniteLossError: an epoch saw more than ``nonfinite_patience`` non-finite losses.
            TrainingInterruptedError: SIGTERM or SIGINT arrived; the run stopped after a batch
                (and saved an intra-epoch checkpoint during training, with a checkpointer).
        """
        if self.test_only:
            logger.info("test_only is set: fit() returns without training")
            return
        self._check_can_start("fit", Phase.FIT_START)
        _check_fit_arguments(epoch_counter)
        if self._reads_sources_itself():
            _check_data_set(train_set, "fit(): train_set")
            if valid_set is not None:
                _check_data_set(valid_set, "fit(): valid_set")
        open_epoch: EpochCounter | None = None  # drawn from the counter, not yet finished
        try:
            with StopRequest(enabled=self.stop_on_signals) as self._stop:
                self._agreement = self._agree_on_stops()
                self._machine.move(Phase.FIT_START)
                train_loader = self._loader(train_set, Stage.TRAIN, train_loader_kwargs)
                self._train_loader = train_loader
                valid_loader = (
                    None
                    if valid_set is None
                    else self._loader(valid_set, Stage.VALID, valid_loader_kwargs)
                )
                self._valid_loader = valid_loader
                self._epoch_counter = epoch_counter
                self.on_fit_start()
                self._warn_about_fit_setup()
                self._check_processes_agree(train_loader)
                self._warn_about_another_process_count()
                reentering = self._reenter_interrupted_epoch(epoch_counter)
                self._last_checkpoint_time = time.monotonic()
                show = self._progress_enabled(progressbar)
                epochs: Iterable[int] = epoch_counter
                if self._step_limit_reached() and not reentering:
                    # A restart of a run that had reached the limit: no epoch is left to run,
                    # and none is drawn from the counter (it stays where the run left it).
                    logger.info(
                        "optimizer_step_limit=%s was reached before this fit: nothing to train",
                        self.optimizer_step_limit,
                    )
                    epochs = ()
                epochs_run = 0
                for epochs_run, epoch in enumerate(self._agreed_epochs(epochs), start=1):
                    if isinstance(epoch_counter, EpochCounter):
                        open_epoch = epoch_counter
                    if not self._resume_at_validation(train_loader, epoch):
                        self._train_stage(train_loader, epoch, show)
                    if valid_loader is not None:
                        self._valid_stage(valid_loader, epoch, show)
                    open_epoch = None
                    if self.debug and epochs_run >= self.debug_epochs:
                        break
                    if self._step_limit_reached():
                        logger.info("optimizer_step_limit=%s reached", self.optimizer_step_limit)
                        break
                self._epoch = None
                if (
                    epochs_run == 0
                    and isinstance(epoch_counter, EpochCounter)
                    and epoch_counter.current >= epoch_counter.limit
                ):
                    # A finished run started again (to evaluate, say): say why nothing trained.
                    logger.info(
                        "the epoch counter is at its limit (epoch %d of %d): no epoch to train",
                        epoch_counter.current,
                        epoch_counter.limit,
                    )
                self._stop_if_asked_after_training()
                if isinstance(self.checkpointer, Checkpointer):
                    self.checkpointer.wait()
                self._machine.move(Phase.IDLE)
        except BaseException as error:
            if open_epoch is not None:
                # The epoch did not finish: a later fit with this counter runs it again (a
                # checkpoint recovered then puts the counter where it was saved anyway).
                open_epoch.current -= 1
            try:
                self._finish_checkpoint(error)
            finally:  # a second Ctrl-C while waiting: the brain still fails
                self._fail(error)
            raise
        finally:
            self._restored = None
            self._train_loader = None
            self._valid_loader = None
            self._epoch_counter = None
            self._valid_pending = False
            self._valid_rng = None
            self._old_window = None
            self._in_train_stage = False
            self._stop = StopRequest(enabled=False)
            self._agreement = None

    def evaluate(
        self,
        test_set: DataSource,
        max_key: str | None = None,
        min_key: str | None = None,
        progressbar: bool | None = None,
        test_loader_kwargs: LoaderKwargs | None = None,
        *,
        use_current_weights: bool = False,
    ) -> float:
        """Test the model; returns the mean test loss.

        The hooks run in this order (phases in brackets)::

            [TEST]
            test_loader = make_dataloader(test_set, Stage.TEST, **test_loader_kwargs)
            on_evaluate_start(max_key, min_key)   # recovers the best checkpoint, if any
            on_stage_start(Stage.TEST, None)
            for batch in test_loader:             # under torch.no_grad()
                batch = move_batch(batch)
                loss = evaluate_batch(batch, Stage.TEST)
                avg_test_loss = update_average(loss, avg_test_loss)
            on_stage_end(Stage.TEST, avg_test_loss, None)
            [IDLE]                                # [FAILED] if anything raised

        Args:
            test_set: a ``DataLoader``, or a dataset for :meth:`make_dataloader`.
            max_key: recover the checkpoint with the highest value of this meta key.
            min_key: recover the checkpoint with the lowest value of this meta key.
            progressbar: show a progress bar; ``None`` follows the ``noprogressbar`` option.
            test_loader_kwargs: ``DataLoader`` options for ``test_set``.
            use_current_weights: test the weights the modules hold now: the default
                ``on_evaluate_start`` then recovers no checkpoint.

        Raises:
            ReentrantCallError: called while ``fit`` or ``evaluate`` is running.
            ConfigurationError: ``test_set`` is not a data set (``None``, a str, another mapping, a
                generator, a number; not checked when ``make_dataloader`` is overridden);
                nothing has run then.
        """
        self._check_can_start("evaluate", Phase.TEST)
        if self._reads_sources_itself():
            _check_data_set(test_set, "evaluate(): test_set")
        self._use_current_weights = use_current_weights
        try:
            self._machine.move(Phase.TEST)
            test_loader = self._loader(test_set, Stage.TEST, test_loader_kwargs)
            self.on_evaluate_start(max_key=max_key, min_key=min_key)
            self._start_stage(Stage.TEST, None)
            self.modules.eval()
            avg_test_loss = self._evaluate_loader(
                test_loader, Stage.TEST, self._progress_enabled(progressbar), "test"
            )
            self.on_stage_end(Stage.TEST, avg_test_loss, None)
            self._end_stage()
            self._machine.move(Phase.IDLE)
        except BaseException as error:
            self._fail(error)
            raise
        finally:
            self._use_current_weights = False
            self._restored = None  # a recovered run state is for fit to apply, not a later one
        return avg_test_loss

    # ----------------------------------------------------------------------------------------
    # Preparation (names kept from SpeechBrain: recipes override on_fit_start with them)

    def _compile_jit(self) -> None:
        """``torch.compile`` / ``torch.jit.script`` the modules the run options name, once."""
        compile_modules(self.modules, self.run_opts, self._compiled)

    def _wrap_distributed(self) -> None:
        """Wrap trainable modules in DDP (under a process group) or DataParallel, once."""
        if not self._wrapped:
            self._ddp_modules = wrap_modules(self.modules, self.run_opts, self._device)
            # Without a group or DataParallel nothing was wrapped: a later fit under a group
            # (one started after this fit) wraps then.
            self._wrapped = is_distributed() or self.run_opts.data_parallel_backend

    # ----------------------------------------------------------------------------------------
    # The loop's inner workings

    def _check_can_start(self, entry_point: str, target: Phase) -> None:
        if self._machine.notifying or not self._machine.can_move(target):
            raise ReentrantCallError(entry_point, self.phase, target, self._machine.allowed)

    def _finish_checkpoint(self, error: BaseException) -> None:
        """Let a commit in the background end before ``error`` leaves ``fit``; note a failure.

        What was saved before the error is then on disk when ``fit`` raises (a stop by signal
        has waited for its own checkpoint already). Not collective (the other processes may not
        be failing).
        """
        if not isinstance(self.checkpointer, Checkpointer):
            return
        failure = finish_background_commit(self.checkpointer)
        if failure is not None:
            error.add_note(
                "(and committing a checkpoint in the background failed: "
                f"{type(failure).__name__}: {failure})"
            )

    def _fail(self, error: BaseException) -> None:
        """Move to FAILED as ``error`` leaves ``fit`` or ``evaluate``, freeing its loaders."""
        release_loader_frames(error)  # the workers must not live as long as the error is kept
        if not self._machine.can_move(Phase.FAILED):
            # Only an observer of the last move, to IDLE, raises once the run is over: the
            # brain rests in IDLE and the observer's error reaches the caller.
            return
        try:
            self._machine.move(Phase.FAILED)
        except Exception:  # an observer failed on FAILED: keep the original error going
            logger.exception("a phase observer raised while the brain moved to FAILED")

    def _loader(
        self, data: DataSource, stage: Stage, loader_kwargs: LoaderKwargs | None
    ) -> DataLoader[object]:
        if isinstance(data, DataLoader):
            if loader_kwargs:
                warn(
                    f"the {stage.value} loader options {sorted(loader_kwargs)} are ignored: "
                    f"the {stage.value} set is already a DataLoader (they are for a dataset "
                    "the brain makes a loader from)",
                    UserWarning,
                )
            if stage is Stage.TRAIN:
                self.train_sampler = _sampler_of(data)
            if stage is not Stage.TEST and data.num_workers > 0 and data.persistent_workers:
                warn(
                    f"the {stage.value} DataLoader keeps its workers from one epoch to the next "
                    "(persistent_workers=True): what they change in themselves while loading "
                    "(their random generators, a dataset's cache) carries over to the next "
                    "epoch, while a resumed run starts them afresh, so the resume is not "
                    "exact; use persistent_workers=False for exact resumes",
                    ResumeWarning,
                )
            return data
        # ** unpacks into a fresh dict: the caller's kwargs are never modified.
        return self.make_dataloader(data, stage, **(loader_kwargs or LoaderKwargs()))

    def _progress_enabled(self, progressbar: bool | None) -> bool:
        enabled = not self.noprogressbar if progressbar is None else progressbar
        return enabled and if_main_process()

    def _step_limit_reached(self) -> bool:
        limit = self.optimizer_step_limit
        return limit is not None and self.optimizer_step >= limit

    def _planned_batches(self, loader: DataLoader[object]) -> int | None:
        length = loader_length(loader)
        if self.debug:
            return self.debug_batches if length is None else min(length, self.debug_batches)
        return length

    def _sync_gradients(self) -> None:
        """Average the DDP modules' gradients over the processes, as DDP's own sync would."""
        world_size = dist.get_world_size()
        for module in self._ddp_modules:
            for parameter in module.parameters():
                if parameter.grad is not None:
                    parameter.grad.copy_(all_reduce_sum(parameter.grad) / world_size)

    def _step_old_window(self, saved_factor: int, backward_passes: int) -> None:
        """Step a restored window that another ``grad_accumulation_factor`` left open."""
        self._old_window = None
        # Each of its backward passes was divided by its size under the saved factor.
        size = window_size(self.step, saved_factor, self._stage_batches)
        scale_gradients(self._current_plan().parameters, size / backward_passes)
        self.optimizers_step()

    def _close_window(self, plan: StepPlan) -> None:
        """Step the optimizers with the mean gradient of the window's finite batches.

        Each finite loss was divided by the window's size (see ``window_size``); a window that
        ended with fewer backward passes (non-finite losses left out, or the leftover of a
        loader without a length) has its gradients scaled up to their mean.
        """
        backward_passes, self._window = self._window, 0
        size = window_size(self.step, plan.accumulation, self._stage_batches)
        if backward_passes < size:
            scale_gradients(plan.parameters, size / backward_passes)
        self.optimizers_step()

    def _inline_step(self, batch: BatchT, plan: StepPlan) -> None:
        """One training batch as the default hooks would run it, without calling them.

        Used when none of the per-batch hooks is overridden and the step is a plain one (see
        ``StepPlan.inline_steps``): it is ``fit_batch`` -> ``check_loss_isfinite`` ->
        ``optimizers_step`` -> ``check_gradients`` -> ``update_average`` with the calls (a fifth
        of a small model's step) taken out. tests/test_inline_steps.py checks that both ways end
        bit for bit in the same state.
        """
        with plan.train_context:
            outputs = self.compute_forward(batch, Stage.TRAIN)
            loss = self.compute_objectives(outputs, batch, Stage.TRAIN)
        value = _loss_value(loss)
        if not math.isfinite(value):
            self.check_loss_isfinite(loss)  # counts it, warns or raises NonFiniteLossError
            self._read_tensor = None  # it holds the loss's graph, which no backward freed
            self._skipped += 1
            return
        torch.autograd.backward(loss)
        if plan.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(plan.parameters, plan.clip_norm)
        for optimizer in plan.optimizers:
            optimizer.step()
        for optimizer in plan.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if plan.optimizers:
            self.optimizer_step += 1
        self._averaged += 1
        self.avg_train_loss = running_mean(self.avg_train_loss, value, self._averaged)

    def _current_plan(self) -> StepPlan:
        plan = self._plan
        if plan is None:
            plan = self._plan = self._make_plan()
        return plan

    def _make_plan(self) -> StepPlan:
        options = self.run_opts
        optimizers = tuple(self.optimizers_dict.values())
        inline_steps = (
            options.grad_accumulation_factor == 1
            and not self.scaler.is_enabled()
            # Under torch.distributed (DDP, FSDP2 or a group of the user's) every process must
            # take part in check_loss_isfinite's agreement, which the inline step skips.
            and not is_distributed()
            and not options.skip_nonfinite_grads
            and not any(self._overrides(hook) for hook in _PER_BATCH_HOOKS)
        )
        return StepPlan(
            accumulation=options.grad_accumulation_factor,
            train_context=autocast(self._device, options.precision),
            eval_context=autocast(self._device, options.eval_precision),
            step_limit=options.optimizer_step_limit,
            batch_limit=options.debug_batches if options.debug else None,
            clip_norm=options.max_grad_norm,
            skip_nonfinite_grads=options.skip_nonfinite_grads,
            parameters=(
                unique_parameters(optimizers) if optimizers else tuple(self.modules.parameters())
            ),
            call_batch_start=self._overrides("on_fit_batch_start"),
            call_batch_end=self._overrides("on_fit_batch_end"),
            call_freeze=self._overrides("freeze_optimizers"),
            optimizers=optimizers,
            inline_steps=inline_steps,
            checkpoint_steps=options.ckpt_interval_steps if self.checkpointer else 0,
            checkpoint_seconds=options.ckpt_interval_minutes * 60 if self.checkpointer else 0.0,
        )

    def _overrides(self, hook: str) -> bool:
        """Whether ``hook`` is not the base class's own (on this instance or its class)."""
        return hook in vars(self) or getattr(type(self), hook) is not getattr(Brain, hook)

    def _start_stage(self, stage: Stage, epoch: int | None) -> None:
        self._plan = None  # rebuilt for this stage, after on_stage_start's changes
        self._epoch = epoch
        # Also set by _end_stage, which a stage that raised did not reach.
        self.step = 0
        self._averaged = 0
        self._skipped = 0
        if stage is Stage.TRAIN:
            self.avg_train_loss = 0.0
        self.on_stage_start(stage, epoch)

    def _end_stage(self) -> None:
        self.step = 0
        self._averaged = 0
        self._skipped = 0
        self._stage_batches = None

    def _train_stage(self, loader: DataLoader[object], epoch: int, show: bool) -> None:
        self._machine.move(Phase.TRAIN)
        restored = self._take_restored(loader, epoch)
        # The generators as the epoch began: an interrupted epoch is re-entered from there, so
        # that on_stage_start and then iter(loader) (the shuffling, the workers' base seed)
        # draw what they drew in the interrupted run.
        # A loader make_dataloader did not build may have generators of its own, which
        # iter(loader) draws from too.
        generators = loader_generators(loader)
        if restored is None:
            self._epoch_rng = capture_rng()
            self._epoch_loader_rng = capture_generators(generators)
        else:
            self._epoch_rng = restored.state.epoch_rng
            if self._epoch_rng is not None:
                restore_rng(self._epoch_rng)
            self._epoch_loader_rng = restored.state.epoch_loader_rng
            if self._epoch_loader_rng is not None:
                restore_generators(generators, self._epoch_loader_rng, "the training loader")
        self._in_train_stage = True  # cleared when the loop ends (below) or fit does
        # Reset before on_stage_start, where a checkpoint saved must hold this epoch's counts.
        self.nonfinite_count = 0
        self._window = 0
        self._start_stage(Stage.TRAIN, epoch)
        self.modules.train()
        self.zero_grad()
        batches_done = 0 if restored is None else self._continue_epoch(restored)
        # The epoch's own length: a batch sampler may make its batches in set_epoch, as many
        # as that epoch's data gives. (batches_from is told: set_epoch runs once an epoch.)
        set_loader_epoch(loader, epoch)
        self._stage_batches = self._planned_batches(loader)
        if self._old_window is not None:
            self._step_old_window(*self._old_window)
        remaining = batches_from(
            loader,
            epoch=epoch,
            batches_done=batches_done,
            batch_size=None if restored is None else restored.state.batch_size,
            epoch_set=True,
        )
        # The loader yields what the recipe declares as its batch type.
        batches = cast(Iterable[BatchT], remaining)
        if restored is not None and batches_done:
            # (A state saved in on_stage_start, before the first batch, is reached again by
            # running on_stage_start and iter(loader) from the epoch's generators above.)
            restore_rng(restored.state.rng)
            restore_generators(generators, restored.state.loader_rng, "the training loader")
        stop = self._stop
        agreement = self._agreement
        with ExitStack() as stack:
            profiler = self._enter_profiler(stack)
            progress = stack.enter_context(
                StageProgress(
                    batches,
                    enabled=show,
                    description=f"epoch {epoch} train",
                    total=self._stage_batches,
                    colour="green" if self.tqdm_colored_bar else None,
                    initial=batches_done,
                )
            )
            stack.callback(setattr, self, "_in_train_stage", False)  # however the loop ends
            # The batches' iterator is dropped however the loop ends: a failed fit's traceback
            # keeps this frame, and the iterator's loader workers would otherwise live as long
            # as the error is kept (in a notebook's sys.last_value, say).
            fetching = [iter(progress)]
            stack.callback(fetching.clear)
            stack.callback(remaining.close)
            while True:
                try:
                    batch = next(fetching[0])
                except StopIteration:
                    break
                except Exception as error:
                    # The state after the last batch trained is whole: the stop saves it.
                    self._stop_if_fetch_failed_for_it(error, "training", save=True)
                    raise
                plan = self._plan or self._current_plan()
                if plan.step_limit is not None and self.optimizer_step >= plan.step_limit:
                    break
                self.step += 1
                if plan.inline_steps:
                    self._inline_step(self.move_batch(batch), plan)
                else:
                    self._read_tensor = None  # a loss is read once per batch, not across batches
                    loss = self.fit_batch(self.move_batch(batch))
                    self.avg_train_loss = self._fold_into_mean(loss, self.avg_train_loss)
                if show:
                    progress.show_loss("train_loss", self.avg_train_loss)
                if profiler is not None:
                    profiler.step()
                saved = False  # an interval checkpoint after this batch (the stop needs none)
                if agreement is None:
                    if (plan.checkpoint_steps or plan.checkpoint_seconds) and self._checkpoint_due(
                        plan
                    ):
                        saved = self._save_intra_epoch_ckpt(stopping=stop.signal is not None)
                    if stop.signal is not None:
                        self._stop_on_signal(stop.signal, save=True, saved=saved)
                else:
                    # Every process saves and stops after the same batch (see _stop_agreement).
                    agreed = agreement.after_batch(
                        save_due=bool(plan.checkpoint_seconds) and self._checkpoint_due(plan)
                    )
                    if agreed.save or (plan.checkpoint_steps and self._checkpoint_due(plan)):
                        saved = self._save_intra_epoch_ckpt(stopping=agreed.signal is not None)
                    if agreed.signal is not None:
                        self._stop_on_signal(agreed.signal, save=True, saved=saved)
                if plan.batch_limit is not None and self.step >= plan.batch_limit:
                    break
            # The last batch's exchange: a process asked to stop during it stops every one here
            # (a time-based checkpoint it found due is left to the next epoch).
            if agreement is not None and (signum := agreement.settle().signal) is not None:
                self._stop_on_signal(signum, save=True)
        if self._window > 0:
            logger.info(
                "epoch %d ended with %d accumulated batches: stepping them",
                epoch,
                self._window,
            )
            if self._ddp_modules:
                # None of its backward passes was known to end a window (a loader without a
                # length, or one yielding fewer batches than its length): all ran under
                # no_sync, so their gradients are averaged over the processes here.
                self._sync_gradients()
            self._close_window(self._plan or self._current_plan())
        self.zero_grad(set_to_none=True)
        train_loss = self._stage_loss(self.avg_train_loss, Stage.TRAIN)
        self._valid_pending = self._valid_loader is not None
        self._valid_rng = None
        self.on_stage_end(Stage.TRAIN, train_loss, epoch)
        self.avg_train_loss = 0.0
        self._end_stage()

    def _save_intra_epoch_ckpt(self, *, stopping: bool = False) -> bool:
        """Save a checkpoint between two training batches, replacing the previous such one.

        Intra-epoch checkpoints carry ``meta={INTRA_EPOCH_CKPT_FLAG: True}`` and
        ``end_of_epoch=False``; they only ever replace each other, so the end-of-epoch
        checkpoints your recipe keeps are not touched. Returns whether one was saved (not
        without a checkpointer). ``stopping``: the run stops after it (a signal), and the
        folder a restart resumes from is logged (the checkpointer logs these saves at DEBUG).
        """
        checkpointer = self.checkpointer
        self._last_checkpoint_time = time.monotonic()
        if checkpointer is None:
            return False
        self._machine.move(Phase.CHECKPOINT)
        saved = checkpointer.save_and_keep_only(
            meta={INTRA_EPOCH_CKPT_FLAG: True},
            end_of_epoch=False,
            num_to_keep=1,
            ckpt_predicate=_is_intra_epoch,
        )
        self._machine.move(Phase.TRAIN)
        if stopping:
            logger.info("saved a checkpoint to stop: %s", getattr(saved, "path", saved))
        return True

    def _checkpoint_due(self, plan: StepPlan) -> bool:
        if plan.checkpoint_steps:
            return self.step % plan.checkpoint_steps == 0
        return time.monotonic() - self._last_checkpoint_time >= plan.checkpoint_seconds

    def _agree_on_stops(self) -> StopAgreement | None:
        """How the processes agree on stops and time-based checkpoints in this fit, if needed.

        Only under torch.distributed, with signals handled or checkpoints due by the clock.
        """
        timed = self.checkpointer is not None and self.ckpt_interval_minutes > 0
        if not ((self.stop_on_signals or timed) and is_distributed()):
            return None
        group = self._control_group
        if group is None:
            group = control_group()
            # A gloo group of its own is kept for the next fit (making one is collective); the
            # default group is not held: a brain kept alive by an error's traceback would keep
            # it to the interpreter's last moments, when destroying it can abort the process.
            if group is not dist.group.WORLD:
                self._control_group = group
        return StopAgreement(self._stop, group)

    def _stop_if_asked_after_training(self) -> None:
        """Raise TrainingInterruptedError for a signal that came too late for a batch to see.

        Training is over (it arrived during the last validation, or in a hook after it), so
        there is nothing left to checkpoint; the run still leaves as it was asked to.
        """
        agreement = self._agreement
        signum = self._stop.signal if agreement is None else agreement.now()
        if signum is not None:
            self._stop_on_signal(signum, save=False)

    def _stop_if_fetch_failed_for_it(self, error: Exception, loader: str, *, save: bool) -> None:
        """Stop as asked (see ``_stop_on_signal``) if a stop signal came before fetching failed.

        The signal reached the loader's workers too (a job's whole process group is
        signalled), and a worker it ended (one still starting, or a ``DataLoader`` of yours)
        failed the fetch: the run stops as it was asked to, not with the loader's error. Not
        under torch.distributed, where the processes agree on stops batch by batch and one
        that cannot fetch its batch cannot take part: the fetch's error is raised there.
        """
        signum = self._stop.signal
        if signum is None or self._agreement is not None:
            return
        logger.warning("the %s loader failed after %s: %s", loader, signum, error)
        self._stop_on_signal(signum, save=save)

    def _stop_on_signal(self, signum: int, *, save: bool, saved: bool = False) -> NoReturn:
        """Stop ``fit`` for signal ``signum``, with a checkpoint first if ``save`` (and one can).

        Saved in training, after a batch; not in validation (see ``_evaluate_loader``). When
        ``saved``, a checkpoint of this very moment was just saved: it is not saved again.
        """
        if save and not saved:
            saved = self._save_intra_epoch_ckpt(stopping=True)
        failure: Exception | None = None
        if saved and isinstance(self.checkpointer, Checkpointer):
            # Committing in the background: saved means committed. (Every process is here:
            # the stop, and so this save, is agreed under torch.distributed.)
            try:
                self.checkpointer.wait()
            except Warning:
                # A filter made a warning of its deletions an error, as it would be raised by
                # the save in the default mode: it was committed, and this is what leaves.
                raise
            except Exception as error:
                failure, saved = error, False
        stop = TrainingInterruptedError(signum, checkpoint_saved=saved)
        logger.warning("%s", stop)
        if failure is not None:
            stop.add_note(
                f"(its checkpoint was not committed: {type(failure).__name__}: {failure})"
            )
            raise stop from failure
        raise stop

    def _record_run(self) -> RunRecord:
        """The run state to save now, with the gradients held mid-epoch (see below)."""
        train, valid = self._train_loader, self._valid_loader
        sampler = None if train is None else find_resumable_sampler(train)
        mid_epoch = self._in_train_stage
        avg_train_loss, averaged, skipped = self.avg_train_loss, self._averaged, self._skipped
        pending = self._loss_not_averaged
        if pending is not None:
            # Saved from on_fit_batch_end: the batch is done but for update_average, which the
            # loop calls next and a resumed run would not. Fold the loss in as it does.
            value = self._read_value if pending is self._read_tensor else _loss_value(pending)
            if math.isfinite(value):
                averaged += 1
                avg_train_loss = running_mean(avg_train_loss, value, averaged)
            else:
                skipped += 1
        window = self._window if mid_epoch else 0
        valid_pending = self._valid_pending and not mid_epoch
        state = RunState(
            phase=self.phase.name,
            epoch=self._epoch,
            mid_epoch=mid_epoch,
            valid_pending=valid_pending,
            progress=TrainingProgress(
                step=self.step,
                optimizer_step=self.optimizer_step,
                avg_train_loss=avg_train_loss,
                averaged=averaged,
                nonfinite_count=self.nonfinite_count,
            ),
            skipped=skipped,
            window=window,
            rng=capture_rng(),
            epoch_rng=self._epoch_rng if mid_epoch else self._valid_rng if valid_pending else None,
            sampler=None
            if sampler is None
            else SamplerState(seed=sampler.seed, epoch=sampler.epoch),
            train_loader_seed=None if train is None else loader_seed(train),
            valid_loader_seed=None if valid is None else loader_seed(valid),
            batch_size=None if train is None else loader_batch_size(train),
            num_workers=None if train is None else train.num_workers,
            dataset_size=None if train is None else _dataset_size(train),
            accumulation=self.grad_accumulation_factor,
            counter=self._counter_name(),
            loader_rng=() if train is None else capture_generators(loader_generators(train)),
            epoch_loader_rng=self._epoch_loader_rng if mid_epoch else None,
            valid_loader_rng=() if valid is None else capture_generators(loader_generators(valid)),
        )
        return RunRecord(state, self._held_gradients())

    def _held_gradients(self) -> list[Tensor | None]:
        """The gradients the parameters hold now, on the CPU; ``[]`` when they hold none.

        Those of an open accumulation window, and those an optimizer that freeze_optimizers
        left out of a step keeps until it steps (across an epoch's end too).
        """
        held = [parameter.grad for parameter in self._current_plan().parameters]
        if self.fsdp and is_distributed():
            # Sharded gradients are saved whole, as every tensor of a checkpoint is (a
            # collective: every process saves the run state, in the same order).
            from typedbrain._sharded_state import gathered

            held = cast(list[Tensor | None], gathered(held))
        if all(grad is None for grad in held):
            return []
        return [None if grad is None else grad.detach().cpu().clone() for grad in held]

    def _restore_gradients(self, gradients: list[Tensor | None]) -> None:
        """Give the parameters the gradients :meth:`_held_gradients` took (none: nothing)."""
        if not gradients:
            return
        parameters = self._current_plan().parameters
        if len(gradients) != len(parameters):
            raise CheckpointError(
                f"the checkpoint holds partial gradients for {len(gradients)} parameters "
                f"and the optimizers have {len(parameters)}: the model or optimizers differ "
                "from the run that saved it"
            )
        for parameter, gradient in zip(parameters, gradients, strict=True):
            if gradient is not None and gradient.shape != parameter.shape:
                raise CheckpointError(
                    f"a saved partial gradient has shape {tuple(gradient.shape)} where the "
                    f"parameter has {tuple(parameter.shape)}"
                )
        if self.fsdp and is_distributed():
            # Saved whole: each process takes its shard (a collective, in parameter order).
            from typedbrain._sharded_state import sharded_as
        else:
            sharded_as = _on_device_of
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = None if gradient is None else sharded_as(gradient, parameter)

    def _recovered(self, record: RunRecord) -> None:
        """Take a recovered run state: the counters now, the rest when training starts.

        The generators of a state taken between epochs (or stages) are put back now, and again
        as the next stage starts (see ``_take_restored``).
        """
        self.optimizer_step = record.state.progress.optimizer_step
        self._restored = record
        if not record.state.mid_epoch or self.phase is Phase.TEST:
            # Taken between epochs (or stages): the run goes on from here, with these numbers.
            # Taken mid-epoch, they are put back once the training stage re-entered the epoch
            # (see _train_stage), which evaluate (in TEST) never reaches: it takes them now.
            restore_rng(record.state.rng)

    def _take_restored(self, loader: DataLoader[object], epoch: int) -> RunRecord | None:
        """The recovered run state to continue this epoch from, if it was taken in it.

        The first training stage after a recovery also gives the loader's resumable sampler
        its saved seed, and the loaders ``make_dataloader`` built the seeds they had, so that
        every later epoch is ordered and augmented as in the original run.
        """
        restored, self._restored = self._restored, None
        if restored is None:
            return None
        state = restored.state
        if state.num_workers is not None and (state.num_workers > 0) != (loader.num_workers > 0):
            warn(
                f"the training loader had num_workers={state.num_workers} when the checkpoint "
                f"was taken and has {loader.num_workers} now: randomness drawn while loading "
                "(augmentation in __getitem__, say) comes from per-item seeds in workers and "
                "from the global generators without them, so the run will not continue "
                "exactly as the interrupted one would have",
                ResumeWarning,
            )
        sampler = find_resumable_sampler(loader)
        if state.sampler is not None and sampler is not None:
            sampler.load_state_dict({"seed": state.sampler.seed, "epoch": state.sampler.epoch})
        # Loaders built with seed=None drew their seeds from the global generator, which an
        # unseeded script's new process draws differently: the run goes on with the saved ones.
        for built, seed in (
            (loader, state.train_loader_seed),
            (self._valid_loader, state.valid_loader_seed),
        ):
            if built is not None and seed is not None:
                set_loader_seed(built, seed)
        if self._valid_loader is not None:
            # Nothing draws from them until the next validation, which draws as it would have.
            restore_generators(
                loader_generators(self._valid_loader),
                state.valid_loader_rng,
                "the validation loader",
            )
        if not state.mid_epoch:
            # Taken between epochs: the next stage draws from here (the recovery put these
            # generators back already, but what on_fit_start did after it, or anything else
            # since, may have drawn from them), and the next epoch's iter(loader) too; an
            # optimizer freeze_optimizers left out of the last steps still holds its gradients.
            restore_rng(state.rng)
            restore_generators(loader_generators(loader), state.loader_rng, "the training loader")
            self._restore_gradients(restored.gradients)
        pending_validation = state.valid_pending and self._valid_loader is not None
        if not (state.mid_epoch or pending_validation):
            return None
        if state.epoch != epoch:
            where = (
                f"after batch {state.progress.step}"
                if state.mid_epoch
                else "before its validation ended"
            )
            warn(
                f"the checkpoint was taken in epoch {state.epoch} {where}, but the epoch "
                f"counter started epoch {epoch}: the interrupted epoch is not continued (use "
                "an EpochCounter, which a checkpointer resumes, to continue it exactly)",
                ResumeWarning,
            )
            return None
        return restored if state.mid_epoch else None

    def _continue_epoch(self, restored: RunRecord) -> int:
        """Put the counters and partial gradients of an interrupted epoch back."""
        state = restored.state
        progress = state.progress
        train = self._train_loader
        size = None if train is None else _dataset_size(train)
        if state.dataset_size is not None and size is not None and size != state.dataset_size:
            warn(
                f"the training set had {state.dataset_size} items when the checkpoint was "
                f"taken in epoch {state.epoch} and has {size} now: the epoch continues after "
                f"batch {progress.step} in an order made for {size} items, so some items are "
                "trained twice this epoch and others not at all",
                ResumeWarning,
            )
        self.step = progress.step
        self.avg_train_loss = progress.avg_train_loss
        self._averaged = progress.averaged
        self.nonfinite_count = progress.nonfinite_count
        self._skipped = state.skipped
        self._window = state.window
        self._restore_gradients(restored.gradients)
        saved_factor = state.accumulation
        if saved_factor is not None and saved_factor != self.grad_accumulation_factor:
            if state.window and is_distributed():
                # Its gradients are each process's own (the window's sync had not come): a
                # step now would leave the replicas apart. Every process raises here alike.
                raise ConfigurationError(
                    f"the checkpoint was taken {state.window} batches into an accumulation "
                    f"window of grad_accumulation_factor={saved_factor}, which is "
                    f"{self.grad_accumulation_factor} now: under torch.distributed the factor "
                    "cannot change in the middle of a window; restart with "
                    f"grad_accumulation_factor={saved_factor} (change it at an epoch's end)"
                )
            window = (
                f"; the {state.window} batches of its open window are stepped now, with their "
                "mean gradient"
                if state.window
                else ""
            )
            warn(
                f"the checkpoint was taken with grad_accumulation_factor={saved_factor}, which "
                f"is {self.grad_accumulation_factor} now: epoch {state.epoch} continues after "
                f"batch {progress.step} with the new factor{window}, and the run will not "
                "continue exactly as the interrupted one would have",
                ResumeWarning,
            )
            if state.window:
                # Stepped once the epoch's length is known (its last window may be shorter).
                self._window = 0
                self._old_window = (saved_factor, state.window)
        logger.info("continuing epoch %s after batch %d", state.epoch, progress.step)
        return progress.step

    def _warn_about_fit_setup(self) -> None:
        """Warn, after ``on_fit_start``, about settings that will silently do nothing.

        And about a recovery that left something out: an object registered with the
        checkpointer after it recovered (its saved state was not loaded), or an epoch counter
        that is not registered (its epochs would be trained again).
        """
        self._warn_about_late_recoverables()
        self._warn_about_unregistered_counter()
        if self.opt_class is not None and not self.optimizers_dict:
            warn(
                "fit() trains with no optimizer: opt_class was given, but "
                "optimizers_dict is empty after on_fit_start(), so no parameter will "
                "change while optimizer_step still counts steps (does an on_fit_start "
                "override skip super().on_fit_start(), or an init_optimizers override "
                "not fill optimizers_dict?)",
                UserWarning,
            )
        if self.checkpointer is None and (self.ckpt_interval_steps or self.ckpt_interval_minutes):
            interval = (
                f"ckpt_interval_steps={self.ckpt_interval_steps}"
                if self.ckpt_interval_steps
                else f"ckpt_interval_minutes={self.ckpt_interval_minutes}"
            )
            warn(
                f"{interval} saves nothing: this brain has no checkpointer (pass "
                "checkpointer=sb.Checkpointer(folder, recoverables) to Brain())",
                UserWarning,
            )

    def _warn_about_late_recoverables(self) -> None:
        late = (
            added_after_load(self.checkpointer)
            if isinstance(self.checkpointer, Checkpointer)
            else None
        )
        if late is None:
            return
        checkpoint, names = late
        listed = ", ".join(repr(name) for name in names)
        warn(
            f"{listed} registered with the checkpointer after checkpoint {checkpoint.path} was "
            "recovered, which holds their state: it was not loaded into them, so the run does "
            "not continue as the interrupted one. Register them before the recovery: build "
            "schedulers and other objects of the optimizer in an init_optimizers() override "
            "(called by on_fit_start() before it recovers), or before fit()",
            ResumeWarning,
        )

    def _warn_about_unregistered_counter(self) -> None:
        restored, counter = self._restored, self._epoch_counter
        if restored is None or not isinstance(counter, EpochCounter):
            return
        state = restored.state
        if state.epoch is None or counter.current >= state.epoch or self._counter_name():
            return
        recoverables = getattr(self.checkpointer, "recoverables", None)
        if isinstance(recoverables, Mapping) and state.counter in recoverables:
            return  # another fit's counter (a recipe's other training stage): its own business
        warn(
            f"fit()'s epoch counter is not registered with the checkpointer: it starts at epoch "
            f"{counter.current + 1}, while the checkpoint it recovered was saved in epoch "
            f"{state.epoch}, so those epochs are trained again. Register the counter to "
            "continue the run (Checkpointer(folder, {'counter': counter, ...}), or "
            "checkpointer.add_recoverable('counter', counter))",
            ResumeWarning,
        )

    def _check_processes_agree(self, train_loader: DataLoader[object]) -> None:
        """Refuse to train when the processes disagree on what an epoch is. Collective.

        Under torch.distributed every process must run as many training batches per epoch
        and step after as many of them, or one waits in a gradient all-reduce that another
        never starts; a data set sharded by the brain must also be the same on every process.
        One exchange, when ``fit`` starts, compares them.

        Raises:
            ConfigurationError: on every process, naming each process's value.
        """
        if not is_distributed():
            return
        sampler = find_resumable_sampler(train_loader)
        sharded = sampler is not None and sampler.world_size > 1
        own: dict[str, object] = {
            "training examples": _dataset_size(train_loader) if sharded else None,
            "training batches per epoch": loader_length(train_loader),
            "grad_accumulation_factor": self.grad_accumulation_factor,
        }
        every = all_gather_object(own)
        for what in own:
            values = [entry[what] for entry in every]
            if len(set(map(repr, values))) > 1:
                each = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))
                raise ConfigurationError(
                    f"fit(): the processes disagree on the {what} ({each}): every process "
                    "must train on the same data set, with the same loader options and run "
                    "options, or they fall out of step in the gradient all-reduce"
                )

    def _warn_about_another_process_count(self) -> None:
        """Warn when fit continues from a run state saved by another number of processes."""
        if self._restored is not None:
            message = self._restored.layout_warning(get_world_size(), get_rank())
            if message is not None:
                warn(message, ResumeWarning)

    def _agreed_epochs(self, epochs: Iterable[int]) -> Iterator[int]:
        """``epochs``, each checked against every other process's before it starts. Collective.

        Every process must run the same epochs: one that stops early (an early-stopping
        decision taken from its own metric, say) would leave the others waiting in the next
        epoch's collectives. Each epoch's number, or that none is left, is exchanged once before
        the epoch.

        Raises:
            DistributedError: on every process, when they disagree, naming each one's epoch.
        """
        if not is_distributed():
            yield from epochs
            return
        remaining = iter(epochs)
        while True:
            epoch = next(remaining, None)
            numbers = all_gather_object(epoch)
            if len(set(numbers)) > 1:
                each = ", ".join(
                    f"rank {rank}: {'no more epochs' if number is None else f'epoch {number}'}"
                    for rank, number in enumerate(numbers)
                )
                raise DistributedError(
                    f"the processes disagree on the next epoch ({each}): every process must "
                    "run the same epochs; a stopping decision must be the same on all of them "
                    "(reduce a per-process metric with all_reduce_sum before deciding on it)",
                    rank=get_rank(),
                    operation="fit",
                )
            if epoch is None:
                return
            yield epoch

    def _reenter_interrupted_epoch(self, epoch_counter: Iterable[int]) -> bool:
        """Have an :class:`EpochCounter` yield again the epoch a checkpoint interrupted.

        Interrupted: in its training stage, or (with a validation set) before its validation
        stage ended. Returns whether this fit has such an epoch to finish.
        """
        restored = self._restored
        if restored is None:
            return False
        state = restored.state
        if not (state.mid_epoch or (state.valid_pending and self._valid_loader is not None)):
            return False
        if state.counter is not None and state.counter != self._counter_name():
            # Another fit's epoch (a recipe's other training stage, over the counter
            # registered as state.counter): that fit recovers it and re-enters it.
            logger.info(
                "the checkpoint interrupted an epoch of the epoch counter %r, not this fit's: "
                "it is left to the fit over that counter",
                state.counter,
            )
            self._restored = None
            return False
        epoch = restored.state.epoch
        if isinstance(epoch_counter, EpochCounter) and epoch_counter.current == epoch:
            if epoch > epoch_counter.limit:
                # A run restarted with a lower limit, to stop it early: the counter is past it.
                logger.warning(
                    "the checkpoint interrupted epoch %s, beyond this epoch counter's limit of "
                    "%s: that epoch is left unfinished",
                    epoch,
                    epoch_counter.limit,
                )
                self._restored = None
                return False
            epoch_counter.current -= 1
        return True

    def _counter_name(self) -> str | None:
        """The name the running fit's epoch counter is registered under, if it is."""
        counter = self._epoch_counter
        recoverables = getattr(self.checkpointer, "recoverables", None)
        if counter is None or not isinstance(recoverables, Mapping):
            return None
        return next((name for name, obj in recoverables.items() if obj is counter), None)

    def _valid_stage(self, loader: DataLoader[object], epoch: int, show: bool) -> None:
        self._machine.move(Phase.VALID)
        self._valid_rng = capture_rng() if self._valid_pending else None
        self._start_stage(Stage.VALID, epoch)
        self.modules.eval()
        set_loader_epoch(loader, epoch)  # a shuffled validation set is shuffled each epoch
        avg_valid_loss = self._evaluate_loader(loader, Stage.VALID, show, f"epoch {epoch} valid")
        self._valid_pending = False  # a checkpoint saved from here on ends the epoch
        self.on_stage_end(Stage.VALID, avg_valid_loss, epoch)
        self._end_stage()

    def _resume_at_validation(self, loader: DataLoader[object], epoch: int) -> bool:
        """Take a recovered state saved before ``epoch``'s validation ended; ``True`` if taken.

        The epoch's training had ended: the brain takes the loaders' seeds, the counters the
        training stage left and the generators as validation began (when it had), and the
        caller runs the validation stage again without training.
        """
        restored = self._restored
        if restored is None or not restored.state.valid_pending or self._valid_loader is None:
            return False
        state = restored.state
        if state.epoch != epoch:
            return False  # _take_restored (in the training stage) warns
        self._take_restored(loader, epoch)  # the data order's seeds; nothing more to take
        self._epoch = epoch
        self._valid_pending = True  # a state saved again before validation ends re-enters too
        self.nonfinite_count = state.progress.nonfinite_count
        if state.epoch_rng is not None:
            restore_rng(state.epoch_rng)
        # The phase the interrupted run validated from (no training hook runs).
        self._machine.move(Phase.TRAIN)
        logger.info("epoch %s: its training had ended; validating it again", epoch)
        return True

    def _evaluate_loader(
        self, loader: DataLoader[object], stage: Stage, show: bool, description: str
    ) -> float:
        avg_loss = 0.0
        with (
            torch.no_grad(),
            # The processes hold different numbers of batches, none for some: they synchronise
            # here, once, and no forward pass of the stage makes a collective.
            collective_free_forwards(self.modules),
            StageProgress(
                loader,
                enabled=show,
                description=description,
                total=self._planned_batches(loader),
                colour="blue" if self.tqdm_colored_bar else None,
            ) as batches,
            ExitStack() as stack,
        ):
            # (The batches' iterator is dropped however the loop ends, as in _train_stage.)
            fetching = [iter(batches)]
            stack.callback(fetching.clear)
            while True:
                try:
                    batch = next(fetching[0])
                except StopIteration:
                    break
                except Exception as error:
                    if stage is Stage.VALID:
                        self._stop_if_fetch_failed_for_it(error, "validation", save=False)
                    raise
                self.step += 1
                self._read_tensor = None
                loss = self.evaluate_batch(self.move_batch(batch), stage)
                avg_loss = self._fold_into_mean(loss, avg_loss)
                if show:
                    batches.show_loss(f"{stage.value}_loss", avg_loss)
                # Under torch.distributed the processes hold different numbers of validation
                # batches and cannot agree batch by batch: the next training batch acts on it.
                if (
                    self._stop.signal is not None
                    and stage is Stage.VALID
                    and self._agreement is None
                ):
                    # No checkpoint: a recipe keeps what it logs at the end of validation
                    # (the train loss, say) in attributes no checkpoint holds, so the restart
                    # goes back to the last checkpoint and trains this epoch again.
                    self._stop_on_signal(self._stop.signal, save=False)
                batch_limit = self._current_plan().batch_limit
                if batch_limit is not None and self.step >= batch_limit:
                    break
        if self._skipped:
            logger.warning(
                "%s: %d non-finite losses were left out of the mean loss",
                stage.name,
                self._skipped,
            )
        return self._stage_loss(avg_loss, stage)

    def _stage_loss(self, mean: float, stage: Stage) -> float:
        """The loss ``on_stage_end`` gets: the stage's mean over every process's batches.

        NaN when no loss of the stage was finite, or the stage had no batch at all (0.0 would
        look like the best loss there is); the empty stage also warns. Collective under
        torch.distributed.
        """
        averaged, skipped = self._averaged, self._skipped
        if is_distributed():  # every rank ran its own shard: the mean is over them all
            totals = all_reduce_sum(
                torch.tensor(
                    [mean * averaged, float(averaged), float(skipped)], dtype=torch.float64
                )
            )
            total, counted, left_out = totals.tolist()
            mean = total / counted if counted else 0.0
            averaged, skipped = int(counted), int(left_out)
        if not averaged and not skipped:
            warn(
                f"the {stage.name} stage had no batches, so its loss is NaN: is its data set "
                "empty (or smaller than one batch, with drop_last)?",
                UserWarning,
            )
        return mean if averaged else math.nan

    def _enter_profiler(self, stack: ExitStack) -> torch.profiler.profile | None:
        if not self.profile_training:
            return None
        profiler = torch.profiler.profile(
            schedule=torch.profiler.schedule(
                wait=0, warmup=self.profile_warmup, active=self.profile_steps, repeat=1
            ),
        )
        self.profiler = stack.enter_context(profiler)
        stack.callback(self._log_profile, profiler)
        return profiler

    @staticmethod
    def _log_profile(profiler: torch.profiler.profile) -> None:
        if logger.isEnabledFor(logging.INFO):
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            logger.info("training profile:\n%s", table)


def _declared_hparams(cls: type[object], bound: Mapping[object, object] | None = None) -> object:
    """The hparams type argument ``cls`` gives ``Brain``, or ``None`` if it names none.

    Type variables are followed through generic base classes: with
    ``class Base(Brain[B, P, H], Generic[H])`` and ``class Child(Base[Settings])``, ``Child``
    declares ``Settings``; a class that leaves it open (``Base`` itself) gives the type
    variable. ``bound`` maps the type variables of ``cls`` to their arguments.
    """
    for base in cls.__dict__.get("__orig_bases__", cls.__bases__):
        origin = get_origin(base) or base
        arguments = tuple((bound or {}).get(argument, argument) for argument in get_args(base))
        if origin is Brain:
            return arguments[2] if len(arguments) == 3 else None
        if isinstance(origin, type) and issubclass(origin, Brain):
            parameters = getattr(origin, "__parameters__", ())
            found = _declared_hparams(origin, dict(zip(parameters, arguments, strict=False)))
            if found is not None:
                return found
    return None


def _keeps_given_hparams(cls: type[object]) -> bool:
    """Whether ``cls``, open in its hparams type, keeps the hparams it is given.

    mypy infers that type from what a constructor of the brain's own is given when that
    constructor takes ``hparams`` typed by its class's type variable, and the brain's own
    class declares its generic bases (``class Open(Brain[B, P, H], Generic[H])``,
    ``class Child(Open[H2])``). A bare
    subclass (``class Child(Open)``) is ``Open[Hparams]`` to mypy (the type variable's
    default): its mapping becomes an ``Hparams``, as through ``Brain``'s own constructor,
    which SpeechBrain-style code reads by attribute.
    """
    if "__orig_bases__" not in vars(cls):
        return False
    for klass in cls.__mro__:
        if klass is Brain or not issubclass(klass, Brain):
            return False
        init = vars(klass).get("__init__")
        if init is not None:
            # The constructor's own type variable (its class's): a subclass may re-parameterise
            # it with another (class Child(Open[H2])).
            own = _declared_hparams(klass)
            if not isinstance(own, TypeVarType):
                return False
            parameter = inspect.signature(init).parameters.get("hparams")
            annotation = None if parameter is None else parameter.annotation
            if isinstance(annotation, str):  # postponed evaluation: "H" or "tb.HparamsT"
                return annotation.rpartition(".")[2] == own.__name__
            return annotation is own
    return False


def _dataset_size(loader: DataLoader[object]) -> int | None:
    """The length of the loader's dataset, when it has one."""
    dataset: object = loader.dataset
    if not isinstance(dataset, Sized):
        return None
    try:
        return len(dataset)
    except (TypeError, NotImplementedError):  # a __len__ that declines: no length to record
        return None


def _named_modules(modules: object) -> dict[str, torch.nn.Module | None]:
    """The constructor's ``modules`` as a dict, with a clear error for anything else.

    What ``torch.nn.ModuleDict`` takes: a mapping, or (name, module) pairs; a module may be
    ``None`` (an optional one, absent).
    """
    if modules is None:
        return {}
    if isinstance(modules, torch.nn.ModuleDict):
        return dict(modules.items())
    if isinstance(modules, torch.nn.Module) or not isinstance(modules, Mapping | list | tuple):
        raise ConfigurationError(
            "modules must map names to torch modules, such as {'model': model}, not "
            f"{type(modules).__name__}"
        )
    pairs = list(modules.items()) if isinstance(modules, Mapping) else list(modules)
    named: dict[str, torch.nn.Module | None] = {}
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ConfigurationError(
                "modules must map names to torch modules: a list of them holds (name, module) "
                f"pairs, not {type(pair).__name__} {pair!r:.60}"
            )
        name, module = pair
        if not isinstance(name, str) or not (module is None or isinstance(module, torch.nn.Module)):
            raise ConfigurationError(
                f"modules must map names to torch modules: modules[{name!r}] is "
                f"{type(module).__name__}, not a torch.nn.Module"
            )
        _check_module_name(name)
        named[name] = module
    return named


def _check_module_name(name: str) -> None:
    """Refuse a module name ``torch.nn.ModuleDict`` would refuse, naming the key."""
    if name == "" or "." in name:
        suggestion = name.replace(".", "_") or "model"
        raise ConfigurationError(
            f"modules must map names to torch modules: modules[{name!r}] cannot be named so, as "
            "torch.nn.ModuleDict refuses an empty name and a name with a '.' in it; use "
            f"{suggestion!r}, say"
        )
    if hasattr(_EMPTY_MODULE_DICT, name):
        raise ConfigurationError(
            f"modules must map names to torch modules: modules[{name!r}] cannot be named so, as "
            f"torch.nn.ModuleDict has an attribute {name!r} of its own; rename the module"
        )


_EMPTY_MODULE_DICT: Final = torch.nn.ModuleDict()
"""For the names a ``ModuleDict`` holds itself (``keys``, ``training``, ``forward``...)."""


def _check_opt_class(opt_class: object) -> None:
    if opt_class is not None and not callable(opt_class):
        raise ConfigurationError(
            f"opt_class must be callable (parameters -> optimizer), such as "
            f"torch.optim.Adam or a lambda, not {type(opt_class).__name__} {opt_class!r}"
        )


def _check_checkpointer(checkpointer: object) -> None:
    if isinstance(checkpointer, type):  # its methods are callable, unbound, on the class too
        raise ConfigurationError(
            "checkpointer must be a Checkpointer (sb.Checkpointer(folder, recoverables)), not "
            f"the class {checkpointer.__qualname__} itself: build one and pass it"
        )
    if checkpointer is not None and not all(
        callable(getattr(checkpointer, name, None))
        for name in ("add_recoverable", "recover_if_possible", "save_and_keep_only")
    ):
        raise ConfigurationError(
            "checkpointer must be a Checkpointer (sb.Checkpointer(folder, recoverables)), "
            f"not {type(checkpointer).__name__} {checkpointer!r}"
        )


def _check_fit_arguments(epoch_counter: object) -> None:
    """Refuse an ``epoch_counter`` of the wrong kind before anything runs."""
    # A str is iterable (its characters), so "10" would fail only at its first epoch number.
    if isinstance(epoch_counter, str | bytes | bytearray) or not isinstance(
        epoch_counter, Iterable
    ):
        raise ConfigurationError(
            "fit(): epoch_counter must yield the epoch numbers (range(1, 11), or an "
            f"EpochCounter), not {type(epoch_counter).__name__} {epoch_counter!r:.80}"
        )


def _check_data_set(data: object, name: str) -> None:
    """Refuse a data set that neither a ``DataLoader`` nor ``make_dataloader`` can read.

    Checked before anything runs: a bad validation set would otherwise fail only when its
    loader is first read, after a whole training epoch. A str is a Sequence, so a file name
    type-checks as a dataset (of characters); a dict, a generator or a number would fail only
    when the loader is first read.
    """
    if not isinstance(data, DataLoader):
        check_data_source(data, name, loader_too=True)


def _loss_value(loss: object) -> float:
    """The loss as a Python float, with a clear error when it is not a one-element tensor.

    Only the shape is checked: an error reading the value (a CUDA kernel's asynchronous error
    surfaces at this first synchronisation) is the device's, and goes on as it is.
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise _not_a_loss(loss)
    return float(loss.item())


def _not_a_loss(loss: object) -> HookContractError:
    shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
    return HookContractError(
        f"compute_objectives() must return a one-element tensor (the loss), got {shape}"
    )


# Hooks the loop calls with keyword arguments (as SpeechBrain does), and those keywords.
_KEYWORD_HOOKS: Final = {
    "on_evaluate_start": ("max_key", "min_key"),
    "zero_grad": ("set_to_none",),
}


def _check_hooks_take_their_keywords(cls: type[object]) -> None:
    """Refuse an override that renamed a parameter the loop passes by name.

    mypy does not compare the names of overriding parameters, and the loop would otherwise
    fail only when it calls the hook (``on_evaluate_start``: after the whole training).

    Raises:
        HookContractError: naming the hook and the keywords it must accept.
    """
    for hook, keywords in _KEYWORD_HOOKS.items():
        method = getattr(cls, hook)
        if method is getattr(Brain, hook):
            continue
        try:
            inspect.signature(method).bind(None, **dict.fromkeys(keywords))
        except TypeError:
            raise HookContractError(
                f"{cls.__qualname__}.{hook} must accept {', '.join(keywords)} by name: the loop "
                f"calls it as {hook}({', '.join(f'{key}=...' for key in keywords)})"
            ) from None


def _on_device_of(value: Tensor, like: Tensor) -> Tensor:
    return value.to(like.device)


def _is_intra_epoch(checkpoint: CheckpointInfo) -> bool:
    return INTRA_EPOCH_CKPT_FLAG in checkpoint.meta


def _sampler_of(loader: DataLoader[object]) -> Iterable[object]:
    """The sampler that orders ``loader``: a batch sampler you gave it, else its sampler.

    The ``BatchSampler`` a loader makes from ``batch_size`` only groups its sampler's indices
    (and has no length over an iterable dataset), so the sampler is the one to name.
    """
    batches = loader.batch_sampler
    if batches is None or (type(batches) is BatchSampler and batches.sampler is loader.sampler):
        return loader.sampler
    return batches


class _AddRecoverable(Protocol):
    def __call__(self, name: str, obj: Stateful, *, optional_load: bool) -> None: ...


def _debug_folder(options: RunOptions) -> bool:
    """Whether a brain with these options sends its checkpoints to a temporary folder."""
    return options.debug and not options.debug_persistently


def _add_optional(checkpointer: CheckpointerLike, name: str, obj: Stateful) -> None:
    """Register ``obj`` so that a checkpoint without it still loads, where the checkpointer can.

    typedbrain's ``Checkpointer`` (and SpeechBrain's) take ``optional_load``; a checkpointer
    that implements only :class:`CheckpointerLike` gets the plain call.
    """
    try:
        accepts = "optional_load" in inspect.signature(checkpointer.add_recoverable).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin, say)
        accepts = False
    if accepts:
        cast(_AddRecoverable, checkpointer.add_recoverable)(name, obj, optional_load=True)
    else:
        checkpointer.add_recoverable(name, obj)

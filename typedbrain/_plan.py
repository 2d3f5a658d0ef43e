"""What each training step needs to know, worked out once instead of on every batch.

A small model's step takes a fraction of a millisecond, so reading a dozen run options, building
the list of parameters to clip and calling hooks that do nothing would cost a noticeable share
of it. A ``StepPlan`` holds those answers; the brain rebuilds it when a stage starts and when
its run options or optimizers are replaced.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import final

import attrs
import torch

__all__ = ["StepPlan", "unique_parameters"]


@final
@attrs.frozen(eq=False)
class StepPlan:
    """The settings of the steps of one stage.

    Attributes:
        accumulation: ``grad_accumulation_factor``.
        train_context: the context of training forward passes (autocast, or a no-op).
        eval_context: the context of validation and test forward passes.
        step_limit: ``optimizer_step_limit``.
        batch_limit: batches per stage in debug mode, else ``None``.
        clip_norm: ``max_grad_norm`` (0 or less: no clipping).
        skip_nonfinite_grads: ``skip_nonfinite_grads``.
        parameters: every parameter the optimizers own, each once (what clipping covers).
        call_batch_start: ``on_fit_batch_start`` is overridden, so it must be called.
        call_batch_end: ``on_fit_batch_end`` is overridden, so it must be called.
        call_freeze: ``freeze_optimizers`` is overridden, so it must be called.
        optimizers: the values of ``optimizers_dict``, stepped when ``freeze_optimizers`` is
            not overridden.
        checkpoint_steps: save an intra-epoch checkpoint every this many batches (0: never).
        checkpoint_seconds: save an intra-epoch checkpoint this often (0: never).
        inline_steps: no per-batch hook is overridden and the step is plain (no gradient
            accumulation, grad scaler, process group or ``skip_nonfinite_grads``): the brain may
            run the default hooks' logic inline instead of calling them.
    """

    accumulation: int
    train_context: AbstractContextManager[object]
    eval_context: AbstractContextManager[object]
    step_limit: int | None
    batch_limit: int | None
    clip_norm: float
    skip_nonfinite_grads: bool
    parameters: tuple[torch.Tensor, ...]
    call_batch_start: bool
    call_batch_end: bool
    call_freeze: bool
    optimizers: tuple[torch.optim.Optimizer, ...]
    inline_steps: bool
    checkpoint_steps: int = 0
    checkpoint_seconds: float = 0.0


def unique_parameters(optimizers: Iterable[torch.optim.Optimizer]) -> tuple[torch.Tensor, ...]:
    """Every parameter of every group of ``optimizers``, each once, in order."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    found.append(parameter)
    return tuple(found)

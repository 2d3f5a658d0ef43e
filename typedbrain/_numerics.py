"""Numerics of a training step: autocast, grad scaling, clipping, parameter groups."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Final

import torch

from typedbrain._options import Precision

__all__ = [
    "PRECISION_DTYPES",
    "autocast",
    "grad_scaler_for",
    "gradient_norm",
    "running_mean",
    "scale_gradients",
    "vector_weight_decay_groups",
]

# The autocast dtype of each precision; fp32 runs without autocast.
PRECISION_DTYPES: Final[Mapping[Precision, torch.dtype | None]] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

_NO_CONTEXT: Final = contextlib.nullcontext()


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager[object]:
    """The context to run forward passes in: ``torch.autocast`` for fp16/bf16, nothing for fp32.

    fp32 returns a shared no-op context, so the common case costs nothing per step.
    """
    dtype = PRECISION_DTYPES[precision]
    if dtype is None:
        return _NO_CONTEXT
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler_for(device: torch.device, precision: Precision) -> torch.amp.GradScaler:
    """A grad scaler for ``device``, enabled for fp16 training only.

    bf16 has fp32's exponent range and needs no loss scaling. A disabled scaler passes losses
    and steps through unchanged, so code written against SpeechBrain's always-present scaler
    (``self.scaler.scale(loss).backward()``) runs in every precision.
    """
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def gradient_norm(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """The total 2-norm of the gradients of ``parameters``."""
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def running_mean(mean: float, value: float, count: int) -> float:
    """The mean of ``count`` values: ``mean`` of the first ``count - 1`` and then ``value``.

    Every running loss mean of the loop (and the one a checkpoint saves) takes this one step, so
    that they agree bit for bit.
    """
    return mean + (value - mean) / count


def window_size(step: int, factor: int, stage_batches: int | None) -> int:
    """The batches in the accumulation window of batch ``step`` (1-based, within its stage).

    Windows of ``factor`` batches start at batch 1; the last one of a stage whose length is
    known holds the batches that are left, so its losses can be divided by their own count. A
    window that starts past that length (a loader whose ``len`` undercounts) is a full one: the
    loop rescales it to its mean if it ends short.
    """
    start = (step - 1) // factor * factor + 1
    if stage_batches is None or start > stage_batches:
        return factor
    return min(factor, stage_batches - start + 1)


def scale_gradients(parameters: Sequence[torch.Tensor], factor: float) -> None:
    """Multiply the gradients of ``parameters`` by ``factor``, in place."""
    grads = [param.grad for param in parameters if param.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


def vector_weight_decay_groups(module: torch.nn.Module) -> list[dict[str, object]]:
    """Parameter groups that exempt 1-D parameters (biases, norm scales) from weight decay.

    Returns two groups: the other parameters, with the optimizer's own weight decay, and the
    1-D ones with ``weight_decay=0``. Parameters that do not require gradients are left out.
    """
    matrices = [p for p in module.parameters() if p.requires_grad and p.ndim != 1]
    vectors = [p for p in module.parameters() if p.requires_grad and p.ndim == 1]
    return [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]

"""Whether this machine has a device, asked without making a CUDA context on it."""

from __future__ import annotations

import torch

__all__ = ["missing_device"]

_HOST: frozenset[str] = frozenset({"cpu", "meta"})


def missing_device(device: torch.device | str) -> str | None:
    """Why this machine cannot hold tensors on ``device``; ``None`` when it can.

    A CUDA device is checked against the devices this process sees, without touching them (a
    check on every rank of a job must not make contexts on GPU 0). Another accelerator is
    tried with an empty tensor.

    Args:
        device: a valid device (``torch.device(device)`` succeeds).
    """
    parsed = torch.device(device)
    if parsed.type in _HOST:
        return None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # From the string when there is one: torch keeps the index in 8 bits ("cuda:999" wraps).
        index = (
            int(device.rpartition(":")[2])
            if isinstance(device, str) and ":" in device
            else (parsed.index or 0)
        )
        if 0 <= index < count:
            return None
        return f"this machine has {count} CUDA device(s) available"
    try:
        torch.empty(0, device=parsed)
    except (AssertionError, RuntimeError) as error:  # torch asserts for a backend it lacks
        # torch's first sentence says it; the rest lists every backend it has.
        return str(error).splitlines()[0].split(". ")[0] or type(error).__name__
    return None

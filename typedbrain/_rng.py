"""The random number generators' states as plain data: captured, saved and restored exactly.

A resumed run draws the same random numbers as the uninterrupted one only if every generator it
uses is where it was: Python's ``random``, NumPy's global generator, torch's CPU generator and
every CUDA device's. :func:`capture_rng` takes a snapshot of all of them as an
:class:`RngState` (integers and floats only, so ``torch.load(weights_only=True)`` and JSON
accept it once unstructured), and :func:`restore_rng` puts them back.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Final, cast, final

import attrs
import numpy as np
import torch

from typedbrain._errors import CheckpointError, ResumeWarning
from typedbrain._warn import warn

__all__ = [
    "NumpyRngState",
    "PythonRngState",
    "RngState",
    "capture_generators",
    "capture_rng",
    "restore_generators",
    "restore_rng",
]

_MT_WORDS: Final = 624  # words of a Mersenne Twister state (Python's and NumPy's)


@final
@attrs.frozen(kw_only=True)
class PythonRngState:
    """Python's ``random`` module state: ``random.getstate()`` spelled out.

    Attributes:
        version: the state format's version (3 in current Pythons).
        internal: the Mersenne Twister words followed by the position (625 integers).
        gauss_next: the cached second value of ``random.gauss``, if any.
    """

    version: int
    internal: tuple[int, ...]
    gauss_next: float | None


@final
@attrs.frozen(kw_only=True)
class NumpyRngState:
    """NumPy's global (legacy) generator state: ``numpy.random.get_state()`` spelled out."""

    algorithm: str
    key: tuple[int, ...]
    position: int
    has_gauss: int
    cached_gaussian: float


@final
@attrs.frozen(kw_only=True)
class RngState:
    """Every global random generator's state at one moment.

    Attributes:
        python: Python's ``random`` module.
        numpy: NumPy's global generator.
        torch_cpu: torch's default CPU generator, as the bytes of ``torch.get_rng_state()``.
        cuda: each CUDA device's generator, by device index (empty without CUDA).
        torch_version: the torch that captured the state; CUDA generator states are only
            restored under the same version, since their format has changed between releases.
    """

    python: PythonRngState
    numpy: NumpyRngState
    torch_cpu: tuple[int, ...]
    cuda: tuple[tuple[int, ...], ...] = ()
    torch_version: str = attrs.field(factory=lambda: str(torch.__version__))


def capture_rng() -> RngState:
    """A snapshot of every global random generator (cheap: a few kilobytes copied)."""
    version, internal, gauss_next = random.getstate()
    algorithm, key, position, has_gauss, cached = cast(
        tuple[str, "np.ndarray[tuple[int], np.dtype[np.uint32]]", int, int, float],
        np.random.get_state(legacy=True),
    )
    cuda: tuple[tuple[int, ...], ...] = ()
    # A process that never touched CUDA has no CUDA generator state worth saving.
    initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]  # untyped in torch
    if torch.cuda.is_available() and initialized:
        cuda = tuple(tuple(state.tolist()) for state in torch.cuda.get_rng_state_all())
    return RngState(
        python=PythonRngState(
            version=int(version), internal=tuple(internal), gauss_next=gauss_next
        ),
        numpy=NumpyRngState(
            algorithm=str(algorithm),
            key=tuple(int(word) for word in key.tolist()),
            position=int(position),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached),
        ),
        torch_cpu=tuple(torch.get_rng_state().tolist()),
        cuda=cuda,
    )


def restore_rng(state: RngState) -> None:
    """Put every global random generator back where :func:`capture_rng` found it.

    CUDA states are restored for the devices this process sees, and only under the torch
    version that saved them (their format is version-specific); otherwise a
    :class:`ResumeWarning` says which were left as they are. A run resumed on a machine
    without CUDA, or after a torch upgrade, goes on, but its CUDA randomness (dropout on a
    GPU, say) differs from the interrupted run's.

    Raises:
        CheckpointError: the NumPy state is malformed.
    """
    python = state.python
    random.setstate((python.version, python.internal, python.gauss_next))
    numpy = state.numpy
    if len(numpy.key) != _MT_WORDS:
        raise CheckpointError(f"NumPy RNG state has {len(numpy.key)} words, expected {_MT_WORDS}")
    np.random.set_state(
        (
            numpy.algorithm,
            np.array(numpy.key, dtype=np.uint32),
            numpy.position,
            numpy.has_gauss,
            numpy.cached_gaussian,
        )
    )
    torch.set_rng_state(torch.tensor(state.torch_cpu, dtype=torch.uint8))
    if state.cuda:
        _restore_cuda(state)


def _restore_cuda(state: RngState) -> None:
    saved = len(state.cuda)
    if state.torch_version != str(torch.__version__):
        warn(
            f"the CUDA random generator states were saved by torch {state.torch_version} and "
            f"this is torch {torch.__version__}: their format is version-specific, so they are "
            "not restored, and CUDA randomness will differ from the interrupted run",
            ResumeWarning,
        )
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < saved:
        warn(
            f"the checkpoint holds the random generator states of {saved} CUDA devices and "
            f"this process sees {available}: only the first {available} are restored, and "
            "CUDA randomness on the others will differ from the interrupted run",
            ResumeWarning,
        )
    for device, device_state in enumerate(state.cuda[:available]):
        torch.cuda.set_rng_state(torch.tensor(device_state, dtype=torch.uint8), device)


def capture_generators(generators: Sequence[torch.Generator]) -> tuple[tuple[int, ...], ...]:
    """The states of ``generators`` (a loader's own, say) as plain data, in their order."""
    return tuple(tuple(generator.get_state().tolist()) for generator in generators)


def restore_generators(
    generators: Sequence[torch.Generator], states: tuple[tuple[int, ...], ...], what: str
) -> None:
    """Put ``generators`` back in the ``states`` :func:`capture_generators` took.

    Warns:
        ResumeWarning: there are not as many generators as states (``what`` changed since the
            states were taken); none is restored, and its randomness differs from the
            interrupted run's.
    """
    if len(generators) != len(states):
        warn(
            f"the checkpoint holds the states of {len(states)} random generators of {what} "
            f"and it has {len(generators)} now: none is restored, so what it draws (its "
            "shuffling, say) will differ from the interrupted run",
            ResumeWarning,
        )
        return
    for generator, state in zip(generators, states, strict=True):
        generator.set_state(torch.tensor(state, dtype=torch.uint8))

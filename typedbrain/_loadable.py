"""Whether a state saved now can be loaded back by ``torch.load(weights_only=True)``.

Loading a checkpoint unpickles plain data and tensors only, so a state holding anything else (a
NumPy array, an enum, a ``defaultdict``) would be saved without complaint and refused at every
resume. :func:`refusal` finds such a part before the state is written. Plain containers,
scalars and tensors are recognised by their type; anything else is pickled and unpickled on its
own the way loading does, so what torch accepts (types added with
``torch.serialization.add_safe_globals`` included) is what is accepted here.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import Counter, OrderedDict
from typing import Final

import attrs
import torch

__all__ = ["Refusal", "refusal", "weights_only_reason"]

# Loaded as they are, and holding nothing to look into. (Not bytes: torch pickles an empty
# bytes object as a call of the class ``bytes``, which loading refuses; it is tried instead.)
_LEAVES: Final[frozenset[type]] = frozenset(
    {
        str,
        bytearray,
        int,
        float,
        bool,
        complex,
        type(None),
        torch.Tensor,
        torch.nn.Parameter,
        torch.dtype,
        torch.device,
        torch.layout,
        torch.Size,
    }
)
# Pickled as themselves with their items (and, for the dict classes, their attributes: a
# module's state dict carries ``_metadata``), all of which must be loadable too.
_MAPPINGS: Final[frozenset[type]] = frozenset({dict, OrderedDict, Counter})
_SEQUENCES: Final[frozenset[type]] = frozenset({list, tuple, set})

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@attrs.frozen
class Refusal:
    """A part of a state that ``weights_only`` loading refuses.

    Attributes:
        where: where it lies, as an expression on ``state`` (``state['rng'][1]``, or ``a key
            of state['cache']``).
        kind: its type's qualified name.
        reason: why loading refuses it, in torch's words where torch gives them.
    """

    where: str
    kind: str
    reason: str


def refusal(state: object) -> Refusal | None:
    """The first part of ``state`` that loading with ``weights_only=True`` refuses, or ``None``.

    Containers are walked without recursion (a deep state does not overflow the stack) and each
    is visited once, so shared and self-referencing containers are fine.
    """
    pending: list[tuple[str, object]] = [("state", state)]
    seen: set[int] = set()
    while pending:
        where, value = pending.pop()
        cls = type(value)
        if cls in _LEAVES or (cls is bytes and value):
            continue
        if cls in _MAPPINGS or cls in _SEQUENCES:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, dict):
                for key, item in value.items():
                    pending.append((f"a key of {where}", key))
                    pending.append((f"{where}[{key!r}]", item))
                attributes = getattr(value, "__dict__", None)
                if attributes:
                    pending.extend((f"{where}.{name}", item) for name, item in attributes.items())
            else:
                assert isinstance(value, list | tuple | set)
                pending.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
            continue
        reason = _round_trip_refusal(value)
        if reason is not None:
            return Refusal(where=where, kind=cls.__qualname__, reason=reason)
    return None


def _round_trip_refusal(value: object) -> str | None:
    """Why ``value`` does not survive ``torch.save`` then a ``weights_only`` load, or ``None``."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
    except Exception as error:  # any failure to pickle it is the answer
        return f"it cannot be pickled: {type(error).__name__}: {error}"
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as error:
        return weights_only_reason(error)
    return None


def weights_only_reason(error: pickle.UnpicklingError) -> str:
    """What torch's ``weights_only`` refusal says was refused, in one line.

    torch's message is a page of advice (part of it about loading with ``weights_only=False``,
    which typedbrain never does) with terminal escape codes in it; the first line after its
    ``WeightsUnpickler error:`` (the global or the pickle operation refused) is the one worth
    showing.
    """
    text = _ANSI.sub("", str(error))
    _, marker, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if marker else text).splitlines()]
    line = next((line for line in lines if line), type(error).__name__)
    # "Unsupported global: GLOBAL x was not an allowed global by default. Please use ...": the
    # advice that follows is torch's, about its own API; the first sentence is the fact.
    return line.split(". Please use", 1)[0]

"""A state is accepted for saving exactly when ``torch.load(weights_only=True)`` loads it back."""

from __future__ import annotations

import collections
import enum
import io
import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from typedbrain._loadable import refusal, weights_only_reason


def loads_back(state: object) -> bool:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError:
        return False
    return True


class Colour(enum.Enum):
    RED = 1


class Opaque:
    """A class of the user's that torch's allow-list does not know."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


_plain_leaves: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.complex_numbers(allow_nan=False),
    st.text(max_size=5),
    st.binary(min_size=1, max_size=5),  # b"" is pickled as a call of bytes: see _REFUSED
    st.builds(bytearray, st.binary(max_size=3)),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
    st.just(torch.device("cpu")),
    st.just(torch.strided),
    st.builds(torch.Size, st.lists(st.integers(0, 4), max_size=3)),
    st.builds(torch.zeros, st.integers(0, 3)),
    st.builds(lambda n: torch.nn.Parameter(torch.ones(n)), st.integers(1, 3)),
)

# Each of these makes weights_only loading fail, for a reason torch gives.
_REFUSED: dict[str, Callable[[], object]] = {
    "ndarray": lambda: np.zeros(2),
    "int64": lambda: np.int64(3),
    "defaultdict": lambda: collections.defaultdict(int),
    "Colour": lambda: Colour.RED,
    "Opaque": Opaque,
    "frozenset": lambda: frozenset({1}),
    "slice": lambda: slice(1, 2),
    "bytes": lambda: b"",
}

_keys = st.one_of(st.text(max_size=4), st.integers(-3, 3), st.tuples(st.integers(0, 2)))


def _containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(_keys, children, max_size=3),
        st.dictionaries(_keys, children, max_size=3).map(collections.OrderedDict),
        st.sets(st.integers(), max_size=3),
    )


plain_states = st.recursive(_plain_leaves, _containers, max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(plain_states)
def test_plain_data_and_tensors_are_accepted_and_load_back(state: object) -> None:
    assert refusal(state) is None
    assert loads_back(state)


@st.composite
def states_with_one_refused_part(draw: st.DrawFn) -> tuple[object, str, str]:
    """A plain state with one refused value put somewhere in it, and where it was put."""
    kind = draw(st.sampled_from(sorted(_REFUSED)))
    bad = _REFUSED[kind]()
    depth = draw(st.integers(0, 3))
    state: object = bad
    where = ""
    for _ in range(depth):
        siblings = draw(st.lists(_plain_leaves, max_size=2))
        if draw(st.booleans()):
            key = draw(st.text(min_size=1, max_size=3))
            mapping: dict[object, object] = {f"{key}-{i}": v for i, v in enumerate(siblings)}
            mapping[key] = state
            state, where = mapping, f"[{key!r}]{where}"
        else:
            state, where = [*siblings, state], f"[{len(siblings)}]{where}"
    return {"top": state}, f"state['top']{where}", kind


@settings(max_examples=100, deadline=None)
@given(states_with_one_refused_part())
def test_a_refused_part_is_found_where_it_lies_and_loading_indeed_refuses_it(
    drawn: tuple[object, str, str],
) -> None:
    state, where, kind = drawn
    found = refusal(state)
    assert found is not None
    assert (found.where, found.kind) == (where, kind)
    assert found.reason  # torch's reason, in one line
    assert "\n" not in found.reason
    assert not loads_back(state)


def test_a_refused_key_is_named_as_a_key() -> None:
    found = refusal({"cache": {Colour.RED: 1}})
    assert found is not None
    assert (found.where, found.kind) == ("a key of state['cache']", "Colour")


def test_a_module_state_dicts_metadata_is_checked_too() -> None:
    state = torch.nn.Linear(2, 2).state_dict()
    assert refusal(state) is None
    state._metadata[""]["extra"] = np.int64(1)  # type: ignore[attr-defined]  # torch sets it at run time
    found = refusal(state)
    assert found is not None
    assert found.where == "state._metadata['']['extra']"


def test_a_type_the_user_allowed_is_accepted_as_loading_accepts_it() -> None:
    state = {"opaque": Opaque(3)}
    assert refusal(state) is not None
    with torch.serialization.safe_globals([Opaque]):
        assert refusal(state) is None
        assert loads_back(state)


def test_shared_and_self_referencing_containers_are_walked_once() -> None:
    looped: list[object] = [1]
    looped.append(looped)
    shared = {"a": 1}
    assert refusal({"looped": looped, "x": shared, "y": shared}) is None
    looped.append(np.zeros(1))
    found = refusal({"looped": looped})
    assert found is not None
    assert found.where == "state['looped'][2]"


def test_a_deep_state_does_not_overflow_the_stack() -> None:
    deep: object = np.zeros(1)
    for _ in range(10_000):
        deep = [deep]
    found = refusal({"deep": deep})
    assert found is not None
    assert found.kind == "ndarray"


def test_an_unpicklable_value_is_refused_with_pickles_reason() -> None:
    found = refusal({"callback": lambda: 0})
    assert found is not None
    assert found.reason.startswith("it cannot be pickled:")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"plain text", "Unsupported operand"),
        (None, "Unsupported global: GLOBAL numpy"),
    ],
)
def test_weights_only_reason_is_torchs_one_line_without_its_advice(
    data: bytes | None, expected: str
) -> None:
    if data is None:
        buffer = io.BytesIO()
        torch.save({"x": np.zeros(1)}, buffer)
        data = buffer.getvalue()
    with pytest.raises(pickle.UnpicklingError) as caught:
        torch.load(io.BytesIO(data), weights_only=True)
    reason = weights_only_reason(caught.value)
    assert reason.startswith(expected)
    assert "\x1b" not in reason
    assert "weights_only` set to `False" not in reason
    assert "Please use" not in reason

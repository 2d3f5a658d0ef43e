"""The shared value checks: ints that are not bools, real numbers that are not bools."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from typedbrain._checks import check_int, real_number
from typedbrain._errors import ConfigurationError


@pytest.mark.parametrize("value", [0, 7, -3, 10**30])
def test_an_int_at_or_above_the_minimum_is_returned(value: int) -> None:
    assert check_int("n", value, minimum=None) == value


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, np.int64(1)])
def test_anything_but_a_plain_int_is_refused_naming_the_value(value: object) -> None:
    with pytest.raises(
        ConfigurationError, match=f"^{re.escape(f'n must be an int, got {value!r}')}$"
    ):
        check_int("n", value, minimum=None)


def test_an_int_below_the_minimum_is_refused_naming_the_minimum() -> None:
    assert check_int("n", 2, minimum=2) == 2
    with pytest.raises(ConfigurationError, match=r"^n must be >= 2, got 1$"):
        check_int("n", 1, minimum=2)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3.0), (0.5, 0.5), (Fraction(1, 4), 0.25), (np.float32(2.0), 2.0), (-(10**400), -math.inf)],
)
def test_real_numbers_become_floats_and_huge_ints_infinities(
    value: object, expected: float
) -> None:
    assert real_number(value) == expected


def test_nan_stays_nan() -> None:
    result = real_number(math.nan)
    assert result is not None
    assert math.isnan(result)


@pytest.mark.parametrize("value", [True, False, "1.0", None, 1j, Decimal("1.5"), [1.0]])
def test_bools_strings_and_non_reals_are_not_numbers(value: object) -> None:
    assert real_number(value) is None

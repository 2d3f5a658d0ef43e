from typing import Any, TypeVar

from numpy.typing import NDArray

_ArrayT = TypeVar("_ArrayT", bound=NDArray[Any])

def train_test_split(
    *arrays: _ArrayT,
    test_size: float | int | None = None,
    train_size: float | int | None = None,
    random_state: int | None = None,
    shuffle: bool = True,
    stratify: NDArray[Any] | None = None,
) -> list[_ArrayT]: ...

from typing import Any, Literal, overload

import numpy as np
from numpy.typing import NDArray

@overload
def load_digits(
    *, n_class: int = 10, return_X_y: Literal[True], as_frame: Literal[False] = False
) -> tuple[NDArray[np.float64], NDArray[np.int64]]: ...
@overload
def load_digits(
    *, n_class: int = 10, return_X_y: Literal[False] = False, as_frame: bool = False
) -> Any: ...  # a Bunch (a dict with attribute access); not stubbed here

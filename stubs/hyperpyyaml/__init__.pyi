from collections.abc import Mapping, Sequence
from typing import Self

from .core import (
    Placeholder as Placeholder,
)
from .core import (
    RefTag as RefTag,
)
from .core import (
    dump_hyperpyyaml as dump_hyperpyyaml,
)
from .core import (
    load_hyperpyyaml as load_hyperpyyaml,
)
from .core import (
    resolve_references as resolve_references,
)

class TestThing:
    args: Sequence[object]
    kwargs: Mapping[str, object]
    specific_key: object
    def __init__(self, *args: object, **kwargs: object) -> None: ...
    @classmethod
    def from_keys(cls, args: Sequence[object], kwargs: Mapping[str, object]) -> Self: ...

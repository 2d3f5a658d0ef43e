"""``load_hparams`` returns a ``LoadedHparams``, a ``dict`` whose locations can be read."""

from __future__ import annotations

import io
from typing import assert_type

from typedbrain import LoadedHparams, load_hparams


def load() -> None:
    loaded = load_hparams(io.StringIO("lr: 0.1\n"))
    assert_type(loaded, LoadedHparams)
    assert_type(loaded.source, str)
    where: tuple[str, int] = loaded.locations[("lr",)]
    as_dict: dict[str, object] = loaded  # still a plain dict to code that wants one
    del where, as_dict

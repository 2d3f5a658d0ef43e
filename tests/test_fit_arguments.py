"""fit refuses data that type-checks but is no data set, before anything runs."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import RegressionBrain
from typedbrain import ConfigurationError, Phase


@pytest.mark.parametrize("text", ["data/train.csv", b"data/train.csv", bytearray(b"data")])
def test_fit_refuses_a_file_name_given_as_the_train_set(text: str | bytes) -> None:
    # str and bytes are Sequences, so mypy accepts them where a dataset goes.
    brain = RegressionBrain(
        {"model": torch.nn.Linear(4, 2)},
        opt_class=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    with pytest.raises(ConfigurationError) as caught:
        brain.fit(range(1), text, progressbar=False)
    assert str(caught.value) == (
        f"fit(): train_set is the {type(text).__name__} {text!r}, not a dataset: load the data "
        "it names and give a DataLoader or a dataset"
    )
    assert brain.phase is Phase.INIT  # refused before the fit started

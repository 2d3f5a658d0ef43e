"""Hyperparameters given as a mapping, as SpeechBrain recipes (and HyperPyYAML) give them.

A brain whose third type parameter is left out (it defaults to ``Hparams``) or is ``Hparams``
gets its mapping wrapped: ``self.hparams`` is an ``Hparams`` whose values are ``object``.
A brain generic in ``HparamsT`` infers it from the ``hparams`` argument: through ``Brain``'s
constructor a mapping gives ``Hparams``; through a constructor of the brain's own it gives the
mapping's own type, which the brain keeps as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, assert_type

import attrs
import torch
from torch import Tensor

from typedbrain import Brain, Hparams, HparamsT, Stage


class Classifier(Brain[Tensor, Tensor]):  # HparamsT defaults to Hparams
    def compute_forward(self, batch: Tensor, stage: Stage) -> Tensor:
        assert_type(self.hparams, Hparams)
        # Values of a mapping are untyped: narrow them before use.
        assert_type(self.hparams.lr, object)
        assert_type(self.hparams["lr"], object)
        scale = self.hparams["scale"]
        if isinstance(scale, float):
            return batch * scale
        return batch

    def compute_objectives(self, predictions: Tensor, batch: Tensor, stage: Stage) -> Tensor:
        return predictions.sum()


class ExplicitHparams(Brain[Tensor, Tensor, Hparams]):
    pass


class Reusable(Brain[Tensor, Tensor, HparamsT], Generic[HparamsT]):
    """A brain generic in its hyperparameters: each instance's type says which it got."""


class ReusableWithOwnInit(Brain[Tensor, Tensor, HparamsT], Generic[HparamsT]):
    """Generic too, with a constructor of its own: the type is the argument's, kept as given."""

    def __init__(self, hparams: HparamsT) -> None:
        super().__init__(hparams=hparams)


@attrs.frozen
class Settings:
    lr: float


def construct(yaml_hparams: dict[str, object], ro_hparams: Mapping[str, float]) -> None:
    brain = Classifier(hparams={"lr": 0.1, "scale": 2.0})
    assert_type(brain, Classifier)
    assert_type(brain.hparams, Hparams)
    assert_type(dict(brain.hparams), dict[str, object])
    assert_type(list(brain.hparams), list[str])

    assert_type(Classifier().hparams, Hparams)  # no hyperparameters: an empty Hparams
    assert_type(Classifier(hparams=None).hparams, Hparams)
    assert_type(Classifier(hparams=yaml_hparams).hparams, Hparams)
    assert_type(Classifier(hparams=ro_hparams).hparams, Hparams)
    assert_type(Classifier(None, None, yaml_hparams).hparams, Hparams)
    assert_type(ExplicitHparams(hparams=yaml_hparams).hparams, Hparams)
    assert_type(Classifier(hparams=Hparams({"lr": 0.1})).hparams, Hparams)

    # A generic brain's HparamsT follows the argument: a mapping gives Hparams.
    assert_type(Reusable(hparams={"lr": 0.1}), Reusable[Hparams])
    assert_type(Reusable(hparams={"lr": 0.1}).hparams, Hparams)
    assert_type(Reusable(hparams=Settings(lr=0.1)), Reusable[Settings])
    assert_type(Reusable(hparams=Settings(lr=0.1)).hparams.lr, float)
    assert_type(Reusable(None, None, Settings(lr=0.1)), Reusable[Settings])
    assert_type(Reusable(), Reusable[Hparams])
    # With a constructor of its own, the mapping is kept: a dict stays a dict (run time agrees).
    assert_type(ReusableWithOwnInit({"lr": 0.1}), ReusableWithOwnInit[dict[str, float]])
    assert_type(ReusableWithOwnInit({"lr": 0.1}).hparams.copy(), dict[str, float])

    # The plain Brain too, once its batch and prediction types are given by the annotation.
    plain: Brain[Tensor, Tensor] = Brain(modules={"lin": torch.nn.Linear(1, 1)})
    assert_type(plain.hparams, Hparams)
    typed: Brain[Tensor, Tensor, Settings] = Brain(hparams=Settings(lr=0.1))
    assert_type(typed.hparams, Settings)


def hparams_is_a_read_only_mapping(hparams: Hparams) -> Mapping[str, object]:
    assert_type(len(hparams), int)
    assert_type("lr" in hparams, bool)
    assert_type(hparams.get("lr"), object | None)
    return hparams

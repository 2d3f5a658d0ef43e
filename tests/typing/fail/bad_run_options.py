"""Run options are checked by name and type, in a ``run_opts`` literal and in ``RunOptions``."""

from __future__ import annotations

import attrs
from torch import Tensor

from typedbrain import Brain, RunOptions, RunOptionsDict


class Model(Brain[Tensor, Tensor]):
    pass


def typed_dict_literals(mode: str) -> None:
    wrong_type: RunOptionsDict = {"max_grad_norm": "5"}  # E: typeddict-item
    unknown_key: RunOptionsDict = {"max_grad_nrom": 5.0}  # E: typeddict-unknown-key
    not_a_precision: RunOptionsDict = {"precision": "fp64"}  # E: typeddict-item
    any_str: RunOptionsDict = {"precision": mode}  # E: typeddict-item
    keys_are_strings: RunOptionsDict = {"jit_module_keys": [1, 2]}  # E: list-item
    wrong_type["debug"] = "yes"  # E: typeddict-item
    unknown_key["dbug"] = True  # E: typeddict-unknown-key
    del not_a_precision, any_str, keys_are_strings


def inline_in_the_constructor() -> None:
    # Brain.__init__ is overloaded: a bad literal fails every overload, so mypy reports the call.
    Model(run_opts={"max_grad_norm": "5"})  # E: call-overload
    Model(run_opts={"max_grad_nrom": 5.0})  # E: call-overload


def run_options_class() -> None:
    RunOptions(precision="fp64")  # E: arg-type
    RunOptions(debug_batches="2")  # E: arg-type
    RunOptions(max_grad_norm=None)  # E: arg-type
    RunOptions(debgu=True)  # E: call-arg
    RunOptions(True)  # E: call-arg
    options = RunOptions(debug=True)
    options.debug = False  # E: misc
    attrs.evolve(options, precision="fp64")  # E: arg-type
    RunOptions.from_sources(run_opts=["debug"])  # E: arg-type

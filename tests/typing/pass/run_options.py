"""Run options: the ``run_opts`` TypedDict, ``RunOptions`` and the options as brain attributes."""

from __future__ import annotations

from typing import Literal, assert_type

import attrs
import torch
from torch import Tensor

from typedbrain import Brain, Phase, Precision, RunOptions, RunOptionsDict


class Model(Brain[Tensor, Tensor]):
    pass


def run_opts_literals() -> None:
    Model(run_opts={"max_grad_norm": 1.0, "precision": "bf16"})
    Model(run_opts={"max_grad_norm": 5})  # an int is a float for mypy (and at run time)
    Model(
        run_opts={
            "debug": True,
            "debug_batches": 1,
            "device": "cpu",
            "jit_module_keys": ["encoder"],  # lists, as a YAML file gives them
            "compile_module_keys": ("decoder",),
            "compile_mode": "max-autotune",
            "distributed_backend": "gloo",
            "optimizer_step_limit": None,
            "eval_precision": "fp16",
            "ckpt_interval_minutes": 15.0,
        }
    )
    options: RunOptionsDict = {"noprogressbar": True, "grad_accumulation_factor": 4}
    options["precision"] = "fp16"
    Model(hparams={"lr": 0.1}, run_opts=options)
    Model(run_opts=RunOptionsDict(test_only=True))
    Model(run_opts=None)


def chosen_precision(flag: bool) -> None:
    precision: Precision = "bf16" if flag else "fp32"
    Model(run_opts={"precision": precision})


def run_options_class() -> None:
    options = RunOptions(debug=True)
    assert_type(options, RunOptions)
    assert_type(options.debug, bool)
    assert_type(options.precision, Literal["fp32", "fp16", "bf16"])
    assert_type(options.device, str | None)
    assert_type(options.jit_module_keys, tuple[str, ...] | None)
    assert_type(options.optimizer_step_limit, int | None)
    assert_type(attrs.evolve(options, precision="fp16", max_grad_norm=0.0), RunOptions)
    assert_type(RunOptions.from_sources({"lr": 0.1}, {"debug": True}), RunOptions)
    assert_type(RunOptions.names(), frozenset[str])


def options_as_attributes() -> None:
    brain = Model(run_opts={"max_grad_norm": 1.0, "precision": "bf16"})
    assert_type(brain.run_opts, RunOptions)
    assert_type(brain.max_grad_norm, float)
    assert_type(brain.precision, Literal["fp32", "fp16", "bf16"])
    assert_type(brain.eval_precision, Precision)
    assert_type(brain.device, str)
    assert_type(brain.phase, Phase)
    assert_type(brain.debug, bool)
    assert_type(brain.debug_batches, int)
    assert_type(brain.grad_accumulation_factor, int)
    assert_type(brain.optimizer_step_limit, int | None)
    assert_type(brain.jit_module_keys, tuple[str, ...] | None)
    assert_type(
        brain.compile_mode,
        Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    assert_type(brain.distributed_backend, Literal["nccl", "gloo", "mpi"])
    assert_type(brain.ckpt_interval_minutes, float)

    # Assigning an option validates it and replaces run_opts.
    brain.max_grad_norm = 0.5
    brain.max_grad_norm = 2  # int promotes to float
    brain.precision = "fp16"
    brain.optimizer_step_limit = None
    brain.jit_module_keys = ("encoder",)
    brain.debug = False
    brain.run_opts = attrs.evolve(brain.run_opts, noprogressbar=True)


def brain_state() -> None:
    brain = Model(modules={"lin": torch.nn.Linear(2, 2)}, opt_class=torch.optim.Adam)
    assert_type(brain.modules, torch.nn.ModuleDict)
    assert_type(brain.optimizer, torch.optim.Optimizer)
    assert_type(brain.optimizers_dict, dict[str, torch.optim.Optimizer])
    assert_type(brain.scaler, torch.amp.GradScaler)
    assert_type(brain.step, int)
    assert_type(brain.optimizer_step, int)
    assert_type(brain.avg_train_loss, float)
    assert_type(brain.nonfinite_count, int)
    assert_type(brain.profiler, torch.profiler.profile | None)
    assert_type(brain.evaluate([torch.zeros(2)], progressbar=False), float)

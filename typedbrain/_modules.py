"""Preparing a brain's modules for training: compiling, scripting, wrapping for parallelism."""

from __future__ import annotations

import re
from typing import Final, cast

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from typedbrain._distributed import is_distributed
from typedbrain._errors import ConfigurationError
from typedbrain._options import RunOptions

__all__ = ["compile_modules", "cpu_fsdp_problem", "sync_batchnorm", "wrap_modules"]

# The first torch release whose FSDP2 averages gradients over gloo on the CPU (checked by
# tests/test_distributed.py::test_fsdp2_fully_shard_trains_on_cpu_with_gloo on 2.6.0, 2.7.1,
# 2.8.0, 2.9.1, 2.13.0 and 2.14.1).
_CPU_FSDP_SINCE: Final = (2, 9)


def cpu_fsdp_problem(device: torch.device, torch_version: str) -> str | None:
    """Why FSDP2 cannot train on ``device`` under torch ``torch_version``; ``None`` if it can.

    Before torch 2.9, ``fully_shard`` on the CPU (gloo) fails in its first forward (2.6:
    ``'Stream' object has no attribute 'record_event'``) or, worse, adds the ranks' gradients
    where it should average them (2.7, 2.8): every step is ``world_size`` times too large.
    Only the CPU is checked: FSDP2 on GPUs under those releases has not been tested here.
    """
    if device.type != "cpu":
        return None
    release = re.match(r"(\d+)\.(\d+)", torch_version)
    if release is None or (int(release[1]), int(release[2])) >= _CPU_FSDP_SINCE:
        return None
    since = ".".join(map(str, _CPU_FSDP_SINCE))
    return (
        f"FSDP2 on the CPU needs torch {since} or newer; with torch {torch_version}, "
        "fully_shard over gloo fails or adds the processes' gradients instead of averaging "
        f"them (steps world_size times too large). Upgrade torch to {since}+, train on GPUs, "
        "or use DDP (fsdp=False) on the CPU"
    )


def _selected(
    modules: torch.nn.ModuleDict, option: str, keys: tuple[str, ...] | None
) -> tuple[str, ...]:
    """The module names a ``*_module_keys`` option selects: all of them when it is ``None``.

    A name whose module is ``None`` (an optional module, absent) is never selected.
    """
    if keys is None:
        return tuple(name for name, _ in modules.named_children())
    for key in keys:
        if key not in modules or modules[key] is None:
            known = ", ".join(modules.keys()) or "none"
            raise ConfigurationError(
                f"run option {option!r} names {key!r}, which is not one of the modules ({known})"
            )
    return keys


def compile_modules(modules: torch.nn.ModuleDict, options: RunOptions, done: set[str]) -> None:
    """``torch.compile`` (then ``torch.jit.script``) the modules the options name, in place.

    A module is compiled or scripted once: its name is added to ``done``, and names already in
    ``done`` are skipped (``fit`` may run several times). ``compile`` wins over ``jit`` for a
    module both select.

    Raises:
        ConfigurationError: an option names a module that does not exist.
    """
    if options.compile:
        for key in _selected(modules, "compile_module_keys", options.compile_module_keys):
            if key not in done:
                compiled = torch.compile(
                    modules[key],
                    mode=options.compile_mode,
                    fullgraph=options.compile_using_fullgraph,
                    dynamic=options.compile_using_dynamic_shape_tracing,
                )
                modules[key] = cast(torch.nn.Module, compiled)
                done.add(key)
    if options.jit:
        for key in _selected(modules, "jit_module_keys", options.jit_module_keys):
            if key not in done:
                modules[key] = torch.jit.script(modules[key])
                done.add(key)


def sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every batch norm layer turned into ``torch.nn.SyncBatchNorm``.

    The layers inside ``module`` are replaced in place, so ``module`` itself is returned (a new
    object only when ``module`` is itself a batch norm layer); parameter and buffer names do not
    change, so checkpoints load either way.
    """
    converted: torch.nn.Module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(  # type: ignore[no-untyped-call]  # untyped in torch
        module
    )
    return converted


def wrap_modules(
    modules: torch.nn.ModuleDict, options: RunOptions, device: torch.device
) -> list[DistributedDataParallel]:
    """Wrap each module with trainable parameters for parallel training, in place.

    Under a ``torch.distributed`` process group the modules are wrapped in
    ``DistributedDataParallel``, or, with the ``fsdp`` run option, sharded in place with FSDP2's
    ``fully_shard`` (gradient accumulation then synchronises every batch). Otherwise, with
    ``data_parallel_backend``, they are wrapped in ``DataParallel``. Modules without trainable
    parameters are left alone.

    Returns:
        The DDP wrappers (for ``no_sync``); empty without a process group.
    """
    wrappers: list[DistributedDataParallel] = []
    for key, module in list(modules.named_children()):  # a None module is no child
        if not any(p.requires_grad for p in module.parameters()):
            continue
        if is_distributed() and options.fsdp:
            problem = cpu_fsdp_problem(device, str(torch.__version__))
            if problem is not None:
                raise ConfigurationError(f"run option fsdp=True: {problem}")
            # Imported here: importing FSDP imports sympy, which adds a warning filter.
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # Shards the parameters in place (they become DTensors); the module object stays
            # the one a checkpointer holds, which saves and loads it as full tensors. The mesh
            # is on the brain's device type: fully_shard's own default is the machine's
            # accelerator, which would move a CPU brain's parameters to a GPU it has.
            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
            fully_shard(module, mesh=mesh)
            continue
        if is_distributed():
            if options.sync_batchnorm:
                if device.type != "cuda":
                    raise ConfigurationError(
                        f"run option sync_batchnorm=True needs CUDA devices: torch's "
                        f"SyncBatchNorm refuses modules on {device}; turn the option off on CPU"
                    )
                modules[key] = sync_batchnorm(module)
            wrapper = DistributedDataParallel(
                modules[key],
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=options.find_unused_parameters,
            )
            modules[key] = wrapper
            wrappers.append(wrapper)
        elif options.data_parallel_backend:
            modules[key] = torch.nn.DataParallel(module)
    return wrappers

"""Preparing a brain's modules for training: compiling, scripting, wrapping for parallelism."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from typedbrain._distributed import _collective, is_distributed
from typedbrain._errors import ConfigurationError
from typedbrain._options import RunOptions

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

__all__ = [
    "collective_free_forwards",
    "compile_modules",
    "cpu_fsdp_problem",
    "sync_batchnorm",
    "wrap_modules",
]

logger = logging.getLogger(__name__)

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


@contextlib.contextmanager
def collective_free_forwards(modules: torch.nn.ModuleDict) -> Iterator[None]:
    """Run an evaluation stage's forward passes without any collective inside them. Collective.

    The processes hold different numbers of validation or test batches (some none at all), so a
    collective inside a forward pass would wait forever for a process that has run out of
    batches. Two kinds of module make one:

    * A ``DistributedDataParallel`` wrapper broadcasts its module's buffers from rank 0 in the
      first forward pass after a synchronised training pass. Here the buffers are broadcast
      once, on entry, in its place (so the values are the ones that forward pass would have
      given), and until the block ends ``modules[key]`` is the wrapped module itself, which
      exchanges nothing; the wrapper is then put back and told, as its own evaluation pass
      would have told it, that the next training pass need not broadcast the buffers again.
    * An FSDP2 module (``fully_shard``) all-gathers its parameters in a forward pass whenever
      they are sharded. Here every FSDP2 module is unsharded on entry and kept so until the
      block ends (sharded modules nested in another one are told not to reshard after each
      forward pass meanwhile), then resharded.

    Every process must enter the block at the same point: entering is the stage's one
    synchronisation. Leaving exchanges nothing, so a process whose stage raised leaves
    without waiting for the others, with its wrappers back in place.

    Args:
        modules: the brain's modules; wrappers found among them are swapped in place.
    """
    wrapped = [
        (key, module)
        for key, module in modules.items()
        if isinstance(module, DistributedDataParallel)
    ]
    for _, wrapper in wrapped:
        if _syncs_buffers_next(wrapper):
            _broadcast_buffers(wrapper)
    sharded = _fsdp_modules(modules)
    roots = {id(module) for module in modules.children()}
    nested = [module for module in sharded if id(module) not in roots]
    unsharded: list[FSDPModule] = []
    kept: list[tuple[FSDPParamGroup, FSDPMeshInfo | None]] = []  # each group's setting
    try:
        for module in nested:
            for group in _param_groups(module):
                # None: no resharding after forward (what fully_shard does for a root).
                kept.append((group, group.post_forward_mesh_info))
                group.post_forward_mesh_info = None
        for module in sharded:
            module.unshard()
            unsharded.append(module)
        for key, wrapper in wrapped:
            modules[key] = wrapper.module
        yield
    finally:
        for key, wrapper in wrapped:
            modules[key] = wrapper
            # What the wrapper's own forward pass under no_grad records: the last pass was
            # not a synchronised training one, so the next one does not broadcast buffers.
            wrapper.require_forward_param_sync = False
        for module in unsharded:
            module.reshard()
        for group, mesh in kept:
            group.post_forward_mesh_info = mesh


def _syncs_buffers_next(wrapper: DistributedDataParallel) -> bool:
    """Whether the wrapper's next forward pass would broadcast its module's buffers."""
    will_sync: Callable[[], object] = wrapper.will_sync_module_buffers  # untyped in torch
    return bool(will_sync())


def _broadcast_buffers(wrapper: DistributedDataParallel) -> None:
    """Give every process rank 0's buffers of the wrapped module, as DDP's forward pass does.

    The buffers DDP leaves out (``parameters_to_ignore``) are left alone. Buffers of one device
    and dtype travel as one tensor.
    """
    ignored = wrapper.parameters_to_ignore
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for name, buffer in wrapper.module.named_buffers():
        if name not in ignored:
            groups.setdefault((buffer.device, buffer.dtype), []).append(buffer)
    source = dist.get_global_rank(wrapper.process_group, 0)
    with torch.no_grad(), _collective("broadcast of the DDP modules' buffers"):
        for buffers in groups.values():
            flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
            dist.broadcast(flat, src=source, group=wrapper.process_group)
            sizes = [buffer.numel() for buffer in buffers]
            for buffer, value in zip(buffers, torch.split(flat, sizes), strict=True):
                buffer.copy_(value.view(buffer.shape))


def _fsdp_modules(modules: torch.nn.ModuleDict) -> list[FSDPModule]:
    """Every FSDP2 module in ``modules``, each once, in the same order on every process."""
    if "torch.distributed.fsdp" not in sys.modules:
        return []  # FSDP2 was never imported, so nothing was sharded
    from torch.distributed.fsdp import FSDPModule

    found: dict[int, FSDPModule] = {}
    for top in modules.children():
        for module in top.modules():
            if isinstance(module, FSDPModule):
                found.setdefault(id(module), module)
    return list(found.values())


def _param_groups(module: FSDPModule) -> list[FSDPParamGroup]:
    """The FSDP2 parameter groups of ``module``, whose ``post_forward_mesh_info`` is the setting.

    FSDP2 has no public getter for ``reshard_after_forward`` (and torch 2.7 has no setter), so
    the setting is read and restored where ``fully_shard`` keeps it: a module's one parameter
    group (``_fsdp_param_group``, torch 2.7) or its list of them (``_fsdp_param_groups``,
    torch 2.13).
    """
    state = module._get_fsdp_state()
    groups: list[FSDPParamGroup] | None = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    if not hasattr(state, "_fsdp_param_group"):
        logger.warning(
            "cannot keep the FSDP2 module %s gathered for evaluation under torch %s (its "
            "reshard_after_forward setting is not where typedbrain looks for it): a "
            "validation or test stage whose processes hold unequal numbers of batches may "
            "hang in its forward passes",
            type(module).__name__,
            torch.__version__,
        )
    single: FSDPParamGroup | None = getattr(state, "_fsdp_param_group", None)
    return [] if single is None else [single]
